"""Fleet status, computed from what was observed (Deployment, pods, nodes), never accumulated."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet_spec.spec import FleetSpec

from fleet_operator.names import GENERATION_ANNOTATION, selector
from fleet_operator.sharing import EXCLUSIVE, ClaimPlan


@dataclass(frozen=True)
class Observed:
    """One look at the cluster for one fleet."""

    generation: int
    deployment: Mapping[str, Any] | None
    pods: Sequence[Mapping[str, Any]]
    plan: ClaimPlan
    not_owned: tuple[str, ...] = ()  # children's names taken by objects this fleet does not own
    configmap_missing: str | None = None  # "ns/name" of the device plugin's ConfigMap, not found


def _condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def _stamp(
    conditions: list[dict[str, Any]],
    previous: Sequence[Mapping[str, Any]],
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Add observedGeneration and lastTransitionTime (kept while the status does not change)."""
    before = {c.get("type"): c for c in previous}
    for condition in conditions:
        old = before.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"]
        condition["lastTransitionTime"] = (
            old.get("lastTransitionTime", now) if same and old else now
        )
        condition["observedGeneration"] = generation
    return conditions


def pods_per_node(
    pods: Sequence[Mapping[str, Any]], processes_per_pod: int
) -> list[dict[str, Any]]:
    """Scheduled, not terminating worker pods per node, and the worker processes they run."""
    per_node = Counter(
        pod["spec"]["nodeName"]
        for pod in pods
        if pod.get("spec", {}).get("nodeName") and not pod["metadata"].get("deletionTimestamp")
    )
    return [
        {"node": node, "pods": count, "workers": count * processes_per_pod}
        for node, count in sorted(per_node.items())
    ]


def _deployment_counts(deployment: Mapping[str, Any] | None) -> dict[str, int]:
    status = (deployment or {}).get("status") or {}
    return {
        key: int(status.get(key) or 0)
        for key in ("replicas", "readyReplicas", "updatedReplicas", "availableReplicas")
    }


def _rolled_out(
    deployment: Mapping[str, Any] | None, desired: int, counts: Mapping[str, int]
) -> bool:
    if deployment is None:
        return False
    seen = int((deployment.get("status") or {}).get("observedGeneration") or 0)
    if seen < int(deployment["metadata"].get("generation") or 0):
        return False
    return counts["updatedReplicas"] == desired and counts["replicas"] == desired


def observed_generation(observed: Observed, previous: Mapping[str, Any]) -> int | None:
    """The fleet generation the Deployment reflects, once the Deployment controller has seen it."""
    deployment = observed.deployment
    if deployment is None:
        return None
    seen = int((deployment.get("status") or {}).get("observedGeneration") or 0)
    if seen >= int(deployment["metadata"].get("generation") or 0):
        annotations = deployment["metadata"].get("annotations") or {}
        if GENERATION_ANNOTATION in annotations:
            return int(annotations[GENERATION_ANNOTATION])
    old = previous.get("observedGeneration")
    return int(old) if old is not None else None


def _sharing_condition(plan: ClaimPlan, configmap_missing: str | None) -> dict[str, Any]:
    if plan.mig_refused and not plan.capacity.fits:
        return _condition(
            "GPUSharing",
            False,
            "MIGMode",
            f"MPS sharing cannot run on GPUs in MIG mode: {', '.join(plan.mig_refused)}; "
            "use timeSlicing or sharing none there, or turn MIG off on those nodes",
        )
    if plan.conflicts:
        held = ", ".join(c.describe() for c in plan.conflicts)
        return _condition(
            "GPUSharing",
            False,
            "ProfileConflict",
            f"needs nodes with profile {plan.profile}, but {held}; those nodes are left alone",
        )
    if configmap_missing:
        return _condition(
            "GPUSharing",
            False,
            "DevicePluginConfigMissing",
            f"the device plugin's ConfigMap {configmap_missing} does not exist: the operator "
            "creates it with a key that shares nothing, but a device plugin started without it "
            "never reads it; install NVIDIA's device plugin with config.name (or the GPU "
            "Operator with devicePlugin.config.name) set to it, or set the chart's "
            "devicePlugin.createConfigMap, then restart the device plugin pods",
        )
    if plan.waiting:
        return _condition(
            "GPUSharing",
            False,
            "ProfileChangeWaiting",
            f"{', '.join(plan.waiting)} switch to profile {plan.profile} once the pods placed "
            "under the old profile have left",
        )
    if plan.pending:
        pending = "; ".join(f"{node} pending: {why}" for node, why in plan.pending)
        return _condition(
            "GPUSharing",
            False,
            "ProfilePending",
            f"profile {plan.profile} not advertised yet: {pending} (the device plugin reads "
            "its ConfigMap through a volume the kubelet refreshes about a minute late)",
        )
    where = ", ".join(plan.hold) if plan.hold else "no nodes yet"
    reason = "Exclusive" if plan.profile == EXCLUSIVE else "ProfileApplied"
    return _condition("GPUSharing", True, reason, f"profile {plan.profile} on {where}")


