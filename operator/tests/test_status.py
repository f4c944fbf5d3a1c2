"""Unit tests of the status computation: counts, conditions, placement, events, all from dicts."""

from __future__ import annotations

from typing import Any

from fleet_operator.names import CLAIMS_ANNOTATION, DEVICE_PLUGIN_LABEL, PROFILE_LABEL
from fleet_operator.sharing import node_view, plan_claims
from fleet_operator.status import Observed, compute_status, condition_events, failed_status
from fleet_spec.spec import FleetSpec, GpuSpec, ModelSpec

ADA = "NVIDIA-RTX-6000-Ada-Generation"
NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"


def _spec(replicas: int = 4) -> FleetSpec:
    return FleetSpec(
        name="f",
        namespace="ns",
        model=ModelSpec(source="builtin:tiny"),
        replicas=replicas,
        processes_per_pod=2,
        gpu=GpuSpec(product=ADA, sharing="timeSlicing", workers_per_gpu=4),
    )


def _node(name: str, held: bool = True, advertises: bool = True) -> Any:
    """An Ada node with one GPU; held by fleet f, and then (unless not `advertises`) running
    its profile as the device plugin and feature discovery report it."""
    meta: dict[str, Any] = {
        "name": name,
        "labels": {"nvidia.com/gpu.product": ADA, "nvidia.com/gpu.count": "1"},
    }
    status: dict[str, Any] = {}
    if held:
        meta["labels"][PROFILE_LABEL] = "timeslicing-4"
        meta["annotations"] = {CLAIMS_ANNOTATION: "ns/f"}
    if held and advertises:
        meta["labels"][DEVICE_PLUGIN_LABEL] = "timeslicing-4"
        meta["labels"]["nvidia.com/gpu.replicas"] = "4"
        meta["labels"]["nvidia.com/gpu.sharing-strategy"] = "time-slicing"
        status["allocatable"] = {"nvidia.com/gpu": "4"}
    return node_view({"metadata": meta, "status": status})


def _deployment(
    replicas: int, ready: int, updated: int | None = None, gen: int = 2
) -> dict[str, Any]:
    return {
        "metadata": {
            "generation": 5,
            "annotations": {"inferencefleet.dev/fleet-generation": str(gen)},
        },
        "status": {
            "observedGeneration": 5,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "availableReplicas": ready,
        },
    }


def _pod(node: str | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p"}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}}


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def _observe(spec: FleetSpec, deployment: Any, pods: Any = (), nodes: Any = None) -> Observed:
    nodes = [_node("ada-0")] if nodes is None else nodes
    return Observed(
        generation=2, deployment=deployment, pods=list(pods), plan=plan_claims(spec, nodes)
    )


def test_all_ready_fleet() -> None:
    spec = _spec(4)
    pods = [_pod("ada-0"), _pod("ada-0"), _pod("ada-0"), _pod("ada-0"), _pod(None)]
    status = compute_status(spec, _observe(spec, _deployment(4, 4), pods), {}, NOW)
    assert status["replicas"] == 4
    assert status["readyReplicas"] == 4
    assert status["observedGeneration"] == 2
    assert status["selector"] == "inferencefleet.dev/fleet=f"
    assert status["placement"] == [{"node": "ada-0", "pods": 4, "workers": 8}]
    assert status["gpu"] == {
        "profile": "timeslicing-4",
        "slotsNeeded": 4,
        "slotsAvailable": 4,
        "memoryNeededMiBPerGPU": 4 * 2 * 2048,
        "nodes": ["ada-0"],
        "applied": ["ada-0"],
        "pending": [],
        "summary": "4/4",
    }
    assert _conditions(status) == {
        "Ready": ("True", "AllWorkersReady"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("False", "AsExpected"),
        "GPUCapacity": ("True", "Fits"),
        "GPUSharing": ("True", "ProfileApplied"),
        "ChildrenOwned": ("True", "AllOwned"),
    }
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])


def test_a_node_not_advertising_holds_the_replicas_back_and_says_why() -> None:
    spec = _spec(4)
    observed = _observe(spec, _deployment(0, 0), nodes=[_node("ada-0", advertises=False)])
    status = compute_status(spec, observed, {}, NOW)
    assert observed.plan.desired_replicas == 0
    assert _conditions(status)["GPUSharing"] == ("False", "ProfilePending")
    assert status["gpu"]["pending"] == [{"node": "ada-0", "reason": "labelled now"}]


