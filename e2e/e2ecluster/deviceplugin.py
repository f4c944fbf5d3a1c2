"""Test-side stand-in for NVIDIA's device plugin + GPU feature discovery (sharing only).

The real plugin reads one ConfigMap with one config per key; a node label
`nvidia.com/device-plugin.config=<key>` picks one. For a time-slicing or MPS config it
advertises physical GPUs x replicas of `nvidia.com/gpu` (or of the renamed resource)
and feature discovery relabels the node. This process does the same to the fake
nodes: it watches the ConfigMap and the nodes and patches labels and node status.

Rules followed (NVIDIA/k8s-device-plugin api/config/v1 and internal/lm):
- a config is `version: v1`; `sharing.timeSlicing` or `sharing.mps` (not both) with
  `resources: [{name: nvidia.com/gpu, replicas: N, rename?, devices?}]`, N >= 1;
- shared = replicas > 1; `renameByDefault: true` renames the resource to
  `<name>.shared`, an explicit `rename` to that name;
- product label: `<product>-SHARED` when shared and not renamed;
- `nvidia.com/gpu.replicas` = N when shared, else 1; `nvidia.com/gpu.sharing-strategy`
  = mps | time-slicing | none;
- label absent: the default (no sharing); label naming an unknown key, or a config the
  plugin would reject: no change (the real plugin keeps its running config).
`failRequestsGreaterThanOne` only changes allocation inside a kubelet: not simulated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml

from .profile import (
    LABEL_COUNT,
    LABEL_PRODUCT,
    LABEL_REPLICAS,
    LABEL_SHARING,
    RESOURCE_GPU,
)

LABEL_CONFIG = "nvidia.com/device-plugin.config"
CONFIG_NAMESPACE = "nvidia-device-plugin"
CONFIG_NAME = "device-plugin-config"
SHARED_SUFFIX = "-SHARED"

log = logging.getLogger("device-plugin")


class ConfigError(ValueError):
    """A config the real device plugin would refuse to load."""


@dataclass(frozen=True)
class Sharing:
    """What one config key asks of the `nvidia.com/gpu` resource."""

    strategy: str = "none"  # none | time-slicing | mps
    replicas: int = 1
    rename: str | None = None  # advertised resource name when renamed
    devices: int | None = None  # how many GPUs are replicated; None = all


NO_SHARING = Sharing()


@dataclass(frozen=True)
class GpuState:
    """The extended resources and labels a node should show."""

    resources: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def _resource_devices(devices: Any) -> int | None:
    if devices is None or devices == "all":
        return None
    if isinstance(devices, bool):
        raise ConfigError(f"devices: unsupported value {devices!r}")
    if isinstance(devices, int):
        if devices <= 0:
            raise ConfigError(f"devices set as {devices} but a count of devices must be > 0")
        return devices
    if isinstance(devices, list):
        return len(devices)
    raise ConfigError(f"devices: unsupported value {devices!r} (use 'all', a count or a list)")


def parse_sharing(text: str) -> Sharing:
    """Parse one config (YAML or JSON) into what it does to `nvidia.com/gpu`."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError("config is not a mapping")
    if doc.get("version") != "v1":
        raise ConfigError(f"unknown version {doc.get('version')!r} (want v1)")
    sharing = doc.get("sharing") or {}
    if not isinstance(sharing, dict):
        raise ConfigError("sharing is not a mapping")
    ts, mps = sharing.get("timeSlicing"), sharing.get("mps")
    chosen: list[tuple[str, dict[str, Any]]] = []
    for strategy, section in (("time-slicing", ts), ("mps", mps)):
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"sharing.{strategy}: not a mapping")
        resources = section.get("resources")
        if not isinstance(resources, list) or not resources:
            raise ConfigError(f"sharing ({strategy}): no resources specified")
        chosen.append((strategy, section))
    if not chosen:
        return NO_SHARING
    if len(chosen) > 1:
        raise ConfigError("time-slicing and MPS are exclusive: set only one of them")
    strategy, section = chosen[0]
    rename_by_default = bool(section.get("renameByDefault", False))
    found: Sharing | None = None
    for r in section["resources"]:
        if not isinstance(r, dict) or "name" not in r:
            raise ConfigError(f"resource without a name: {r!r}")
        if "replicas" not in r:
            raise ConfigError(f"resource {r['name']}: no replicas specified")
        replicas = r["replicas"]
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas <= 0:
            raise ConfigError(f"resource {r['name']}: replicas must be a positive integer")
        devices = _resource_devices(r.get("devices"))
        if r["name"] != RESOURCE_GPU:
            continue  # MIG resources: our fake GPUs have none
        rename = r.get("rename") or (f"{RESOURCE_GPU}.shared" if rename_by_default else None)
        found = Sharing(strategy, replicas, rename, devices)
    if found is None or found.replicas <= 1:
        # Nothing replicated for nvidia.com/gpu: the plugin reports no sharing.
        return Sharing(rename=found.rename if found else None)
    return found


