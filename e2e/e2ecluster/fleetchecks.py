"""Invariants of InferenceFleets and what they own, checked from lists of API objects (pure).

Written against what the operator shows through the API (names, labels, owner references,
status), so the checks hold whatever the operator's internals look like. Each function
returns one line per problem; an empty list means the invariant holds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

GROUP = "inferencefleet.dev"
FLEET_LABEL = f"{GROUP}/fleet"
PROFILE_LABEL = f"{GROUP}/gpu-profile"
CLAIMS_ANNOTATION = f"{GROUP}/claimed-by"
DEVICE_PLUGIN_LABEL = "nvidia.com/device-plugin.config"
CHILD_KINDS = ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget")


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = obj.get("metadata") or {}
    return meta


def _where(obj: dict[str, Any]) -> str:
    meta = _meta(obj)
    return f"{obj.get('kind', '?')} {meta.get('namespace', '')}/{meta.get('name', '?')}"


def _fleet_owners(obj: dict[str, Any]) -> list[dict[str, Any]]:
    refs = _meta(obj).get("ownerReferences") or []
    return [r for r in refs if r.get("kind") == "InferenceFleet"]


def _is_child(obj: dict[str, Any]) -> bool:
    labelled = FLEET_LABEL in (_meta(obj).get("labels") or {})
    return obj.get("kind") in CHILD_KINDS and (labelled or bool(_fleet_owners(obj)))


def orphans(fleets: list[dict[str, Any]], children: list[dict[str, Any]]) -> list[str]:
    """Children (Deployment/Service/ConfigMap/PDB) whose fleet does not exist: neither a fleet
    of the name their label gives in their namespace, nor one with their owner's uid."""
    names = {(_meta(f).get("namespace"), _meta(f).get("name")) for f in fleets}
    uids = {_meta(f).get("uid") for f in fleets}
    found = []
    for child in filter(_is_child, children):
        meta = _meta(child)
        fleet = (meta.get("labels") or {}).get(FLEET_LABEL)
        if fleet is not None and (meta.get("namespace"), fleet) not in names:
            found.append(f"{_where(child)}: labelled for fleet {fleet!r}, which does not exist")
        elif any(ref.get("uid") not in uids for ref in _fleet_owners(child)):
            found.append(f"{_where(child)}: owned by a fleet uid that no longer exists")
    return found


