"""The tune Job: `inferencefleet tune` in the worker image, on one node of the fleet's GPU
product, its recommendation written to the pod's termination message for the operator to read.

The Job's name carries a hash of what the run measures (model, image, device, spec.tune), so a
change starts a new run and an unchanged fleet never runs it twice. The pod is no worker: it
carries TUNE_LABEL, not the fleet label, so neither the Deployment nor the Service selects it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fleet_spec.spec import API_VERSION, KIND, MODEL_MOUNT, FleetSpec

from fleet_operator.names import (
    MANAGED_BY,
    MANAGED_BY_VALUE,
    PROFILE_LABEL,
    TUNE_LABEL,
    tune_job_name,
)
from fleet_operator.render.common import Owner, metadata
from fleet_operator.render.deployment import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    gpu_resources,
    pod_volumes,
    product_affinity,
)
from fleet_operator.sharing import GPU_TOLERATION

FLEET_ENV = "INFERENCEFLEET_FLEET"
RESULT_PATH = "/dev/termination-log"
# Starting workers (torch import, warm-up) on top of the measuring budget, before the Job gives up.
START_ALLOWANCE_S = 900
KEEP_FINISHED_S = 3600  # a finished Job (and its pod's log) stays this long


def tune_inputs(spec: FleetSpec, image: str, device: str) -> str:
    """A hash of everything the tune run's answer depends on."""
    assert spec.tune is not None
    measured = {
        "model": dataclasses.asdict(spec.model),
        "image": image,
        "device": device,
        "tune": dataclasses.asdict(spec.tune),
        "product": spec.gpu.product,
        "resources": spec.resources,
        "processesPerPod": spec.processes_per_pod,
    }
    text = json.dumps(measured, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fleet_manifest(owner: Owner, manifest_spec: Mapping[str, Any]) -> str:
    """The fleet as tune reads it from $INFERENCEFLEET_FLEET (its spec as stored; tune applies
    the CRD's defaults itself)."""
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": dict(manifest_spec),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def tune_args(spec: FleetSpec, device: str) -> list[str]:
    assert spec.tune is not None
    return [
        f"env:{FLEET_ENV}",
        "--p99-ms",
        f"{spec.tune.p99_ms:g}",
        "--budget-s",
        str(spec.tune.budget_s),
        "--device",
        "cpu" if device == "cpu" else "auto",
        "--result-file",
        RESULT_PATH,
    ]


def render_tune_job(
    spec: FleetSpec,
    owner: Owner,
    manifest_spec: Mapping[str, Any],
    *,
    inputs: str,
    image: str,
    device: str = "cuda",
) -> dict[str, Any]:
    """The Job that runs one tune. It asks for one GPU slot on a node of the fleet's product,
    preferring a node no fleet holds (there the slot is a whole GPU)."""
    assert spec.tune is not None
    affinity = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [product_affinity(spec)]}]
        },
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "preference": {
                    "matchExpressions": [{"key": PROFILE_LABEL, "operator": "DoesNotExist"}]
                },
            }
        ],
    }
    container = {
        "name": "tune",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["inferencefleet", "tune"],
        "args": tune_args(spec, device),
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": FLEET_ENV, "value": _fleet_manifest(owner, manifest_spec)},
        ],
        "resources": gpu_resources(spec),
        "terminationMessagePath": RESULT_PATH,
        # No result file (tune failed before it had one): the log's tail says why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
        + ([{"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True}]
           if spec.model.claim_name else []),
    }  # fmt: skip
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": dict(POD_SECURITY),
        "affinity": {"nodeAffinity": affinity},
        "tolerations": [GPU_TOLERATION, *spec.tolerations],
        "containers": [container],
        "volumes": [v for v in pod_volumes(spec, owner) if v["name"] in ("tmp", "models")],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    meta = metadata(owner, tune_job_name(owner.name, inputs))
    meta["labels"][TUNE_LABEL] = owner.name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": spec.tune.budget_s + START_ALLOWANCE_S,
            "ttlSecondsAfterFinished": KEEP_FINISHED_S,
            "template": {
                "metadata": {
                    "labels": {MANAGED_BY: MANAGED_BY_VALUE, TUNE_LABEL: owner.name},
                },
                "spec": pod_spec,
            },
        },
    }