def base_product(product: str) -> str:
    """The product label without the -SHARED suffix."""
    return product.removesuffix(SHARED_SUFFIX)


def desired_state(physical_gpus: int, product: str, sharing: Sharing) -> GpuState:
    """Resources and labels for a node with `physical_gpus` GPUs of `product`."""
    product = base_product(product)
    shared = sharing.replicas > 1
    replicated = physical_gpus if sharing.devices is None else min(sharing.devices, physical_gpus)
    count = replicated * sharing.replicas + (physical_gpus - replicated)
    resources = {RESOURCE_GPU: count}
    if sharing.rename:
        # The plugin advertises only the renamed resource; the kubelet keeps a stale
        # nvidia.com/gpu at 0.
        resources = {RESOURCE_GPU: 0, sharing.rename: count}
    labels = {
        LABEL_PRODUCT: product + (SHARED_SUFFIX if shared and not sharing.rename else ""),
        LABEL_REPLICAS: str(sharing.replicas if shared else 1),
        LABEL_SHARING: sharing.strategy if shared else "none",
    }
    return GpuState(resources, labels)


def sharing_for_node(labels: dict[str, str], configs: dict[str, str] | None) -> Sharing | None:
    """Which sharing applies to a node; None means leave the node as it is."""
    key = labels.get(LABEL_CONFIG)
    if key is None:
        return NO_SHARING
    if configs is None or key not in configs:
        log.warning("config key %r not in ConfigMap %s: no change", key, CONFIG_NAME)
        return None
    try:
        return parse_sharing(configs[key])
    except ConfigError as e:
        log.warning("config key %r is invalid (%s): no change", key, e)
        return None


