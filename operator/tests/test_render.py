"""Unit tests of the renderers: manifests as plain dicts, no cluster."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from fleet_operator.render import Owner, render_children
from fleet_operator.render.deployment import pod_template, worker_settings
from fleet_spec.contract import BatchSettings, WorkerSettings
from fleet_spec.spec import FleetSpec, GpuSpec, ModelSpec, parse_fleet

OWNER = Owner(name="detector", namespace="vision", uid="uid-1", generation=3)
ADA = "NVIDIA-RTX-6000-Ada-Generation"


def _spec(**changes: Any) -> FleetSpec:
    spec = FleetSpec(
        name="detector",
        namespace="vision",
        model=ModelSpec(source="builtin:resnet18", precision="fp16"),
        replicas=8,
        gpu=GpuSpec(product=ADA, sharing="timeSlicing", workers_per_gpu=4),
    )
    return replace(spec, **changes)


def _children(spec: FleetSpec, replicas: int = 8) -> dict[str, dict[str, Any]]:
    rendered = render_children(
        spec, OWNER, replicas=replicas, profile="timeslicing-4", default_image="img:1"
    )
    return {child["kind"]: child for child in rendered}


def _worker(deployment: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_every_child_is_owned_by_the_fleet_and_labelled() -> None:
    children = _children(_spec())
    assert list(children) == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    for child in children.values():
        assert child["metadata"]["namespace"] == "vision"
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "inferencefleet.dev/v1alpha1",
                "kind": "InferenceFleet",
                "name": "detector",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"]["labels"]["inferencefleet.dev/fleet"] == "detector"


def test_batching_configmap_holds_the_workers_file() -> None:
    configmap = _children(_spec(batching=BatchSettings(4, 500, 32)))["ConfigMap"]
    assert configmap["metadata"]["name"] == "detector-batching"
    assert json.loads(configmap["data"]["batching.json"]) == {
        "maxBatchSize": 4,
        "maxQueueDelayMicroseconds": 500,
        "maxQueueSize": 32,
    }


def test_headless_service_with_grpc_and_metrics_ports() -> None:
    service = _children(_spec())["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"inferencefleet.dev/fleet": "detector"}
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("grpc", 8001),
        ("metrics", 8002),
    ]


def test_pdb_lets_one_pod_go_at_a_time() -> None:
    pdb = _children(_spec())["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == {"matchLabels": {"inferencefleet.dev/fleet": "detector"}}


def test_deployment_asks_one_gpu_slot_per_pod_on_the_right_nodes() -> None:
    deployment = _children(_spec(), replicas=6)["Deployment"]
    assert deployment["spec"]["replicas"] == 6
    assert deployment["metadata"]["annotations"] == {"inferencefleet.dev/fleet-generation": "3"}
    pod = deployment["spec"]["template"]["spec"]
    assert _worker(deployment)["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {
            "matchExpressions": [
                {
                    "key": "nvidia.com/gpu.product",
                    "operator": "In",
                    "values": [ADA, ADA + "-SHARED"],
                },
                {
                    "key": "inferencefleet.dev/gpu-profile",
                    "operator": "In",
                    "values": ["timeslicing-4"],
                },
            ]
        }
    ]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_worker_runs_restricted() -> None:
    deployment = _children(_spec())["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    worker = _worker(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert worker["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in worker["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False


def test_probes_use_the_grpc_health_service() -> None:
    worker = _worker(_children(_spec())["Deployment"])
    assert worker["readinessProbe"]["grpc"] == {
        "port": 8001,
        "service": "inference.GRPCInferenceService",
    }
    assert worker["livenessProbe"]["grpc"] == {"port": 8001, "service": ""}
    assert worker["startupProbe"]["grpc"]["port"] == 8001
    assert [p["containerPort"] for p in worker["ports"]] == [8001, 8002]


def test_worker_command_line_is_what_serve_parses() -> None:
    template = pod_template(_spec(processes_per_pod=2), OWNER, profile="p", image="img:1")
    args = template["spec"]["containers"][0]["args"]
    settings = WorkerSettings.from_argv(args)
    assert settings == worker_settings(_spec(processes_per_pod=2))
    assert (settings.model, settings.precision, settings.device) == (
        "builtin:resnet18",
        "fp16",
        "cuda",
    )
    assert (settings.port, settings.metrics_port, settings.workers) == (8001, 8002, 2)
    assert str(settings.batching_config) == "/etc/inferencefleet/batching/batching.json"
    assert settings.served_name == "resnet18"
    named = worker_settings(_spec(model=ModelSpec(source="builtin:tiny", name="fast")))
    assert WorkerSettings.from_argv(named.to_argv()).served_name == "fast"
    cpu = pod_template(_spec(), OWNER, profile="p", image="img:1", device="cpu")
    assert WorkerSettings.from_argv(cpu["spec"]["containers"][0]["args"]).device == "cpu"


def test_batching_and_replicas_do_not_touch_the_pod_template() -> None:
    before = pod_template(_spec(), OWNER, profile="timeslicing-4", image="img:1")
    after = pod_template(
        _spec(batching=BatchSettings(32, 100, 512), replicas=100),
        OWNER,
        profile="timeslicing-4",
        image="img:1",
    )
    assert before == after


def test_other_changes_do_touch_the_pod_template() -> None:
    base = pod_template(_spec(), OWNER, profile="timeslicing-4", image="img:1")
    assert base != pod_template(_spec(), OWNER, profile="timeslicing-4", image="img:2")
    assert base != pod_template(_spec(), OWNER, profile="mps-4", image="img:1")
    assert base != pod_template(
        _spec(processes_per_pod=2), OWNER, profile="timeslicing-4", image="img:1"
    )


def test_spec_image_wins_over_the_default() -> None:
    assert _worker(_children(_spec(image="mine:2"))["Deployment"])["image"] == "mine:2"
    assert _worker(_children(_spec())["Deployment"])["image"] == "img:1"


def test_file_model_mounts_its_claim_read_only(valid_fleet: dict[str, Any]) -> None:
    valid_fleet["spec"]["model"] = {"source": "/models/net.pt", "volume": {"claimName": "weights"}}
    valid_fleet["spec"]["resources"] = {"requests": {"cpu": "2"}, "limits": {"memory": "8Gi"}}
    deployment = _children(parse_fleet(valid_fleet))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in _worker(deployment)[
        "volumeMounts"
    ]
    assert {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    } in pod["volumes"]
    assert _worker(deployment)["resources"] == {
        "limits": {"memory": "8Gi", "nvidia.com/gpu": 1},
        "requests": {"cpu": "2", "nvidia.com/gpu": 1},
    }