def duplicates(children: list[dict[str, Any]]) -> list[str]:
    """More than one child of a kind for one fleet, or a child with several fleet owners."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    found = []
    for child in filter(_is_child, children):
        meta = _meta(child)
        fleet = (meta.get("labels") or {}).get(FLEET_LABEL)
        if fleet is not None:
            groups[(meta.get("namespace", ""), fleet, child["kind"])].append(meta["name"])
        if len(_fleet_owners(child)) > 1:
            found.append(f"{_where(child)}: {len(_fleet_owners(child))} fleet owners")
    for (namespace, fleet, kind), names in sorted(groups.items()):
        if len(names) > 1:
            found.append(f"fleet {namespace}/{fleet}: {len(names)} {kind}s ({', '.join(names)})")
    return found


def stray_node_marks(
    nodes: list[dict[str, Any]], fleets: list[dict[str, Any]], namespace: str | None = None
) -> list[str]:
    """Claims on nodes naming a fleet that does not exist, and profile/device-plugin labels on
    a node that no fleet claims. With `namespace`, only claims of that namespace count (and
    unclaimed labels are not judged: another namespace's fleet may be going away)."""
    alive = {f"{_meta(f).get('namespace')}/{_meta(f).get('name')}" for f in fleets}
    found = []
    for node in nodes:
        meta = _meta(node)
        labels = meta.get("labels") or {}
        raw = (meta.get("annotations") or {}).get(CLAIMS_ANNOTATION, "")
        claims = [c for c in raw.split(",") if c]
        judged = [c for c in claims if namespace is None or c.startswith(f"{namespace}/")]
        name = meta.get("name")
        gone = [c for c in judged if c not in alive]
        found += [f"node {name}: claimed by {c}, which does not exist" for c in gone]
        if namespace is None and not claims:
            found += [
                f"node {name}: label {label}={labels[label]} without a fleet that claims it"
                for label in (PROFILE_LABEL, DEVICE_PLUGIN_LABEL)
                if label in labels
            ]
    return found


def _child(children: list[dict[str, Any]], kind: str, namespace: str, name: str) -> Any:
    for child in children:
        meta = _meta(child)
        if child.get("kind") == kind and (meta.get("namespace"), meta.get("name")) == (
            namespace,
            name,
        ):
            return child
    return None


def fleet_mismatches(fleet: dict[str, Any], children: list[dict[str, Any]]) -> list[str]:
    """How a fleet's children and status differ from what its spec says: the Deployment
    (replicas, image), Service, batching ConfigMap and PDB exist and are owned by this fleet,
    status.observedGeneration is the current generation and Ready is True."""
    meta, spec = _meta(fleet), fleet.get("spec") or {}
    namespace, name, uid = meta.get("namespace", ""), meta.get("name", ""), meta.get("uid")
    where = f"fleet {namespace}/{name}"
    found = []
    expected = {
        "Deployment": name,
        "Service": name,
        "ConfigMap": f"{name}-batching",
        "PodDisruptionBudget": name,
    }
    for kind, child_name in expected.items():
        child = _child(children, kind, namespace, child_name)
        if child is None:
            found.append(f"{where}: no {kind} {child_name}")
        elif uid not in {r.get("uid") for r in _fleet_owners(child)}:
            found.append(f"{where}: {kind} {child_name} is not owned by it")
    deployment = _child(children, "Deployment", namespace, name)
    if deployment is not None:
        replicas = (deployment.get("spec") or {}).get("replicas")
        if replicas != spec.get("replicas"):
            found.append(f"{where}: Deployment replicas {replicas}, spec {spec.get('replicas')}")
        containers = deployment["spec"]["template"]["spec"]["containers"]
        if "image" in spec and containers[0].get("image") != spec["image"]:
            found.append(f"{where}: image {containers[0].get('image')}, spec {spec['image']}")
    configmap = _child(children, "ConfigMap", namespace, f"{name}-batching")
    if configmap is not None:
        rendered = json.loads((configmap.get("data") or {}).get("batching.json", "{}"))
        for key, value in (spec.get("batching") or {}).items():
            if rendered.get(key) != value:
                found.append(f"{where}: batching {key}={rendered.get(key)!r}, spec {value!r}")
    status = fleet.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        found.append(
            f"{where}: status.observedGeneration "
            f"{status.get('observedGeneration')}, generation {meta.get('generation')}"
        )
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    if not ready or ready[0].get("status") != "True":
        found.append(f"{where}: not Ready")
    return found


def status_mismatches(
    fleet: dict[str, Any], node_names: set[str], pods: list[dict[str, Any]]
) -> list[str]:
    """Where a fleet's status disagrees with the cluster: a node it names that does not exist,
    a per-node pod count unlike the fleet's scheduled pods, readyReplicas unlike its Ready pods."""
    meta, status = _meta(fleet), fleet.get("status") or {}
    where = f"fleet {meta.get('namespace')}/{meta.get('name')}"
    live = [p for p in pods if not _meta(p).get("deletionTimestamp")]
    found = [
        f"{where}: status.gpu.nodes names {node}, which does not exist"
        for node in (status.get("gpu") or {}).get("nodes") or []
        if node not in node_names
    ]
    per_node: dict[str, int] = defaultdict(int)
    for pod in live:
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            per_node[node] += 1
    said = {p["node"]: p["pods"] for p in status.get("placement") or []}
    if said != dict(per_node):
        found.append(f"{where}: status.placement {said}, pods per node {dict(per_node)}")
    ready = sum(
        1
        for pod in live
        for c in (pod.get("status") or {}).get("conditions") or []
        if c.get("type") == "Ready" and c.get("status") == "True"
    )
    if status.get("readyReplicas", 0) != ready:
        said_ready = status.get("readyReplicas")
        found.append(f"{where}: status.readyReplicas {said_ready}, Ready pods {ready}")
    return found