def node_patches(
    node: dict[str, Any], configs: dict[str, str] | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(metadata patch, status patch) that bring a node in line, each None if in line."""
    meta = node.get("metadata") or {}
    labels: dict[str, str] = meta.get("labels") or {}
    if LABEL_COUNT not in labels or LABEL_PRODUCT not in labels:
        return None, None  # not a GPU node
    sharing = sharing_for_node(labels, configs)
    if sharing is None:
        return None, None
    want = desired_state(int(labels[LABEL_COUNT]), labels[LABEL_PRODUCT], sharing)
    label_patch = {k: v for k, v in want.labels.items() if labels.get(k) != v}
    status = node.get("status") or {}
    status_patch: dict[str, Any] = {}
    for section in ("capacity", "allocatable"):
        have: dict[str, str] = status.get(section) or {}
        change: dict[str, str | None] = {
            k: str(v) for k, v in want.resources.items() if have.get(k) != str(v)
        }
        # A renamed resource that is no longer wanted disappears.
        for k in have:
            if k.startswith(RESOURCE_GPU + ".") and k not in want.resources:
                change[k] = None
        if change:
            status_patch[section] = change
    return (
        {"metadata": {"labels": label_patch}} if label_patch else None,
        {"status": status_patch} if status_patch else None,
    )


class StandIn:
    """Watches the ConfigMap and the nodes; reconciles every GPU node on any change."""

    def __init__(self, namespace: str, name: str, real_nodes: dict[str, str] | None = None) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api()
        self.namespace, self.name = namespace, name
        # Nodes with a kubelet: their status belongs to the kubelet, so the device count
        # goes to the file their device plugin (e2e-device-plugin) advertises from.
        self.real_nodes = real_nodes or {}
        self.wake = threading.Event()
        self.stop = threading.Event()

    def configs(self) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            cm = self.core.read_namespaced_config_map(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(cm.data or {})

    def reconcile(self) -> int:
        """Bring every GPU node in line; return how many there are."""
        configs = self.configs()
        nodes = json.loads(
            self.core.list_node(label_selector=LABEL_COUNT, _preload_content=False).data
        )["items"]
        for node in nodes:
            name = node["metadata"]["name"]
            meta_patch, status_patch = node_patches(node, configs)
            if name in self.real_nodes:
                self._write_devices(name, node, configs)
                status_patch = None
            if status_patch:
                log.info("node %s: status %s", name, status_patch["status"])
                self.core.patch_node_status(name, status_patch)
            if meta_patch:
                log.info("node %s: labels %s", name, meta_patch["metadata"]["labels"])
                self.core.patch_node(name, meta_patch)
        return len(nodes)

    def _write_devices(
        self, name: str, node: dict[str, Any], configs: dict[str, str] | None
    ) -> None:
        labels = node["metadata"].get("labels") or {}
        sharing = sharing_for_node(labels, configs)
        if sharing is None:
            return
        want = desired_state(int(labels[LABEL_COUNT]), labels[LABEL_PRODUCT], sharing)
        count = max(want.resources.values())
        path = self.real_nodes[name]
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            if f.read().strip() == str(count):
                return
        log.info("node %s: %d devices (%s)", name, count, path)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{count}\n")
        os.replace(tmp, path)

    def _watch(self, what: str) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            w = watch.Watch()
            try:
                if what == "nodes":
                    stream = w.stream(self.core.list_node, timeout_seconds=60)
                else:
                    stream = w.stream(
                        self.core.list_namespaced_config_map,
                        self.namespace,
                        field_selector=f"metadata.name={self.name}",
                        timeout_seconds=60,
                    )
                for _ in stream:
                    self.wake.set()
                    if self.stop.is_set():
                        break
            except Exception as e:  # the watch restarts; the resync covers the gap
                log.warning("%s watch: %s", what, e)
                self.stop.wait(1)
            finally:
                w.stop()

    def run(self, resync_seconds: float = 10.0) -> None:
        for what in ("nodes", "configmap"):
            threading.Thread(target=self._watch, args=(what,), daemon=True).start()
        log.info(
            "watching ConfigMap %s/%s and node label %s", self.namespace, self.name, LABEL_CONFIG
        )
        synced = False
        while not self.stop.is_set():
            self.wake.clear()
            try:
                count = self.reconcile()
                if not synced:
                    log.info("in sync: %d GPU nodes", count)
                    synced = True
            except Exception as e:  # keep serving; the next event or resync retries
                log.warning("reconcile failed: %s", e)
                self.stop.wait(1)
            self.wake.wait(resync_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--namespace", default=CONFIG_NAMESPACE)
    parser.add_argument("--configmap", default=CONFIG_NAME)
    parser.add_argument(
        "--real-node",
        action="append",
        default=[],
        metavar="NODE=FILE",
        help="a node with a kubelet: write its device count to FILE instead of its status",
    )
    args = parser.parse_args(argv)
    real_nodes = dict(r.split("=", 1) for r in args.real_node)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from kubernetes import config

    config.load_kube_config(config_file=args.kubeconfig)
    standin = StandIn(args.namespace, args.configmap, real_nodes)
    with contextlib.suppress(ValueError):  # not the main thread: no signal handling
        signal.signal(signal.SIGTERM, lambda *_: (standin.stop.set(), standin.wake.set()))
    standin.run()
    log.info("stopped")


if __name__ == "__main__":
    main()
