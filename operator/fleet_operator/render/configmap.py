"""The batching ConfigMap: the file each worker's --batching-config watches and applies live."""

from __future__ import annotations

import json
from typing import Any

from fleet_spec.spec import FleetSpec

from fleet_operator.names import BATCHING_FILE, batching_configmap_name
from fleet_operator.render.common import Owner, metadata


def render_batching_configmap(spec: FleetSpec, owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, batching_configmap_name(owner.name)),
        "data": {BATCHING_FILE: json.dumps(spec.batching.to_mapping(), sort_keys=True) + "\n"},
    }
