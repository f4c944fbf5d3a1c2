"""The worker Deployment: GPU placement, probes, restricted security, batching from a file.

The pod template depends only on what needs a restart to change (model, image, resources,
placement, processes per pod). Batching lives in a ConfigMap that the workers watch, and
the replica count outside the template, so neither rolls the pods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet_spec.contract import HEALTH_SERVICE, WorkerSettings
from fleet_spec.spec import MODEL_MOUNT, FleetSpec

from fleet_operator.names import (
    BATCHING_DIR,
    BATCHING_FILE,
    FLEET_LABEL,
    GENERATION_ANNOTATION,
    GPU_RESOURCE,
    GRPC_PORT,
    METRICS_PORT,
    PRODUCT_LABEL,
    PROFILE_LABEL,
    batching_configmap_name,
    labels,
)
from fleet_operator.render.common import Owner, metadata
from fleet_operator.sharing import GPU_TOLERATION, product_values

RUN_AS = 65532
DEREGISTER_S = 5.0  # serving on after SIGTERM while kube-proxy stops sending connections here
DRAIN_S = 30.0  # then answering what was admitted
# Pod Security `restricted`, and a read-only root: every pod the operator makes runs so.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def worker_settings(spec: FleetSpec, device: str = "cuda") -> WorkerSettings:
    """What each pod's `inferencefleet serve` runs with. The batching values come from the
    watched file, so a batching edit changes no argument and rolls no pod. The device is
    CUDA (a pod without a GPU fails at start rather than serve slowly), unless the operator
    was told otherwise (--worker-device, for clusters whose GPUs are simulated)."""
    return WorkerSettings(
        model=spec.model.source,
        model_name=spec.model.name,
        port=GRPC_PORT,
        metrics_port=METRICS_PORT,
        workers=spec.processes_per_pod,
        device=device,
        precision=spec.model.precision,
        batching_config=Path(BATCHING_DIR, BATCHING_FILE),
        grace_period_s=DRAIN_S,
        deregister_delay_s=DEREGISTER_S,
    )


def product_affinity(spec: FleetSpec) -> dict[str, Any]:
    """A node selector requirement: a node of the fleet's GPU product (any GPU node if unset)."""
    if spec.gpu.product is None:
        return {"key": PRODUCT_LABEL, "operator": "Exists"}
    return {"key": PRODUCT_LABEL, "operator": "In", "values": product_values(spec.gpu.product)}


def node_affinity(spec: FleetSpec, profile: str) -> dict[str, Any]:
    """Only nodes of the GPU product that run the fleet's GPU profile (the nodes it holds)."""
    expressions = [
        product_affinity(spec),
        {"key": PROFILE_LABEL, "operator": "In", "values": [profile]},
    ]
    return {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": expressions}]
        }
    }


def gpu_resources(spec: FleetSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {
        "limits": {**spec.resources.get("limits", {}), GPU_RESOURCE: 1},
    }
    if spec.resources.get("requests"):
        resources["requests"] = {**spec.resources["requests"], GPU_RESOURCE: 1}
    return resources


def _grpc_probe(service: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "grpc": {"port": GRPC_PORT, "service": service},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _container(spec: FleetSpec, image: str, device: str) -> dict[str, Any]:
    mounts = [
        {"name": "batching", "mountPath": BATCHING_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.model.claim_name:
        mounts.append({"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True})
    return {
        "name": "worker",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["inferencefleet", "serve"],
        "args": worker_settings(spec, device).to_argv(),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": gpu_resources(spec),
        # Loading and warming a model takes a while: 5 minutes before liveness counts.
        "startupProbe": _grpc_probe("", period=5, failures=60),
        "livenessProbe": _grpc_probe("", period=10, failures=3),
        "readinessProbe": _grpc_probe(HEALTH_SERVICE, period=5, failures=2),
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }


def pod_volumes(spec: FleetSpec, owner: Owner) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        # A directory mount, not subPath: the kubelet then updates the file in place.
        {"name": "batching", "configMap": {"name": batching_configmap_name(owner.name)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if spec.model.claim_name:
        volumes.append(
            {
                "name": "models",
                "persistentVolumeClaim": {"claimName": spec.model.claim_name, "readOnly": True},
            }
        )
    return volumes


def pod_template(
    spec: FleetSpec, owner: Owner, *, profile: str, image: str, device: str = "cuda"
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # after SIGTERM the worker serves on while endpoints update, then drains; then SIGKILL
        "terminationGracePeriodSeconds": int(DEREGISTER_S + DRAIN_S) + 5,
        "securityContext": dict(POD_SECURITY),
        "affinity": {"nodeAffinity": node_affinity(spec, profile)},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {FLEET_LABEL: owner.name}},
            }
        ],
        "tolerations": [GPU_TOLERATION, *spec.tolerations],
        "containers": [_container(spec, image, device)],
        "volumes": pod_volumes(spec, owner),
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    return {"metadata": {"labels": labels(owner.name)}, "spec": pod_spec}


def render_deployment(
    spec: FleetSpec, owner: Owner, *, replicas: int, profile: str, image: str, device: str = "cuda"
) -> dict[str, Any]:
    """The Deployment with `replicas` pods (the capacity rule may want fewer than asked)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(
            owner, owner.name, annotations={GENERATION_ANNOTATION: str(owner.generation)}
        ),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": {FLEET_LABEL: owner.name}},
            # No surge: GPU slots are the scarce thing, a surge pod would find none free.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "25%"},
            },
            "template": pod_template(spec, owner, profile=profile, image=image, device=device),
        },
    }
