"""Names the operator gives things: labels, annotations, child object names, owner references."""

from __future__ import annotations

from typing import Any

# The fleet's API coordinates, re-exported for the modules that know dicts only.
from fleet_spec.spec import API_VERSION as API_VERSION
from fleet_spec.spec import GROUP as GROUP
from fleet_spec.spec import KIND as KIND
from fleet_spec.spec import PLURAL as PLURAL
from fleet_spec.spec import VERSION as VERSION

FIELD_MANAGER = "inferencefleet-operator"

# Worker pods and every child object carry these; FLEET_LABEL selects a fleet's pods.
FLEET_LABEL = f"{GROUP}/fleet"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = FIELD_MANAGER

# The fleet generation a Deployment was rendered from (on the Deployment, not its pod template).
GENERATION_ANNOTATION = f"{GROUP}/fleet-generation"

# Node labels written by GPU feature discovery; the last one is the device plugin's profile switch.
PRODUCT_LABEL = "nvidia.com/gpu.product"
COUNT_LABEL = "nvidia.com/gpu.count"
MEMORY_LABEL = "nvidia.com/gpu.memory"
DEVICE_PLUGIN_LABEL = "nvidia.com/device-plugin.config"
GPU_RESOURCE = "nvidia.com/gpu"
SHARED_SUFFIX = "-SHARED"  # feature discovery appends it to the product of a shared GPU

# Our node bookkeeping: the GPU profile a node runs and the fleets ("ns/name,...") that hold it.
PROFILE_LABEL = f"{GROUP}/gpu-profile"
CLAIMS_ANNOTATION = f"{GROUP}/claimed-by"
# The GPU slots each holder means to use on the node ("ns/name=4,..."), pods not yet made included.
RESERVED_ANNOTATION = f"{GROUP}/reserved-slots"

# The tune Job's pod carries TUNE_LABEL (the fleet's name) and not FLEET_LABEL: it is no worker.
TUNE_LABEL = f"{GROUP}/tune"
JOB_NAME_LABEL = "job-name"  # set by the Job controller on the Job's pods

GRPC_PORT = 8001
METRICS_PORT = 8002
BATCHING_FILE = "batching.json"
BATCHING_DIR = "/etc/inferencefleet/batching"


def fleet_id(namespace: str, name: str) -> str:
    """How a fleet is named on the nodes it holds."""
    return f"{namespace}/{name}"


def batching_configmap_name(fleet: str) -> str:
    return f"{fleet}-batching"


def tune_job_name(fleet: str, inputs: str) -> str:
    """The tune Job of one set of inputs: fleet names have at most 50 characters, so this stays
    within the 63 of a label value (the Job controller labels its pods with it)."""
    return f"{fleet}-tune-{inputs[:7]}"


def selector(fleet: str) -> str:
    """The worker pods' label selector, serialized (status.selector for the scale subresource)."""
    return f"{FLEET_LABEL}={fleet}"


def labels(fleet: str) -> dict[str, str]:
    """Labels of every child object and worker pod."""
    return {
        "app.kubernetes.io/name": "inferencefleet-worker",
        "app.kubernetes.io/instance": fleet,
        MANAGED_BY: MANAGED_BY_VALUE,
        FLEET_LABEL: fleet,
    }


def owner_reference(meta: dict[str, Any]) -> dict[str, Any]:
    """The fleet as the controlling owner: children are garbage-collected with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
