"""Unit tests of GPU profiles and node claims: who may hold which node, conflicts, patches."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from fleet_operator.names import (
    CLAIMS_ANNOTATION,
    DEVICE_PLUGIN_LABEL,
    PROFILE_LABEL,
    RESERVED_ANNOTATION,
)
from fleet_operator.sharing import (
    NodeView,
    claim_patch,
    device_plugin_config,
    node_view,
    patched,
    plan_claims,
    profile_key,
    release_patch,
)
from fleet_spec.spec import FleetSpec, GpuSpec, ModelSpec

ADA = "NVIDIA-RTX-6000-Ada-Generation"


def _node(
    name: str, *, product: str = ADA, gpus: int = 2, memory: int = 49140, **extra: Any
) -> NodeView:
    labels = {
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.count": str(gpus),
        "nvidia.com/gpu.memory": str(memory),
        **extra.pop("labels", {}),
    }
    annotations = {CLAIMS_ANNOTATION: extra.pop("claims")} if "claims" in extra else {}
    if "reserved" in extra:
        annotations[RESERVED_ANNOTATION] = extra.pop("reserved")
    status = {"allocatable": extra.pop("allocatable")} if "allocatable" in extra else {}
    raw = {
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": annotations,
            "resourceVersion": "7",
        },
        "spec": extra,
        "status": status,
    }
    return node_view(raw)


def _fleet(
    name: str = "a", replicas: int = 2, sharing: str = "timeSlicing", workers: int = 4
) -> FleetSpec:
    return FleetSpec(
        name=name,
        namespace="ns",
        model=ModelSpec(source="builtin:tiny"),
        replicas=replicas,
        gpu=GpuSpec(product=ADA, sharing=sharing, workers_per_gpu=workers),
    )


def test_profile_keys() -> None:
    assert profile_key(GpuSpec()) == "exclusive"
    assert profile_key(GpuSpec(sharing="timeSlicing", workers_per_gpu=4)) == "timeslicing-4"
    assert profile_key(GpuSpec(sharing="mps", workers_per_gpu=2)) == "mps-2"


def test_device_plugin_config_is_what_the_plugin_reads() -> None:
    text = device_plugin_config(GpuSpec(sharing="timeSlicing", workers_per_gpu=4))
    assert text is not None
    document = yaml.safe_load(text)
    assert document["version"] == "v1"
    assert document["sharing"]["timeSlicing"]["resources"] == [
        {"name": "nvidia.com/gpu", "replicas": 4}
    ]
    mps = yaml.safe_load(device_plugin_config(GpuSpec(sharing="mps", workers_per_gpu=3)) or "")
    assert mps["sharing"] == {"mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 3}]}}
    assert device_plugin_config(GpuSpec()) is None


def test_node_view_reads_labels_claims_and_the_shared_product() -> None:
    node = _node("n", product=ADA + "-SHARED", claims="ns/a,other/b", unschedulable=True)
    assert node.product == ADA
    assert node.claims == {"ns/a", "other/b"}
    assert node.gpus == 2
    assert node.memory_mib == 49140
    assert node.unschedulable


def test_a_small_fleet_claims_one_free_node() -> None:
    nodes = [_node("ada-1"), _node("ada-0"), _node("bw", product="Other")]
    plan = plan_claims(_fleet(replicas=8), nodes)
    assert plan.claim == ("ada-0",)
    assert plan.hold == ("ada-0",)
    assert plan.capacity.slots_available == 8
    assert plan.reserve == (("ada-0", 8),)
    # No pod until the node advertises the profile: it would get a whole GPU meanwhile.
    assert plan.desired_replicas == 0
    assert plan.pending == (("ada-0", "labelled now"),)
    assert not plan.conflicts
    shared = {PROFILE_LABEL: "timeslicing-4", DEVICE_PLUGIN_LABEL: "timeslicing-4"}
    advertising = _node(
        "ada-0",
        labels={
            **shared,
            "nvidia.com/gpu.replicas": "4",
            "nvidia.com/gpu.sharing-strategy": "time-slicing",
        },
        claims="ns/a",
        reserved="ns/a=8",
        allocatable={"nvidia.com/gpu": "8"},
    )
    plan = plan_claims(_fleet(replicas=8), [advertising, _node("ada-1")])
    assert (plan.hold, plan.claim, plan.pending) == (("ada-0",), (), ())
    assert plan.desired_replicas == 8


def test_pods_already_on_a_node_that_stops_advertising_are_kept() -> None:
    """A device plugin restart takes the slots away for a while: no pod is scaled away."""
    shared = {PROFILE_LABEL: "timeslicing-4", DEVICE_PLUGIN_LABEL: "timeslicing-4"}
    node = _node("ada-0", labels=shared, claims="ns/a", reserved="ns/a=8")
    plan = plan_claims(_fleet(replicas=8), [node], pods_on={"ada-0": ["timeslicing-4"] * 5})
    assert plan.pending
    assert plan.pending[0][1] == "no device plugin advertises nvidia.com/gpu on it"
    assert plan.desired_replicas == 5


def test_reservations_of_other_fleets_count_before_their_pods_exist() -> None:
    """Two same-profile fleets on one node: the second sees the slots the first reserved, not
    only the pods the first has made so far."""
    shared = {PROFILE_LABEL: "timeslicing-4", DEVICE_PLUGIN_LABEL: "timeslicing-4"}
    first = _node("ada-0", labels=shared, claims="ns/b", reserved="ns/b=6")
    plan = plan_claims(_fleet(replicas=4), [first, _node("ada-1")], used={"ada-0": {"ns/b": 2}})
    assert dict(plan.reserve) == {"ada-0": 2, "ada-1": 2}
    assert plan.hold == ("ada-0", "ada-1")
    # More pods than reserved (a scale-down not finished): the pods count.
    plan = plan_claims(_fleet(replicas=4), [first], used={"ada-0": {"ns/b": 7}})
    assert dict(plan.reserve) == {"ada-0": 1}
    assert plan.capacity.slots_available == 1


def test_a_new_key_is_not_selected_before_the_volume_can_hold_it() -> None:
    node = _node("ada-0")
    plan = plan_claims(_fleet(replicas=2), [node], config_ready=False)
    assert plan.hold == ("ada-0",)
    assert plan.pending[0][1].startswith("waiting for the kubelet")
    patch = claim_patch(node, "ns/a", "timeslicing-4", True, config_ready=False, reserve=2)
    assert patch is not None
    labels = patch["metadata"]["labels"]
    assert labels == {PROFILE_LABEL: "timeslicing-4", DEVICE_PLUGIN_LABEL: None}
    assert patch["metadata"]["annotations"][RESERVED_ANNOTATION] == "ns/a=2"
    # Once the key is old enough the label follows; a node that has it keeps it either way.
    held = patched(node, patch)
    later = claim_patch(held, "ns/a", "timeslicing-4", True, config_ready=True, reserve=2)
    assert later is not None
    assert later["metadata"]["labels"][DEVICE_PLUGIN_LABEL] == "timeslicing-4"
    labelled = patched(held, later)
    assert claim_patch(labelled, "ns/a", "timeslicing-4", True, config_ready=False, reserve=2) == {}


def test_release_drops_the_fleets_reservation() -> None:
    node = _node("ada-0", claims="ns/a,ns/b", reserved="ns/a=2,ns/b=3")
    patch = release_patch(node, "ns/a")
    assert patch["metadata"]["annotations"] == {
        CLAIMS_ANNOTATION: "ns/b",
        RESERVED_ANNOTATION: "ns/b=3",
    }
    last = release_patch(patched(node, patch), "ns/b")
    assert last["metadata"]["annotations"] == {CLAIMS_ANNOTATION: None, RESERVED_ANNOTATION: None}


def test_a_fleet_prefers_nodes_that_already_run_its_profile() -> None:
    nodes = [_node("ada-0"), _node("ada-1", labels={PROFILE_LABEL: "timeslicing-4"}, claims="x/y")]
    assert plan_claims(_fleet(replicas=2), nodes).claim == ("ada-1",)


def test_held_nodes_are_kept_and_more_are_claimed_on_scale_up() -> None:
    held = _node("ada-2", labels={PROFILE_LABEL: "timeslicing-4"}, claims="ns/a")
    plan = plan_claims(_fleet(replicas=12), [_node("ada-0"), _node("ada-1"), held])
    assert plan.hold == ("ada-0", "ada-2")
    assert plan.claim == ("ada-0",)


def test_another_profile_is_a_conflict_never_an_override() -> None:
    other = {"labels": {PROFILE_LABEL: "mps-2", DEVICE_PLUGIN_LABEL: "mps-2"}, "claims": "ns/b"}
    nodes = [_node("ada-0", **other)]
    plan = plan_claims(_fleet(replicas=2), nodes)
    assert plan.claim == ()
    assert plan.desired_replicas == 0
    assert [c.describe() for c in plan.conflicts] == ["ada-0 runs mps-2 (ns/b)"]
    assert claim_patch(nodes[0], "ns/a", "timeslicing-4", shared=True) is None


def test_a_conflict_is_reported_even_when_the_other_profile_fills_the_node() -> None:
    other = {"labels": {PROFILE_LABEL: "mps-2", DEVICE_PLUGIN_LABEL: "mps-2"}, "claims": "ns/b"}
    plan = plan_claims(_fleet(replicas=2), [_node("ada-0", **other)], used={"ada-0": {"ns/b": 8}})
    assert plan.claim == ()
    assert [c.describe() for c in plan.conflicts] == ["ada-0 runs mps-2 (ns/b)"]


def test_a_config_label_set_by_someone_else_is_respected() -> None:
    node = _node("ada-0", labels={DEVICE_PLUGIN_LABEL: "admin-choice"})
    plan = plan_claims(_fleet(), [node])
    assert plan.conflicts[0].profile == "admin-choice"
    assert plan.conflicts[0].describe() == "ada-0 runs admin-choice (set outside InferenceFleet)"


def test_conflicts_are_not_reported_when_free_nodes_suffice() -> None:
    busy = _node("ada-0", labels={PROFILE_LABEL: "mps-2"}, claims="ns/b")
    plan = plan_claims(_fleet(replicas=2), [busy, _node("ada-1")])
    assert plan.claim == ("ada-1",)
    assert plan.conflicts == ()


def test_exclusive_fleets_share_exclusive_nodes() -> None:
    node = _node("ada-0", labels={PROFILE_LABEL: "exclusive"}, claims="ns/b")
    plan = plan_claims(_fleet(replicas=2, sharing="none", workers=1), [node])
    assert plan.hold == ("ada-0",)
    assert plan.capacity.slots_available == 2


def test_a_node_held_alone_switches_to_the_new_profile() -> None:
    node = _node("ada-0", labels={PROFILE_LABEL: "timeslicing-4"}, claims="ns/a")
    plan = plan_claims(_fleet(replicas=2, sharing="mps", workers=2), [node])
    assert plan.claim == ("ada-0",)
    patch = claim_patch(node, "ns/a", "mps-2", shared=True)
    assert patch is not None
    assert patch["metadata"]["labels"] == {PROFILE_LABEL: "mps-2", DEVICE_PLUGIN_LABEL: "mps-2"}


def test_a_shared_node_with_an_old_profile_is_given_back() -> None:
    node = _node("ada-0", labels={PROFILE_LABEL: "timeslicing-4"}, claims="ns/a,ns/b")
    plan = plan_claims(_fleet(replicas=2, sharing="mps", workers=2), [node])
    assert plan.release == ("ada-0",)
    assert plan.hold == ()


def test_nodes_with_too_little_memory_are_not_claimed_but_reported() -> None:
    fleet = FleetSpec(
        name="a",
        namespace="ns",
        model=ModelSpec(source="builtin:tiny"),
        gpu=GpuSpec(
            product=ADA, sharing="timeSlicing", workers_per_gpu=64, memory_per_worker_mib=2048
        ),
    )
    plan = plan_claims(fleet, [_node("ada-0")])
    assert plan.claim == ()
    assert plan.capacity.reason == "InsufficientGPUMemory"
    assert plan.capacity.hosts_too_small == ("ada-0",)


def test_taints_and_node_selector_limit_the_candidates() -> None:
    tainted = _node("ada-0", taints=[{"key": "dedicated", "value": "x", "effect": "NoSchedule"}])
    gpu_taint = _node("ada-1", taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}])
    plan = plan_claims(_fleet(replicas=16), [tainted, gpu_taint])
    assert plan.hold == ("ada-1",)  # the GPU taint is always tolerated
    tolerant = FleetSpec(
        name="a",
        namespace="ns",
        model=ModelSpec(source="builtin:tiny"),
        replicas=16,
        gpu=GpuSpec(product=ADA, sharing="timeSlicing", workers_per_gpu=4),
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "x"}],
        node_selector={"zone": "a"},
    )
    assert plan_claims(tolerant, [tainted, gpu_taint]).hold == ()
    zoned = _node("ada-2", labels={"zone": "a"})
    assert plan_claims(tolerant, [tainted, zoned]).hold == ("ada-2",)


def test_claim_patch_is_guarded_and_idempotent() -> None:
    node = _node("ada-0")
    patch = claim_patch(node, "ns/a", "timeslicing-4", shared=True)
    assert patch == {
        "metadata": {
            "resourceVersion": "7",
            "labels": {PROFILE_LABEL: "timeslicing-4", DEVICE_PLUGIN_LABEL: "timeslicing-4"},
            "annotations": {CLAIMS_ANNOTATION: "ns/a"},
        }
    }
    held = _node(
        "ada-0",
        labels={PROFILE_LABEL: "timeslicing-4", DEVICE_PLUGIN_LABEL: "timeslicing-4"},
        claims="ns/a",
    )
    assert claim_patch(held, "ns/a", "timeslicing-4", shared=True) == {}


def test_the_last_holder_removes_the_labels() -> None:
    shared = {PROFILE_LABEL: "timeslicing-4", DEVICE_PLUGIN_LABEL: "timeslicing-4"}
    two = _node("ada-0", labels=shared, claims="ns/a,ns/b")
    assert release_patch(two, "ns/a")["metadata"] == {
        "resourceVersion": "7",
        "annotations": {CLAIMS_ANNOTATION: "ns/b"},
    }
    one = _node("ada-0", labels=shared, claims="ns/a")
    assert release_patch(one, "ns/a")["metadata"] == {
        "resourceVersion": "7",
        "labels": {PROFILE_LABEL: None, DEVICE_PLUGIN_LABEL: None},
        "annotations": {CLAIMS_ANNOTATION: None, RESERVED_ANNOTATION: None},
    }
    assert release_patch(_node("ada-0"), "ns/a") == {}


CORDON = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
NOT_READY = {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}
MAINTENANCE = {"key": "example.com/maintenance", "effect": "NoSchedule"}
HELD_TS4 = {"claims": "ns/a", "labels": {PROFILE_LABEL: "timeslicing-4"}}


@pytest.mark.parametrize(
    ("case", "nodes", "pods_on", "replicas", "hold", "release", "claim"),
    [
        # Kubernetes' own taints keep a held node (its pods may still run), a user's taint not.
        ("cordoned", [_node("n0", unschedulable=True, taints=[CORDON], **HELD_TS4)],
         {"n0": ["timeslicing-4"]}, 2, ["n0"], [], []),
        ("not ready", [_node("n0", taints=[NOT_READY], **HELD_TS4)],
         {"n0": ["timeslicing-4"]}, 2, ["n0"], [], []),
        ("foreign taint", [_node("n0", taints=[MAINTENANCE], **HELD_TS4)],
         {}, 2, [], ["n0"], []),
        # A cordoned free node is not claimed.
        ("cordoned, free", [_node("n0", unschedulable=True, taints=[CORDON])], {}, 2, [], [], []),
        # Scaling down gives back nodes without pods once the rest cover the replicas.
        ("scale to 0", [_node("n0", **HELD_TS4), _node("n1", **HELD_TS4)], {}, 0,
         [], ["n0", "n1"], []),
        ("scale down", [_node("n0", **HELD_TS4), _node("n1", **HELD_TS4)],
         {"n1": ["timeslicing-4"]}, 8, ["n1"], ["n0"], []),
        ("pods still leaving", [_node("n0", **HELD_TS4)], {"n0": ["timeslicing-4"]}, 0,
         ["n0"], [], []),
        ("claimed, pods not placed yet", [_node("n0", **HELD_TS4), _node("n1", **HELD_TS4)],
         {"n1": ["timeslicing-4"]}, 16, ["n0", "n1"], [], []),
        # A node held alone switches profile only once the old profile's pods left.
        ("old pods run", [_node("n0", claims="ns/a", labels={PROFILE_LABEL: "mps-4"})],
         {"n0": ["mps-4"]}, 2, [], [], []),
        ("old pods gone", [_node("n0", claims="ns/a", labels={PROFILE_LABEL: "mps-4"})],
         {"n0": ["timeslicing-4"]}, 2, ["n0"], [], ["n0"]),
    ],
)  # fmt: skip
def test_plan_claims_table(
    case: str,
    nodes: list[NodeView],
    pods_on: dict[str, list[str]],
    replicas: int,
    hold: list[str],
    release: list[str],
    claim: list[str],
) -> None:
    plan = plan_claims(_fleet(replicas=replicas), nodes, pods_on)
    assert (list(plan.hold), list(plan.release), list(plan.claim)) == (hold, release, claim), case


def test_a_profile_change_waits_and_says_so() -> None:
    nodes = [_node("n0", claims="ns/a", labels={PROFILE_LABEL: "mps-4"})]
    plan = plan_claims(_fleet(), nodes, {"n0": ["mps-4"]})
    assert plan.waiting == ("n0",)


@pytest.mark.parametrize(
    ("labels", "refused"),
    [
        ({"nvidia.com/mig.strategy": "single"}, True),
        ({"nvidia.com/mig.strategy": "mixed"}, True),
        ({"nvidia.com/mig.config": "all-1g.24gb"}, True),
        ({"nvidia.com/mig.strategy": "none", "nvidia.com/mig.config": "all-disabled"}, False),
        ({"nvidia.com/mig.capable": "true"}, False),  # able, but MIG mode is off
    ],
)
def test_mps_is_refused_on_gpus_in_mig_mode(labels: dict[str, str], refused: bool) -> None:
    nodes = [_node("n0", labels=labels)]
    mps = plan_claims(_fleet(sharing="mps"), nodes)
    assert bool(mps.mig_refused) == refused
    assert list(mps.hold) == ([] if refused else ["n0"])
    time_slicing = plan_claims(_fleet(), nodes)  # time-slicing is not refused
    assert list(time_slicing.hold) == ["n0"]
    assert not time_slicing.mig_refused


def test_slots_other_fleets_use_are_not_counted_free() -> None:
    nodes = [_node("n0", claims="ns/other", labels={PROFILE_LABEL: "timeslicing-4"}), _node("n1")]
    plan = plan_claims(
        _fleet(replicas=8), nodes, {}, {"n0": {"ns/other": 8}}
    )  # n0's 8 slots are taken
    assert list(plan.hold) == ["n1"]
    assert plan.capacity.slots_available == 8
    shared = plan_claims(
        _fleet(replicas=8), nodes, {}, {"n0": {"ns/other": 6}}
    )  # 2 left on n0, 6 from n1
    assert list(shared.hold) == ["n0", "n1"]
    assert shared.capacity.slots_available == 10