def test_a_missing_device_plugin_configmap_is_a_condition_naming_it() -> None:
    spec = _spec(4)
    observed = _observe(spec, _deployment(4, 4))
    missing = Observed(**{**observed.__dict__, "configmap_missing": "gpu/plugin-config"})
    condition = next(
        c for c in compute_status(spec, missing, {}, NOW)["conditions"] if c["type"] == "GPUSharing"
    )
    assert (condition["status"], condition["reason"]) == ("False", "DevicePluginConfigMissing")
    assert "gpu/plugin-config" in condition["message"]


def test_rolling_out_is_progressing_not_ready() -> None:
    spec = _spec(4)
    status = compute_status(spec, _observe(spec, _deployment(4, 3, updated=2)), {}, NOW)
    assert _conditions(status)["Ready"] == ("False", "WorkersNotReady")
    assert _conditions(status)["Progressing"] == ("True", "RollingOut")


def test_an_older_generation_is_not_ready() -> None:
    spec = _spec(4)
    status = compute_status(spec, _observe(spec, _deployment(4, 4, gen=1)), {}, NOW)
    assert status["observedGeneration"] == 1
    assert _conditions(status)["Ready"][0] == "False"


def test_a_fleet_that_does_not_fit_says_so_with_numbers() -> None:
    spec = _spec(6)
    status = compute_status(spec, _observe(spec, _deployment(4, 4)), {}, NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["GPUCapacity"]["status"] == "False"
    assert conditions["GPUCapacity"]["reason"] == "InsufficientGPUSlots"
    assert "needs 6 GPU slots" in conditions["GPUCapacity"]["message"]
    assert "4 slots available" in conditions["GPUCapacity"]["message"]
    assert conditions["Ready"]["reason"] == "InsufficientGPUSlots"
    assert conditions["Degraded"]["status"] == "True"
    # what runs is complete: the Deployment asked only for what fits
    assert conditions["Progressing"]["status"] == "False"


def test_conflict_is_a_condition() -> None:
    spec = _spec(4)
    taken = node_view(
        {
            "metadata": {
                "name": "ada-1",
                "labels": {
                    "nvidia.com/gpu.product": ADA,
                    "nvidia.com/gpu.count": "1",
                    PROFILE_LABEL: "mps-2",
                },
                "annotations": {CLAIMS_ANNOTATION: "other/g"},
            }
        }
    )
    status = compute_status(spec, _observe(spec, None, nodes=[taken]), {}, NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["GPUSharing"]["reason"] == "ProfileConflict"
    assert "ada-1 runs mps-2 (other/g)" in conditions["GPUSharing"]["message"]
    assert "observedGeneration" not in status


def test_transition_time_stays_while_the_status_holds() -> None:
    spec = _spec(4)
    first = compute_status(spec, _observe(spec, _deployment(4, 4)), {}, NOW)
    second = compute_status(spec, _observe(spec, _deployment(4, 4)), first, LATER)
    assert second == first
    third = compute_status(spec, _observe(spec, _deployment(4, 2)), second, LATER)
    ready = next(c for c in third["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == LATER


def test_terminating_pods_are_not_placed() -> None:
    spec = _spec(1)
    pods = [_pod("ada-0", deleting=True), _pod("ada-0")]
    status = compute_status(spec, _observe(spec, _deployment(1, 1), pods), {}, NOW)
    assert status["placement"] == [{"node": "ada-0", "pods": 1, "workers": 2}]


def test_events_on_transitions_only() -> None:
    spec = _spec(6)
    short = compute_status(spec, _observe(spec, _deployment(4, 4)), {}, NOW)
    events = condition_events([], short["conditions"])
    assert ("Warning", "InsufficientGPUSlots") in [(kind, reason) for kind, reason, _ in events]
    assert condition_events(short["conditions"], short["conditions"]) == []
    fits = compute_status(_spec(4), _observe(_spec(4), _deployment(4, 4)), short, LATER)
    reasons = [reason for _, reason, _ in condition_events(short["conditions"], fits["conditions"])]
    assert reasons == ["AllWorkersReady", "Fits"]


def test_invalid_spec_status() -> None:
    status = failed_status("InvalidSpec", "spec.replicas: must be >= 0", 4, {}, NOW)
    assert _conditions(status) == {
        "Ready": ("False", "InvalidSpec"),
        "Degraded": ("True", "InvalidSpec"),
    }
