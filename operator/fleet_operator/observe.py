"""What one reconcile pass sees: the fleet, the nodes, its children and pods, the plugin's keys.

The operator fills these from kopf's indexes (handlers.py), read once per pass; unit tests
build them by hand. `trim` keeps of each watched object only what a decision reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet_operator.names import (
    FLEET_LABEL,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    PROFILE_LABEL,
    fleet_id,
)


@dataclass(frozen=True)
class Observations:
    """One look at the cluster for one fleet, taken before anything is decided."""

    fleet: Mapping[str, Any]  # the InferenceFleet object as the watch delivered it
    nodes: Sequence[Mapping[str, Any]]  # every Node (trimmed)
    children: Mapping[tuple[str, str], Mapping[str, Any]]  # (kind, name) -> object, ours or not
    pods: Sequence[Mapping[str, Any]]  # the fleet's worker pods (trimmed)
    other_pods: Sequence[Mapping[str, Any]] = ()  # worker pods of the other fleets (trimmed)
    fleets: frozenset[str] = frozenset()  # "ns/name" of every fleet in the watched namespaces
    watched: tuple[str, ...] | None = None  # the watched namespaces; None: all of them
    device_plugin: Mapping[str, str] | None = field(default=None)  # None: no ConfigMap yet
    # Keys of that ConfigMap old enough to be in the device plugin's volume by now; None: the
    # volume does not lag, so a key written in this pass may be selected in the same pass.
    synced_keys: frozenset[str] | None = None
    # The fleet's tune Jobs by name, and their pods (trimmed).
    tune_jobs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tune_pods: Sequence[Mapping[str, Any]] = ()

    def watches(self, namespace: str) -> bool:
        return self.watched is None or namespace in self.watched


def _meta(obj: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {key: meta[key] for key in keys if meta.get(key) is not None}


def trim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """What claims read of a Node: labels, annotations, taints, GPU capacity and allocatable,
    resourceVersion."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    return {
        "metadata": _meta(node, "name", "labels", "annotations", "resourceVersion"),
        "spec": {key: spec[key] for key in ("unschedulable", "taints") if key in spec},
        "status": {
            "capacity": dict(status.get("capacity") or {}),
            "allocatable": dict(status.get("allocatable") or {}),
        },
    }


def trim_child(obj: Mapping[str, Any], ours: bool) -> dict[str, Any]:
    """A possible child: its owner and labels always; the rest only when it is ours."""
    keys = ("name", "namespace", "labels", "ownerReferences", "uid")
    if not ours:
        return {"kind": obj.get("kind"), "metadata": _meta(obj, *keys)}
    body = {k: v for k, v in obj.items() if k != "metadata"}
    meta = _meta(obj, *keys, "annotations", "generation", "deletionTimestamp")
    return {**body, "metadata": meta}


def trim_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """What the tune decision reads of a Job: owner, labels, whether and how it finished."""
    status = job.get("status") or {}
    conditions = [
        {key: c[key] for key in ("type", "status", "reason", "message") if key in c}
        for c in status.get("conditions") or []
    ]
    return {
        "kind": "Job",
        "metadata": _meta(job, "name", "namespace", "labels", "ownerReferences", "uid"),
        "status": {"conditions": conditions},
    }


def trim_tune_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What the tune decision reads of a tune Job's pod: its Job, node, phase, and how its
    container ended (the termination message holds tune's result)."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    ended = []
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            keys = ("exitCode", "reason", "message")
            ended.append({key: terminated[key] for key in keys if key in terminated})
    return {
        "metadata": _meta(pod, "name", "namespace", "labels"),
        "spec": {"nodeName": spec.get("nodeName")},
        "status": {"phase": status.get("phase"), "terminated": ended},
    }


def owns(fleet: Mapping[str, Any], child: Mapping[str, Any]) -> bool:
    """Is the object this fleet's: its owner reference names the fleet's uid, or it carries our
    labels for this fleet and no controller (left by an earlier fleet of the same name)."""
    meta, fleet_meta = child.get("metadata") or {}, fleet["metadata"]
    references = meta.get("ownerReferences") or []
    if any(ref.get("uid") == fleet_meta.get("uid") for ref in references):
        return True
    labels = meta.get("labels") or {}
    return (
        not any(ref.get("controller") for ref in references)
        and labels.get(MANAGED_BY) == MANAGED_BY_VALUE
        and labels.get(FLEET_LABEL) == fleet_meta["name"]
    )


def trim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What placement reads of a worker pod: its node, whether it is going away, the node
    affinity it was placed under (it names the GPU profile)."""
    spec = pod.get("spec") or {}
    trimmed = {"nodeName": spec.get("nodeName")}
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity")
    if node_affinity:
        trimmed["affinity"] = {"nodeAffinity": node_affinity}
    return {
        "metadata": _meta(pod, "name", "namespace", "labels", "deletionTimestamp"),
        "spec": trimmed,
    }


def pod_profile(pod: Mapping[str, Any]) -> str:
    """The GPU profile the pod was placed under (its node affinity on PROFILE_LABEL), or ""."""
    affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    for term in required.get("nodeSelectorTerms") or []:
        for expression in term.get("matchExpressions") or []:
            if expression.get("key") == PROFILE_LABEL and expression.get("values"):
                return str(expression["values"][0])
    return ""


def slots_used(pods: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per node, the GPU slots (one per worker pod, terminating ones too) each fleet's pods
    take there, by fleet ("ns/name")."""
    used: dict[str, dict[str, int]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        fleet = pod_fleet(pod)
        if node and fleet:
            holder = fleet_id((pod.get("metadata") or {}).get("namespace", ""), fleet)
            per_fleet = used.setdefault(node, {})
            per_fleet[holder] = per_fleet.get(holder, 0) + 1
    return used


def profiles_by_node(pods: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Per node, the profile of each pod (terminating ones too) that runs there."""
    result: dict[str, list[str]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            result.setdefault(node, []).append(pod_profile(pod))
    return result


def pod_fleet(pod: Mapping[str, Any]) -> str | None:
    """The fleet a pod works for (its fleet label), if any."""
    labels: Mapping[str, str] = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(FLEET_LABEL)
