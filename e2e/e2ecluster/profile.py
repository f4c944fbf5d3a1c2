"""The node profile (e2e/nodes.yaml) turned into Node manifests: pure, no cluster needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# The kwok controller manages the nodes that carry this annotation (see cluster.py).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"

# Labels that NVIDIA's GPU feature discovery writes and the device-plugin stand-in rewrites.
LABEL_PRODUCT = "nvidia.com/gpu.product"
LABEL_COUNT = "nvidia.com/gpu.count"
LABEL_MEMORY = "nvidia.com/gpu.memory"
LABEL_REPLICAS = "nvidia.com/gpu.replicas"
LABEL_SHARING = "nvidia.com/gpu.sharing-strategy"
RESOURCE_GPU = "nvidia.com/gpu"

DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "nodes.yaml"


class ProfileError(ValueError):
    """The node profile is malformed."""


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProfileError(f"{where} must be a mapping, got {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


def gpu_labels(gpu: dict[str, Any], gpus: int) -> dict[str, str]:
    """The labels feature discovery sets on a node with `gpus` GPUs of model `gpu`."""
    try:
        labels = {
            LABEL_PRODUCT: str(gpu["product"]),
            LABEL_MEMORY: str(int(gpu["memoryMiB"])),
            LABEL_COUNT: str(gpus),
            LABEL_REPLICAS: "1",
            LABEL_SHARING: "none",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.family": str(gpu["family"]),
            "nvidia.com/gpu.compute.major": str(int(gpu["computeMajor"])),
            "nvidia.com/gpu.compute.minor": str(int(gpu["computeMinor"])),
            "nvidia.com/mps.capable": "true" if gpu.get("mpsCapable", False) else "false",
            "nvidia.com/mig.capable": "true" if gpu.get("migCapable", False) else "false",
            "feature.node.kubernetes.io/pci-10de.present": "true",
        }
    except KeyError as e:
        raise ProfileError(f"gpu entry lacks {e.args[0]!r}: {gpu}") from None
    if " " in labels[LABEL_PRODUCT]:
        raise ProfileError(f"gpu product {labels[LABEL_PRODUCT]!r}: labels use '-' for spaces")
    return labels


def node_manifests(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """Node objects (metadata, spec and status) for every node the profile describes."""
    defaults = profile.get("defaults") or {}
    groups = profile.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ProfileError("the profile needs a non-empty 'groups' list")
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    ip = 0
    for group in groups:
        prefix = group.get("namePrefix")
        if not prefix:
            raise ProfileError(f"group without namePrefix: {group}")
        count = int(group.get("count", 1))
        gpus = int(group.get("gpus", 0))
        gpu = group.get("gpu")
        if (gpus > 0) != (gpu is not None):
            raise ProfileError(f"group {prefix}: give both 'gpus' and 'gpu', or neither")
        capacity = _str_map(defaults.get("capacity"), "defaults.capacity")
        capacity |= _str_map(group.get("capacity"), f"{prefix}.capacity")
        labels = _str_map(defaults.get("labels"), "defaults.labels")
        labels |= _str_map(group.get("labels"), f"{prefix}.labels")
        if gpu is not None:
            labels |= gpu_labels(gpu, gpus)
            capacity[RESOURCE_GPU] = str(gpus)
        for i in range(count):
            name = f"{prefix}-{i}"
            if name in seen:
                raise ProfileError(f"duplicate node name {name}")
            seen.add(name)
            ip += 1
            node: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": labels | {"kubernetes.io/hostname": name, "type": "kwok"},
                    "annotations": {
                        KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE,
                        "node.alpha.kubernetes.io/ttl": "0",
                    },
                },
                "spec": {},
                "status": {
                    "capacity": dict(capacity),
                    "allocatable": dict(capacity),
                    "addresses": [
                        # Fake, never dialled, out of the private ranges.
                        {
                            "type": "InternalIP",
                            "address": f"198.19.{65 + ip // 250}.{ip % 250 + 1}",
                        },
                        {"type": "Hostname", "address": name},
                    ],
                },
            }
            if group.get("taints"):
                node["spec"]["taints"] = list(group["taints"])
            nodes.append(node)
    return nodes


def load(path: Path = DEFAULT_PROFILE) -> list[dict[str, Any]]:
    """Read a node profile file and return its Node manifests."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"cannot read node profile {path}: {e}") from e
    if not isinstance(data, dict):
        raise ProfileError(f"node profile {path} is not a mapping")
    return node_manifests(data)
