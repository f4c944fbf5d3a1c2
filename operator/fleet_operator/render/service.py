"""The headless Service: one DNS record per ready worker pod, for client-side round-robin."""

from __future__ import annotations

from typing import Any

from fleet_operator.names import FLEET_LABEL, GRPC_PORT, METRICS_PORT
from fleet_operator.render.common import Owner, metadata


def render_service(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, owner.name),
        "spec": {
            "clusterIP": "None",
            "selector": {FLEET_LABEL: owner.name},
            "publishNotReadyAddresses": False,
            "ports": [
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {
                    "name": "metrics",
                    "port": METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                },
            ],
        },
    }
