"""The fleet invariants of e2ecluster.fleetchecks, on hand-made objects."""

from __future__ import annotations

import json
from typing import Any

from e2ecluster import fleetchecks as checks

NS = "team"


def fleet(name: str, uid: str | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": NS, "name": name, "uid": uid or f"uid-{name}", "generation": 2},
        "spec": {"replicas": 2, **spec},
        "status": {"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def child(kind: str, name: str, fleet_name: str, uid: str | None = None, **extra: Any) -> Any:
    owners = [{"kind": "InferenceFleet", "name": fleet_name, "uid": uid or f"uid-{fleet_name}"}]
    return {
        "kind": kind,
        "metadata": {
            "namespace": NS, "name": name, "labels": {checks.FLEET_LABEL: fleet_name},
            "ownerReferences": owners,
        },
        **extra,
    }  # fmt: skip


def children(name: str, replicas: int = 2, image: str = "w:1", batch: int = 8) -> list[Any]:
    template = {"spec": {"containers": [{"image": image}]}}
    deployment = {"spec": {"replicas": replicas, "template": template}}
    data = {"data": {"batching.json": json.dumps({"maxBatchSize": batch, "maxQueueSize": 64})}}
    return [
        child("Deployment", name, name, **deployment),
        child("Service", name, name),
        child("ConfigMap", f"{name}-batching", name, **data),
        child("PodDisruptionBudget", name, name),
    ]


def node(name: str, claims: str = "", **labels: str) -> dict[str, Any]:
    annotations = {checks.CLAIMS_ANNOTATION: claims} if claims else {}
    return {"metadata": {"name": name, "labels": labels, "annotations": annotations}}


def test_a_fleet_as_its_spec_says_has_no_problem() -> None:
    f = fleet("a", image="w:1", batching={"maxBatchSize": 8})
    assert checks.fleet_mismatches(f, children("a")) == []
    assert checks.orphans([f], children("a")) == []
    assert checks.duplicates(children("a")) == []


def test_children_of_a_missing_fleet_are_orphans() -> None:
    found = checks.orphans([fleet("a")], children("a") + children("gone"))
    assert len(found) == 4
    assert all("'gone'" in line for line in found)


def test_a_child_owned_by_an_older_fleet_of_the_same_name_is_an_orphan() -> None:
    stale = child("Service", "a", "a", uid="uid-before")
    found = checks.orphans([fleet("a")], [stale])
    assert found == [f"Service {NS}/a: owned by a fleet uid that no longer exists"]


def test_unlabelled_unowned_objects_are_not_children() -> None:
    other = {"kind": "ConfigMap", "metadata": {"namespace": NS, "name": "kube-root-ca.crt"}}
    assert checks.orphans([], [other]) == []


def test_two_deployments_for_one_fleet_are_duplicates() -> None:
    extra = child("Deployment", "a-old", "a", spec={"replicas": 1})
    found = checks.duplicates([*children("a"), extra])
    assert found == [f"fleet {NS}/a: 2 Deployments (a, a-old)"]


def test_a_child_with_two_fleet_owners_is_a_duplicate() -> None:
    shared = child("Service", "a", "a")
    shared["metadata"]["ownerReferences"].append({"kind": "InferenceFleet", "uid": "uid-b"})
    assert checks.duplicates([shared]) == [f"Service {NS}/a: 2 fleet owners"]


def test_claims_and_labels_without_a_fleet_are_stray() -> None:
    profile = {checks.PROFILE_LABEL: "timeslicing-4", checks.DEVICE_PLUGIN_LABEL: "timeslicing-4"}
    nodes = [
        node("held", f"{NS}/a", **profile),
        node("ghost", f"{NS}/a,{NS}/gone", **profile),
        node("unclaimed", **profile),
        node("plain"),
    ]
    found = checks.stray_node_marks(nodes, [fleet("a")])
    assert found == [
        f"node ghost: claimed by {NS}/gone, which does not exist",
        "node unclaimed: label inferencefleet.dev/gpu-profile=timeslicing-4 without a fleet "
        "that claims it",
        "node unclaimed: label nvidia.com/device-plugin.config=timeslicing-4 without a fleet "
        "that claims it",
    ]
    scoped = checks.stray_node_marks([*nodes, node("x", "other/b")], [fleet("a")], namespace=NS)
    assert scoped == [f"node ghost: claimed by {NS}/gone, which does not exist"]


def test_children_that_lag_the_spec_are_named() -> None:
    f = fleet("a", replicas=3, image="w:2", batching={"maxBatchSize": 16})
    found = checks.fleet_mismatches(f, children("a"))
    assert found == [
        f"fleet {NS}/a: Deployment replicas 2, spec 3",
        f"fleet {NS}/a: image w:1, spec w:2",
        f"fleet {NS}/a: batching maxBatchSize=8, spec 16",
    ]


def test_missing_children_stale_status_and_not_ready_are_named() -> None:
    f = fleet("a")
    f["metadata"]["generation"] = 3
    f["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    kept = [c for c in children("a") if c["kind"] != "PodDisruptionBudget"]
    kept[1]["metadata"]["ownerReferences"] = []
    assert checks.fleet_mismatches(f, kept) == [
        f"fleet {NS}/a: Service a is not owned by it",
        f"fleet {NS}/a: no PodDisruptionBudget a",
        f"fleet {NS}/a: status.observedGeneration 2, generation 3",
        f"fleet {NS}/a: not Ready",
    ]


def pod(node_name: str, ready: bool = True, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"deletionTimestamp": "now"} if deleting else {}
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": meta, "spec": {"nodeName": node_name}, "status": {"conditions": conditions}}


def test_status_that_agrees_with_the_pods_is_honest() -> None:
    f = fleet("a")
    f["status"] |= {
        "gpu": {"nodes": ["n1", "n2"]},
        "placement": [{"node": "n1", "pods": 2}, {"node": "n2", "pods": 1}],
        "readyReplicas": 3,
    }
    pods = [pod("n1"), pod("n1"), pod("n2"), pod("n3", deleting=True)]
    assert checks.status_mismatches(f, {"n1", "n2"}, pods) == []

    assert checks.status_mismatches(f, {"n1"}, [pod("n1"), pod("n1", ready=False)]) == [
        f"fleet {NS}/a: status.gpu.nodes names n2, which does not exist",
        f"fleet {NS}/a: status.placement {{'n1': 2, 'n2': 1}}, pods per node {{'n1': 2}}",
        f"fleet {NS}/a: status.readyReplicas 3, Ready pods 1",
    ]