def _owned_condition(not_owned: Sequence[str]) -> dict[str, Any]:
    if not not_owned:
        return _condition("ChildrenOwned", True, "AllOwned", "every child is this fleet's")
    return _condition(
        "ChildrenOwned",
        False,
        "NotOwned",
        f"{', '.join(not_owned)} already exist and are not this fleet's: left alone "
        "(rename the fleet, or delete them to let the fleet create its own)",
    )


def compute_status(
    spec: FleetSpec, observed: Observed, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """The whole status subresource for this observation."""
    plan, capacity = observed.plan, observed.plan.capacity
    counts = _deployment_counts(observed.deployment)
    desired = plan.desired_replicas
    rolled_out = _rolled_out(observed.deployment, desired, counts)
    generation = observed_generation(observed, previous)
    current = generation == observed.generation
    ready = current and rolled_out and desired == spec.replicas
    ready = ready and counts["readyReplicas"] >= spec.replicas
    if observed.not_owned:
        ready, ready_reason = False, "NotOwned"
    elif ready:
        ready_reason = "AllWorkersReady"
    elif not capacity.fits:
        ready_reason = capacity.reason
    elif plan.conflicts:
        ready_reason = "ProfileConflict"
    else:
        ready_reason = "WorkersNotReady"
    short = not capacity.fits or bool(plan.conflicts)
    unavailable = rolled_out and counts["readyReplicas"] < desired
    conditions = [
        _condition(
            "Ready",
            ready,
            ready_reason,
            f"{counts['readyReplicas']}/{spec.replicas} worker pods ready",
        ),
        _condition(
            "Progressing",
            not rolled_out,
            "Complete" if rolled_out else "RollingOut",
            f"{counts['updatedReplicas']}/{desired} pods updated, {counts['replicas']} exist",
        ),
        _condition(
            "Degraded",
            short or unavailable,
            ready_reason if short else ("WorkersUnavailable" if unavailable else "AsExpected"),
            capacity.message() if short else f"{counts['readyReplicas']}/{desired} pods ready",
        ),
        _condition("GPUCapacity", capacity.fits, capacity.reason, capacity.message()),
        _sharing_condition(plan, observed.configmap_missing),
        _owned_condition(observed.not_owned),
    ]
    status: dict[str, Any] = {
        **counts,
        "selector": selector(spec.name),
        "gpu": {
            "profile": plan.profile,
            "slotsNeeded": capacity.slots_needed,
            "slotsAvailable": capacity.slots_available,
            "memoryNeededMiBPerGPU": capacity.memory_needed_mib,
            "nodes": list(plan.hold),
            "applied": list(plan.applied),
            "pending": [{"node": node, "reason": why} for node, why in plan.pending],
            "summary": capacity.summary(),
        },
        "placement": pods_per_node(observed.pods, spec.processes_per_pod),
        "conditions": _stamp(
            conditions, previous.get("conditions") or [], observed.generation, now
        ),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def failed_status(
    reason: str, message: str, generation: int, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """Status of a fleet that could not be reconciled (InvalidSpec, or what the API refused):
    Ready False and Degraded True with the reason and message, the rest untouched."""
    conditions = [
        c for c in previous.get("conditions") or [] if c.get("type") not in ("Ready", "Degraded")
    ]
    fresh = [
        _condition("Ready", False, reason, message),
        _condition("Degraded", True, reason, message),
    ]
    return {
        "conditions": conditions + _stamp(fresh, previous.get("conditions") or [], generation, now)
    }


# Conditions whose changes are worth an Event, and the Event type when the condition is False.
_EVENTFUL = {
    "Ready": "Normal",
    "GPUCapacity": "Warning",
    "GPUSharing": "Warning",
    "ChildrenOwned": "Warning",
}


def condition_events(
    previous: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]
) -> list[tuple[str, str, str]]:
    """(type, reason, message) for each eventful condition whose status or reason changed."""
    before = {c.get("type"): c for c in previous}
    events = []
    for condition in current:
        kind = condition["type"]
        if kind not in _EVENTFUL:
            continue
        old = before.get(kind) or {}
        if (old.get("status"), old.get("reason")) == (condition["status"], condition["reason"]):
            continue
        if condition["status"] == "True" and kind != "Ready" and not old:
            continue  # a fleet that fits from the start needs no event saying so
        level = "Normal" if condition["status"] == "True" else _EVENTFUL[kind]
        events.append((level, condition["reason"], condition["message"]))
    return events
