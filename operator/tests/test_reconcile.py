"""Reconcile passes on the in-memory FakeKube: claims, conflicts, release, invalid specs,
children deleted by hand or taken by someone else, API refusals, and a pass at rest."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from fleet_operator.decide import Settings, covers, owns
from fleet_operator.kube import ApiError, ConfigMapRef
from fleet_operator.kube_fake import FakeKube
from fleet_operator.names import (
    CLAIMS_ANNOTATION,
    DEVICE_PLUGIN_LABEL,
    FLEET_LABEL,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    PROFILE_LABEL,
    RESERVED_ANNOTATION,
)
from fleet_operator.reconcile import Reconciler, Retry, SpecInvalid

ADA = "NVIDIA-RTX-6000-Ada-Generation"
PLUGIN = ConfigMapRef("device-plugin-config", "nvidia-device-plugin")
NOW = "2026-01-01T00:00:00Z"


def node(name: str, gpus: int = 2, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "nvidia.com/gpu.product": ADA,
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.memory": "49140",
                **labels,
            },
            "annotations": {},
        },
        "spec": {},
        "status": {"capacity": {"nvidia.com/gpu": str(gpus)}},
    }


def fleet(name: str = "detector", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "replicas": 2,
        "model": {"source": "builtin:tiny"},
        "gpu": {"product": ADA, "sharing": "timeSlicing", "workersPerGPU": 2},
    }
    body.update(spec)
    return {
        "apiVersion": "inferencefleet.dev/v1alpha1",
        "kind": "InferenceFleet",
        "metadata": {"name": name, "namespace": "vision"},
        "spec": body,
    }


@pytest.fixture
def kube() -> FakeKube:
    fake = FakeKube()
    fake.add_node(node("ada-0"))
    return fake


@pytest.fixture
def reconciler(kube: FakeKube) -> Reconciler:
    """A reconciler for a cluster whose ConfigMap volumes do not lag (delay 0)."""
    return Reconciler(
        kube, Settings(worker_image="worker:1"), PLUGIN, clock=lambda: NOW, config_volume_delay=0
    )


def run(reconciler: Reconciler, kube: FakeKube, name: str = "detector") -> None:
    reconciler.reconcile(kube.observe("vision", name))


def condition(kube: FakeKube, kind: str, name: str = "detector") -> dict[str, Any]:
    conditions = kube.fleet("vision", name).get("status", {}).get("conditions", [])
    return next(c for c in conditions if c["type"] == kind)


def test_first_pass_claims_renders_and_reports(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)
    labels = kube.nodes["ada-0"]["metadata"]["labels"]
    assert labels[PROFILE_LABEL] == labels[DEVICE_PLUGIN_LABEL] == "timeslicing-2"
    assert kube.nodes["ada-0"]["metadata"]["annotations"][CLAIMS_ANNOTATION] == "vision/detector"
    assert "timeslicing-2" in kube.configmaps[PLUGIN]
    kinds = sorted(kind for kind, ns, _ in kube.objects if ns == "vision")
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    # No pod before the node advertises the profile: it would get a whole GPU meanwhile.
    assert kube.objects[("Deployment", "vision", "detector")]["spec"]["replicas"] == 0
    assert kube.fleet("vision", "detector")["status"]["gpu"]["nodes"] == ["ada-0"]
    assert ("vision/detector", "Normal", "NodesClaimed") in [e[:3] for e in kube.events]
    advertise(kube, "ada-0", 2, "time-slicing")
    run(reconciler, kube)
    assert kube.objects[("Deployment", "vision", "detector")]["spec"]["replicas"] == 2


def test_a_pass_at_rest_writes_nothing(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)
    run(reconciler, kube)  # the status now sees the Deployment the first pass made
    kube.writes.clear()
    run(reconciler, kube)
    assert kube.writes == []


def test_the_profile_is_written_before_a_node_selects_it(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)
    assert kube.writes.index("patch configmap nvidia-device-plugin/device-plugin-config") < (
        kube.writes.index("patch node ada-0")
    )


def test_a_child_deleted_by_hand_is_recreated(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)
    run(reconciler, kube)
    del kube.objects[("Service", "vision", "detector")]
    kube.writes.clear()
    run(reconciler, kube)
    assert kube.writes == ["apply Service vision/detector"]
    assert ("Service", "vision", "detector") in kube.objects


def test_a_child_edited_by_hand_is_put_back(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)
    advertise(kube, "ada-0", 2, "time-slicing")
    kube.objects[("Deployment", "vision", "detector")]["spec"]["replicas"] = 7
    run(reconciler, kube)
    assert kube.objects[("Deployment", "vision", "detector")]["spec"]["replicas"] == 2


def test_an_object_someone_else_made_is_left_alone(kube: FakeKube, reconciler: Reconciler) -> None:
    theirs = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "detector", "namespace": "vision", "uid": "theirs"},
        "spec": {"replicas": 5},
    }
    kube.objects[("Deployment", "vision", "detector")] = copy.deepcopy(theirs)
    kube.add_fleet(fleet())
    run(reconciler, kube)
    assert kube.objects[("Deployment", "vision", "detector")] == theirs
    owned = condition(kube, "ChildrenOwned")
    assert (owned["status"], owned["reason"]) == ("False", "NotOwned")
    assert "Deployment vision/detector" in owned["message"]
    assert condition(kube, "Ready")["reason"] == "NotOwned"
    assert any(e[2] == "NotOwned" and "vision/detector" in e[3] for e in kube.events)
    assert ("Service", "vision", "detector") in kube.objects  # the rest is made


def test_no_pods_are_made_on_a_config_someone_else_owns(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    theirs = {"kind": "ConfigMap", "metadata": {"name": "detector-batching", "namespace": "vision"}}
    kube.objects[("ConfigMap", "vision", "detector-batching")] = copy.deepcopy(theirs)
    kube.add_fleet(fleet())
    run(reconciler, kube)
    assert ("Deployment", "vision", "detector") not in kube.objects
    assert kube.objects[("ConfigMap", "vision", "detector-batching")] == theirs


def test_an_object_that_appears_between_look_and_write_is_not_taken(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet())
    observations = kube.observe("vision", "detector")
    theirs = {"kind": "Service", "metadata": {"name": "detector", "namespace": "vision"}}
    kube.objects[("Service", "vision", "detector")] = copy.deepcopy(theirs)
    with pytest.raises(Retry, match="not this fleet's"):
        reconciler.reconcile(observations)
    assert kube.objects[("Service", "vision", "detector")] == theirs


def test_claims_of_a_fleet_that_no_longer_exists_are_dropped(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.nodes["ada-0"]["metadata"]["labels"].update(
        {PROFILE_LABEL: "mps-2", DEVICE_PLUGIN_LABEL: "mps-2"}
    )
    kube.nodes["ada-0"]["metadata"]["annotations"][CLAIMS_ANNOTATION] = "vision/ghost"
    kube.configmaps[PLUGIN] = {"mps-2": "old", "default": "keep"}
    kube.add_fleet(fleet())
    run(reconciler, kube)
    meta = kube.nodes["ada-0"]["metadata"]
    assert meta["annotations"][CLAIMS_ANNOTATION] == "vision/detector"
    assert meta["labels"][DEVICE_PLUGIN_LABEL] == "timeslicing-2"
    assert set(kube.configmaps[PLUGIN]) == {"timeslicing-2", "default"}
    assert condition(kube, "GPUSharing")["reason"] == "ProfilePending"  # labelled just now


def test_a_node_held_under_another_profile_is_a_conflict(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet("first", gpu={"product": ADA, "sharing": "mps", "workersPerGPU": 2}))
    run(reconciler, kube, "first")
    kube.add_fleet(fleet("second"))
    before = copy.deepcopy(kube.nodes["ada-0"])
    run(reconciler, kube, "second")
    assert kube.nodes["ada-0"] == before
    sharing = condition(kube, "GPUSharing", "second")
    assert (sharing["status"], sharing["reason"]) == ("False", "ProfileConflict")
    assert "vision/first" in sharing["message"]
    assert kube.objects[("Deployment", "vision", "second")]["spec"]["replicas"] == 0


def test_release_gives_the_nodes_and_the_profile_back(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)
    released = reconciler.release(kube.observe("vision", "detector"))
    assert released == ["ada-0"]
    meta = kube.nodes["ada-0"]["metadata"]
    assert PROFILE_LABEL not in meta["labels"]
    assert DEVICE_PLUGIN_LABEL not in meta["labels"]
    assert CLAIMS_ANNOTATION not in meta["annotations"]
    assert "timeslicing-2" not in kube.configmaps[PLUGIN]


def test_release_leaves_what_another_fleet_still_uses(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet("one", replicas=1))
    kube.add_fleet(fleet("two", replicas=1))
    run(reconciler, kube, "one")
    run(reconciler, kube, "two")
    reconciler.release(kube.observe("vision", "one"))
    meta = kube.nodes["ada-0"]["metadata"]
    assert meta["annotations"][CLAIMS_ANNOTATION] == "vision/two"
    assert meta["labels"][DEVICE_PLUGIN_LABEL] == "timeslicing-2"
    assert "timeslicing-2" in kube.configmaps[PLUGIN]


def test_an_invalid_spec_is_reported_and_nothing_is_made(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet(replicas=-1))
    with pytest.raises(SpecInvalid, match=r"spec\.replicas"):
        run(reconciler, kube)
    ready = condition(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert kube.objects == {}
    assert "nvidia.com/gpu.product" in kube.nodes["ada-0"]["metadata"]["labels"]
    assert PROFILE_LABEL not in kube.nodes["ada-0"]["metadata"]["labels"]


def test_an_api_refusal_is_reported_with_its_message_and_backs_off(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet())
    message = 'deployments.apps "detector" is forbidden: User cannot patch'
    kube.refuse["apply Deployment"] = (403, "Forbidden", message)
    with pytest.raises(ApiError):
        run(reconciler, kube)
    ready = condition(kube, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Forbidden")
    assert message in ready["message"]
    assert any(e[1:3] == ("Warning", "Forbidden") and message in e[3] for e in kube.events)
    body = kube.fleet("vision", "detector")
    first = reconciler.backing_off(body)
    assert first > 0
    with pytest.raises(ApiError):
        run(reconciler, kube)
    assert reconciler.backing_off(body) > first  # longer each time

    del kube.refuse["apply Deployment"]
    body["metadata"]["generation"] = 2  # a new spec is tried at once
    assert reconciler.backing_off(body) == 0
    run(reconciler, kube)
    assert condition(kube, "Ready")["reason"] != "Forbidden"


def test_an_invalid_write_says_so(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.add_fleet(fleet())
    kube.refuse["apply Deployment"] = (422, "Invalid", "spec.template: Invalid value")
    with pytest.raises(ApiError) as caught:
        run(reconciler, kube)
    assert caught.value.will_not_heal
    assert condition(kube, "Ready")["reason"] == "Invalid"


@pytest.mark.parametrize(
    ("observed", "desired", "covered"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),
        ({"limits": {"nvidia.com/gpu": "1"}}, {"limits": {"nvidia.com/gpu": 1}}, True),
        ({}, {"publishNotReadyAddresses": False}, True),  # the API leaves false out
        ({"replicas": 7}, {"replicas": 2}, False),
        ({"args": ["--a", "1"]}, {"args": ["--a", "1", "--b"]}, False),
        ({}, {"image": "worker:1"}, False),
    ],
)
def test_covers_is_a_subset_test(observed: Any, desired: Any, covered: bool) -> None:
    assert covers(observed, desired) is covered


def test_a_child_with_our_labels_and_no_controller_is_ours() -> None:
    body = fleet()
    body["metadata"]["uid"] = "new"
    labels = {MANAGED_BY: MANAGED_BY_VALUE, FLEET_LABEL: "detector"}
    assert owns(body, {"metadata": {"labels": labels}})
    assert owns(body, {"metadata": {"ownerReferences": [{"uid": "new", "controller": True}]}})
    assert not owns(body, {"metadata": {"labels": {**labels, FLEET_LABEL: "other"}}})
    old_owner = {"labels": labels, "ownerReferences": [{"uid": "old", "controller": True}]}
    assert not owns(body, {"metadata": old_owner})


def test_a_look_older_than_the_last_status_written_repeats_no_event(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet())
    stale = kube.observe("vision", "detector")  # before any status was written
    run(reconciler, kube)
    run(reconciler, kube)
    events, kube.writes[:] = list(kube.events), []
    reconciler.reconcile(replace(kube.observe("vision", "detector"), fleet=stale.fleet))
    assert kube.events == events
    assert not any(w.startswith("patch status") for w in kube.writes)


def test_the_configmap_always_gets_a_key_that_shares_nothing(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)
    assert sorted(kube.configmaps[PLUGIN]) == ["default", "timeslicing-2"]
    assert "sharing" not in kube.configmaps[PLUGIN]["default"]
    reconciler.release(kube.observe("vision", "detector"))
    assert list(kube.configmaps[PLUGIN]) == ["default"]  # the last profile goes, the default stays


def test_an_existing_default_key_is_left_as_it_is(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.configmaps[PLUGIN] = {"default": "version: v1\n"}
    kube.add_fleet(fleet())
    run(reconciler, kube)
    assert kube.configmaps[PLUGIN]["default"] == "version: v1\n"


def test_mps_on_a_mig_node_is_refused_naming_mig(kube: FakeKube, reconciler: Reconciler) -> None:
    kube.nodes["ada-0"]["metadata"]["labels"]["nvidia.com/mig.strategy"] = "single"
    kube.add_fleet(fleet(gpu={"product": ADA, "sharing": "mps", "workersPerGPU": 2}))
    run(reconciler, kube)
    sharing = condition(kube, "GPUSharing")
    assert (sharing["status"], sharing["reason"]) == ("False", "MIGMode")
    assert "ada-0 (nvidia.com/mig.strategy=single)" in sharing["message"]
    assert PROFILE_LABEL not in kube.nodes["ada-0"]["metadata"]["labels"]


def advertise(kube: FakeKube, name: str, replicas: int, strategy: str) -> None:
    """What the device plugin and feature discovery show once the node runs a profile."""
    body = kube.nodes[name]
    gpus = int(body["metadata"]["labels"]["nvidia.com/gpu.count"])
    body["status"]["allocatable"] = {"nvidia.com/gpu": str(gpus * replicas)}
    body["metadata"]["labels"].update(
        {"nvidia.com/gpu.replicas": str(replicas), "nvidia.com/gpu.sharing-strategy": strategy}
    )


@pytest.mark.parametrize(
    ("replicas", "strategy", "reason", "pending"),
    [
        (None, None, "ProfilePending", "no device plugin advertises nvidia.com/gpu on it"),
        (1, "none", "ProfilePending", "advertises nvidia.com/gpu=2, not 4 slots"),
        (2, "mps", "ProfilePending", "advertises nvidia.com/gpu.sharing-strategy=mps"),
        (2, "time-slicing", "ProfileApplied", None),
    ],
)
def test_a_profile_is_applied_only_once_the_node_advertises_it(
    kube: FakeKube,
    reconciler: Reconciler,
    replicas: int | None,
    strategy: str | None,
    reason: str,
    pending: str | None,
) -> None:
    kube.add_fleet(fleet())
    run(reconciler, kube)  # claims and labels the node
    if replicas is not None and strategy is not None:
        advertise(kube, "ada-0", replicas, strategy)
    run(reconciler, kube)
    assert condition(kube, "GPUSharing")["reason"] == reason
    gpu = kube.fleet("vision", "detector")["status"]["gpu"]
    assert gpu["pending"] == ([] if pending is None else [{"node": "ada-0", "reason": pending}])
    assert gpu["applied"] == ([] if pending is not None else ["ada-0"])


def test_passes_see_the_claims_written_before_the_watch_shows_them(
    kube: FakeKube, reconciler: Reconciler
) -> None:
    kube.add_fleet(fleet("one", replicas=1))
    kube.add_fleet(fleet("two", replicas=1))
    stale = kube.observe("vision", "two")  # taken before "one" claimed the node
    run(reconciler, kube, "one")
    reconciler.reconcile(stale)  # no conflict: the pass uses the node "one" wrote
    claims = kube.nodes["ada-0"]["metadata"]["annotations"][CLAIMS_ANNOTATION]
    assert claims == "vision/one,vision/two"


def test_a_new_profile_key_is_selected_only_after_the_volume_delay(kube: FakeKube) -> None:
    """config-manager exits on a label naming a key its (lagging) volume does not have yet: the
    node is held at once, but pointed at the key only once the volume can carry it."""
    clock = [1000.0]
    reconciler = Reconciler(
        kube,
        Settings(worker_image="worker:1"),
        PLUGIN,
        clock=lambda: NOW,
        config_volume_delay=60,
        monotonic=lambda: clock[0],
    )
    kube.add_fleet(fleet())
    run(reconciler, kube)
    meta = kube.nodes["ada-0"]["metadata"]
    assert "timeslicing-2" in kube.configmaps[PLUGIN]
    assert meta["annotations"][CLAIMS_ANNOTATION] == "vision/detector"
    assert meta["labels"][PROFILE_LABEL] == "timeslicing-2"
    assert DEVICE_PLUGIN_LABEL not in meta["labels"]
    pending = kube.fleet("vision", "detector")["status"]["gpu"]["pending"]
    assert pending[0]["reason"].startswith("waiting for the kubelet")
    assert kube.objects[("Deployment", "vision", "detector")]["spec"]["replicas"] == 0
    clock[0] += 59
    run(reconciler, kube)
    assert DEVICE_PLUGIN_LABEL not in kube.nodes["ada-0"]["metadata"]["labels"]
    clock[0] += 1
    run(reconciler, kube)
    assert kube.nodes["ada-0"]["metadata"]["labels"][DEVICE_PLUGIN_LABEL] == "timeslicing-2"


def test_two_fleets_of_one_profile_never_reserve_more_than_a_node_has(kube: FakeKube) -> None:
    """The second fleet counts the first one's pods not made yet (its reservation)."""
    reconciler = Reconciler(
        kube, Settings(worker_image="worker:1"), PLUGIN, clock=lambda: NOW, config_volume_delay=0
    )
    kube.add_node(node("ada-1"))
    kube.add_fleet(fleet("one", replicas=3))  # ada nodes: 2 GPUs x 2 = 4 slots each
    kube.add_fleet(fleet("two", replicas=3))
    run(reconciler, kube, "one")
    run(reconciler, kube, "two")
    reserved = {
        name: kube.nodes[name]["metadata"]["annotations"].get(RESERVED_ANNOTATION)
        for name in ("ada-0", "ada-1")
    }
    assert reserved == {"ada-0": "vision/one=3,vision/two=1", "ada-1": "vision/two=2"}
