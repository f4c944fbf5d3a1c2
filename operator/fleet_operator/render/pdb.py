"""The PodDisruptionBudget: a drain takes at most one worker pod of the fleet at a time."""

from __future__ import annotations

from typing import Any

from fleet_operator.names import FLEET_LABEL
from fleet_operator.render.common import Owner, metadata


def render_pdb(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(owner, owner.name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {FLEET_LABEL: owner.name}},
            # A worker that never got ready must not block a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
