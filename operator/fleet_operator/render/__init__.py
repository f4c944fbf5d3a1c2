"""Rendering: pure functions from a parsed fleet to the manifests of its children."""

from __future__ import annotations

from typing import Any

from fleet_spec.spec import FleetSpec

from fleet_operator.render.common import Owner
from fleet_operator.render.configmap import render_batching_configmap
from fleet_operator.render.deployment import render_deployment
from fleet_operator.render.pdb import render_pdb
from fleet_operator.render.service import render_service

__all__ = ["Owner", "render_children"]


def render_children(
    spec: FleetSpec,
    owner: Owner,
    *,
    replicas: int,
    profile: str,
    default_image: str,
    device: str = "cuda",
) -> list[dict[str, Any]]:
    """Every child, in the order to apply them: the ConfigMap before the pods that mount it,
    the Deployment next (a scale waits for nothing else)."""
    return [
        render_batching_configmap(spec, owner),
        render_deployment(
            spec,
            owner,
            replicas=replicas,
            profile=profile,
            image=spec.image or default_image,
            device=device,
        ),
        render_service(owner),
        render_pdb(owner),
    ]
