"""The operator against the real test cluster: validation, Ready, scale, batching, rollout,
GPU sharing profiles, conflicts, capacity shortfalls and deletion."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from e2ecluster.handle import wait_until

pytestmark = pytest.mark.e2e

BLACKWELL = "NVIDIA-RTX-PRO-6000-Blackwell-Workstation-Edition"
PROFILE_LABEL = "inferencefleet.dev/gpu-profile"
CONFIG_LABEL = "nvidia.com/device-plugin.config"
CLAIMS = "inferencefleet.dev/claimed-by"


def _node(cluster: Any, name: str) -> dict[str, Any]:
    node: dict[str, Any] = json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)
    return node


def _uids(pods: list[dict[str, Any]]) -> set[str]:
    return {pod["metadata"]["uid"] for pod in pods}


def test_invalid_fleet_is_rejected_naming_the_field(
    cluster: Any, crds: None, invalid_fleet: Any
) -> None:
    manifest = invalid_fleet.manifest
    manifest["metadata"]["namespace"] = "default"
    result = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    if result.returncode == 0:  # must not happen: remove it, then fail
        cluster.kubectl("delete", "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"{invalid_fleet.id} was accepted: {result.stdout}"
    assert invalid_fleet.field in result.stderr, result.stderr


def test_fleet_gets_ready_and_scales(fleets: Any) -> None:
    fleets.apply(fleets.manifest("scaler", replicas=3))
    fleet = fleets.wait_ready("scaler")
    status = fleet["status"]
    assert status["readyReplicas"] == 3
    assert status["selector"] == "inferencefleet.dev/fleet=scaler"
    assert sum(p["pods"] for p in status["placement"]) == 3
    assert status["gpu"]["profile"] == "timeslicing-4"
    for kind in ("deployment", "service", "configmap", "poddisruptionbudget"):
        name = "scaler-batching" if kind == "configmap" else "scaler"
        assert fleets.kubectl("get", kind, name, "-o", "name").strip()
    service = json.loads(fleets.kubectl("get", "service", "scaler", "-o", "json"))
    assert service["spec"]["clusterIP"] == "None"
    table = fleets.kubectl("get", "ifleet", "scaler", "-o", "wide")
    assert "timeSlicing" in table
    assert "builtin:tiny" in table

    fleets.kubectl("scale", "ifleet/scaler", "--replicas=5")
    fleets.wait_ready("scaler")
    deployment = fleets.deployment("scaler")
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 5
    assert len(fleets.pods("scaler")) == 5


def test_batching_change_restarts_no_pod(fleets: Any) -> None:
    fleets.apply(fleets.manifest("batcher", replicas=2))
    fleets.wait_ready("batcher")
    before = _uids(fleets.pods("batcher"))
    deployment = fleets.deployment("batcher")

    fleets.kubectl(
        "patch", "ifleet", "batcher", "--type=merge", "-p",
        '{"spec":{"batching":{"maxBatchSize":16,"maxQueueSize":128}}}',
    )  # fmt: skip
    fleets.wait_ready("batcher")
    configmap = json.loads(fleets.kubectl("get", "configmap", "batcher-batching", "-o", "json"))
    assert json.loads(configmap["data"]["batching.json"])["maxBatchSize"] == 16
    after = fleets.deployment("batcher")
    assert after["spec"]["template"] == deployment["spec"]["template"]
    revision = "deployment.kubernetes.io/revision"
    assert (
        after["metadata"]["annotations"][revision]
        == deployment["metadata"]["annotations"][revision]
    )
    assert _uids(fleets.pods("batcher")) == before


def test_image_change_rolls_the_pods(fleets: Any) -> None:
    fleets.apply(fleets.manifest("roller", replicas=2, image="worker:1"))
    fleets.wait_ready("roller")
    before = _uids(fleets.pods("roller"))

    fleets.kubectl(
        "patch", "ifleet", "roller", "--type=merge", "-p", '{"spec":{"image":"worker:2"}}'
    )

    def rolled() -> bool:
        pods = [p for p in fleets.pods("roller") if not p["metadata"].get("deletionTimestamp")]
        images = {p["spec"]["containers"][0]["image"] for p in pods}
        return images == {"worker:2"} and len(pods) == 2 and not (_uids(pods) & before)

    wait_until("pods with the new image", rolled, timeout=90)
    fleets.wait_ready("roller")


def test_sharing_profile_lands_on_nodes_and_deletion_gives_them_back(
    cluster: Any, fleets: Any
) -> None:
    fleets.apply(
        fleets.manifest(
            "sharer", replicas=4, gpu={"product": BLACKWELL, "sharing": "mps", "workersPerGPU": 4}
        )
    )
    fleet = fleets.wait_ready("sharer")
    nodes = fleet["status"]["gpu"]["nodes"]
    assert len(nodes) == 1
    node = _node(cluster, nodes[0])
    assert node["metadata"]["labels"][CONFIG_LABEL] == "mps-4"
    assert node["metadata"]["labels"][PROFILE_LABEL] == "mps-4"
    wait_until(  # the device plugin's doing, once its ConfigMap volume holds the key
        "the node to advertise 4 GPU slots",
        lambda: _node(cluster, nodes[0])["status"]["capacity"]["nvidia.com/gpu"] == "4",
        timeout=90,
    )
    plugin = json.loads(
        cluster.kubectl(
            "get", "configmap", "device-plugin-config", "-n", "nvidia-device-plugin", "-o", "json"
        ).stdout
    )
    assert (
        yaml.safe_load(plugin["data"]["mps-4"])["sharing"]["mps"]["resources"][0]["replicas"] == 4
    )

    fleets.delete("sharer")
    labels = _node(cluster, nodes[0])["metadata"]
    assert CONFIG_LABEL not in labels.get("labels", {})
    assert PROFILE_LABEL not in labels.get("labels", {})
    assert CLAIMS not in (labels.get("annotations") or {})

    def children_gone() -> bool:
        kinds = "deployments,replicasets,pods,services,configmaps,poddisruptionbudgets"
        names = fleets.kubectl("get", kinds, "-l", "inferencefleet.dev/fleet=sharer", "-o", "name")
        return names.strip() == ""

    wait_until("the fleet's children to be garbage-collected", children_gone, timeout=60)


def test_two_profiles_never_share_a_node(cluster: Any, fleets: Any) -> None:
    first = {"product": BLACKWELL, "sharing": "timeSlicing", "workersPerGPU": 2}
    fleets.apply(fleets.manifest("first", replicas=2, gpu=first))
    node = fleets.wait_ready("first")["status"]["gpu"]["nodes"][0]

    second = {"product": BLACKWELL, "sharing": "mps", "workersPerGPU": 2}
    fleets.apply(fleets.manifest("second", replicas=1, gpu=second))
    conflict = fleets.wait_condition("second", "GPUSharing", "False", "ProfileConflict")
    assert node in conflict["message"]
    assert f"{fleets.namespace}/first" in conflict["message"]
    wait_until(
        "a ProfileConflict event",
        lambda: any(e["reason"] == "ProfileConflict" for e in fleets.events("second")),
        timeout=30,
    )
    assert _node(cluster, node)["metadata"]["labels"][CONFIG_LABEL] == "timeslicing-2"
    assert fleets.deployment("second")["spec"]["replicas"] == 0

    fleets.delete("first")  # the node is free again: the second fleet takes it
    fleets.wait_ready("second", timeout=120)
    assert _node(cluster, node)["metadata"]["labels"][CONFIG_LABEL] == "mps-2"


def test_a_fleet_that_cannot_fit_says_so_and_does_not_thrash(fleets: Any) -> None:
    gpu = {"product": BLACKWELL, "sharing": "none", "workersPerGPU": 1}
    fleets.apply(fleets.manifest("toobig", replicas=3, gpu=gpu))
    capacity = fleets.wait_condition("toobig", "GPUCapacity", "False", "InsufficientGPUSlots")
    assert "needs 3 GPU slots" in capacity["message"]
    assert "1 slots available" in capacity["message"]
    wait_until(
        "an InsufficientGPUSlots event",
        lambda: any(e["reason"] == "InsufficientGPUSlots" for e in fleets.events("toobig")),
        timeout=30,
    )

    def one_pod_bound() -> list[dict[str, Any]]:  # bound by the scheduler after it is made
        found = fleets.pods("toobig")
        return found if len(found) == 1 and all(p["spec"].get("nodeName") for p in found) else []

    pods = wait_until("the one pod that fits to be scheduled", one_pod_bound, timeout=60)

    fleets.kubectl("scale", "ifleet/toobig", "--replicas=4")  # another reconcile, still too big

    def reconciled() -> bool:
        fleet = fleets.get("toobig") or {}
        return (fleet.get("status") or {}).get("gpu", {}).get("slotsNeeded") == 4

    wait_until("the status to see 4 replicas", reconciled, timeout=60)
    assert fleets.deployment("toobig")["spec"]["replicas"] == 1
    assert _uids(fleets.pods("toobig")) == _uids(pods)


def test_gpu_memory_shortfall_makes_no_pods(fleets: Any) -> None:
    gpu = {"sharing": "timeSlicing", "workersPerGPU": 64, "memoryPerWorkerMiB": 2048}
    fleets.apply(fleets.manifest("hungry", replicas=1, gpu=gpu))
    capacity = fleets.wait_condition("hungry", "GPUCapacity", "False", "InsufficientGPUMemory")
    assert "131072 MiB" in capacity["message"]
    assert fleets.deployment("hungry")["spec"]["replicas"] == 0


def test_claims_of_deleted_fleets_do_not_block(cluster: Any, fleets: Any) -> None:
    node = "rtxpro6000bw-0"
    ghost = f"{fleets.namespace}/ghost"  # a fleet deleted while no operator ran
    patch = {
        "metadata": {
            "labels": {PROFILE_LABEL: "mps-2", CONFIG_LABEL: "mps-2"},
            "annotations": {CLAIMS: ghost},
        }
    }
    cluster.kubectl("patch", "node", node, "--type=merge", "-p", json.dumps(patch))
    gpu = {"product": BLACKWELL, "sharing": "timeSlicing", "workersPerGPU": 2}
    fleets.apply(fleets.manifest("heir", replicas=2, gpu=gpu))
    fleets.wait_ready("heir")
    labels = _node(cluster, node)["metadata"]
    assert labels["labels"][CONFIG_LABEL] == "timeslicing-2"
    assert labels["annotations"][CLAIMS] == f"{fleets.namespace}/heir"


def test_two_operator_replicas_do_not_both_act(
    cluster: Any, namespace: str, start_operator: Any
) -> None:
    with (
        start_operator("high.log", extra=("--priority", "200")) as high,
        start_operator("low.log", extra=("--priority", "100")) as low,
    ):
        resumed = "Resuming operations after the pause"  # logged by an operator that acts
        wait_until("the higher-priority operator to act", lambda: resumed in high.output(), 60)
        fleet = {
            "apiVersion": "inferencefleet.dev/v1alpha1",
            "kind": "InferenceFleet",
            "metadata": {"name": "peered", "namespace": namespace},
            "spec": {"replicas": 1, "model": {"source": "builtin:tiny"}},
        }
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(fleet))

        def handled_by_high() -> bool:
            return "Creation is processed" in high.output()

        wait_until("the higher-priority operator to handle the fleet", handled_by_high, timeout=60)
        cluster.kubectl("delete", "ifleet", "peered", "-n", namespace, "--timeout=60s")
        for line in (resumed, "Creation is processed", "Deletion is processed"):
            assert line not in low.output()


def test_an_object_someone_else_made_is_neither_taken_nor_deleted(fleets: Any) -> None:
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "squatter-batching", "namespace": fleets.namespace},
        "data": {"owner": "someone else"},
    }
    fleets.apply(theirs)
    fleets.apply(fleets.manifest("squatter", replicas=1))
    owned = fleets.wait_condition("squatter", "ChildrenOwned", "False", "NotOwned")
    assert f"ConfigMap {fleets.namespace}/squatter-batching" in owned["message"]
    wait_until(
        "a NotOwned event",
        lambda: any(e["reason"] == "NotOwned" for e in fleets.events("squatter")),
        timeout=30,
    )
    configmap = json.loads(fleets.kubectl("get", "configmap", "squatter-batching", "-o", "json"))
    assert configmap["data"] == {"owner": "someone else"}
    assert not configmap["metadata"].get("ownerReferences")
    assert fleets.deployment("squatter") is None  # no pods on someone else's config
    assert fleets.kubectl("get", "service", "squatter", "-o", "name").strip()

    fleets.delete("squatter")
    wait_until(
        "the fleet's own children to be garbage-collected",
        lambda: not fleets.kubectl("get", "service", "squatter", "--ignore-not-found").strip(),
        timeout=60,
    )
    survivor = json.loads(fleets.kubectl("get", "configmap", "squatter-batching", "-o", "json"))
    assert survivor["data"] == {"owner": "someone else"}


def test_tune_runs_as_a_job_and_its_end_reaches_status(fleets: Any) -> None:
    """spec.tune on kwok: the real Job controller and scheduler run the operator's tune Job on
    a node of the fleet's product; kwok ends its pod as it ends every Job's pod (exit 0, no
    termination message), so status.tune must say the run gave no result. The real run, with
    a result, is in test_real_node_fleet.py."""
    fleets.apply(fleets.manifest("tuner", replicas=1, tune={"p99Ms": 40, "budgetSeconds": 10}))

    def ended() -> dict[str, Any] | None:
        tune = ((fleets.get("tuner") or {}).get("status") or {}).get("tune") or {}
        return tune if tune.get("state") in ("Succeeded", "Failed") else None

    tune = wait_until("status.tune ends", ended, timeout=90)
    assert tune["message"] == "the tune pod ended without a result (exit code 0)", tune
    assert tune["p99BudgetMs"] == 40
    job = json.loads(fleets.kubectl("get", "job", tune["job"], "-o", "json"))
    assert job["metadata"]["ownerReferences"][0]["name"] == "tuner"
    assert job["status"].get("succeeded") == 1
    (pod,) = json.loads(
        fleets.kubectl("get", "pods", "-l", f"job-name={tune['job']}", "-o", "json")
    )["items"]
    node = _node(fleets.cluster, pod["spec"]["nodeName"])
    assert (
        node["metadata"]["labels"]["nvidia.com/gpu.product"]
        == fleets.manifest("x")["spec"]["gpu"]["product"]
    )
    assert tune["node"] == pod["spec"]["nodeName"]
    # no worker: the fleet's selector does not take the tune pod
    assert pod["metadata"]["uid"] not in _uids(fleets.pods("tuner"))
    assert "failed" in fleets.kubectl("get", "ifleet", "tuner")
    # one run per set of inputs: the ended run is not started again by a pass that sees a
    # change outside them (the replica count; wait_ready waits for that generation)
    fleets.kubectl("scale", "ifleet/tuner", "--replicas=2")
    assert fleets.wait_ready("tuner")["status"]["readyReplicas"] == 2
    jobs = json.loads(
        fleets.kubectl("get", "jobs", "-l", "inferencefleet.dev/tune=tuner", "-o", "json")
    )
    assert [j["metadata"]["name"] for j in jobs["items"]] == [tune["job"]]
