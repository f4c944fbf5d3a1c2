"""An in-memory Kube for unit tests: the same writes as KubeApi, kept in dicts, and a look.

It keeps nodes, children, fleets, the device plugin ConfigMap and the Events posted; a
write it is told to refuse raises ApiError as the apiserver would. `observe` builds a
pass's Observations from what it holds, as the operator's indexes would.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

from fleet_operator.kube import ApiError, ConfigMapRef
from fleet_operator.names import FLEET_LABEL, MANAGED_BY, MANAGED_BY_VALUE, TUNE_LABEL, fleet_id
from fleet_operator.observe import (
    Observations,
    trim_child,
    trim_job,
    trim_node,
    trim_pod,
    trim_tune_pod,
)


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """JSON merge patch (RFC 7386): None removes a key, mappings merge, the rest replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    """Kube in memory. Objects are plain dicts; `writes` counts every write that was made."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, ns, name)
        self.fleets: dict[tuple[str, str], dict[str, Any]] = {}
        self.configmaps: dict[ConfigMapRef, dict[str, str]] = {}
        self.events: list[tuple[str, str, str, str]] = []  # (fleet, type, reason, message)
        self.writes: list[str] = []
        self.refuse: dict[str, tuple[int, str, str]] = {}  # action prefix -> status, reason, msg
        self._versions = itertools.count(1)

    # --- setting the scene ---------------------------------------------------------------

    def add_node(self, node: Mapping[str, Any]) -> None:
        body = copy.deepcopy(dict(node))
        body["metadata"]["resourceVersion"] = str(next(self._versions))
        self.nodes[body["metadata"]["name"]] = body

    def add_fleet(self, fleet: Mapping[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(dict(fleet))
        meta = body["metadata"]
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        self.fleets[(meta["namespace"], meta["name"])] = body
        return body

    def fleet(self, namespace: str, name: str) -> dict[str, Any]:
        return self.fleets[(namespace, name)]

    def observe(self, namespace: str, name: str) -> Observations:
        """What the operator's indexes would show for this fleet now."""
        fleet = copy.deepcopy(self.fleets[(namespace, name)])
        children = {}
        for (kind, ns, child), body in self.objects.items():
            if ns == namespace and kind != "Pod":
                labels = body["metadata"].get("labels") or {}
                ours = labels.get(MANAGED_BY) == MANAGED_BY_VALUE
                children[(kind, child)] = trim_child(copy.deepcopy(body), ours=ours)
        pods: list[dict[str, Any]] = []
        other_pods: list[dict[str, Any]] = []
        for (kind, ns, _), body in self.objects.items():
            if kind == "Pod" and FLEET_LABEL in (body["metadata"].get("labels") or {}):
                mine = ns == namespace and body["metadata"]["labels"][FLEET_LABEL] == name
                (pods if mine else other_pods).append(trim_pod(body))
        tuning = {
            (kind, child): copy.deepcopy(body)
            for (kind, ns, child), body in self.objects.items()
            if ns == namespace and (body["metadata"].get("labels") or {}).get(TUNE_LABEL) == name
        }
        tune_jobs = {c: trim_job(b) for (kind, c), b in tuning.items() if kind == "Job"}
        tune_pods = [trim_tune_pod(b) for (kind, _), b in tuning.items() if kind == "Pod"]
        return Observations(
            fleet=fleet,
            nodes=[trim_node(copy.deepcopy(node)) for node in self.nodes.values()],
            children=children,
            pods=pods,
            other_pods=other_pods,
            fleets=frozenset(fleet_id(ns, n) for ns, n in self.fleets),
            watched=None,
            tune_jobs=tune_jobs,
            tune_pods=tune_pods,
        )

    # --- Kube ----------------------------------------------------------------------------

    def _write(self, action: str) -> None:
        for prefix, (status, reason, message) in self.refuse.items():
            if action.startswith(prefix):
                raise ApiError(action, status, reason, message)
        self.writes.append(action)

    def apply(self, manifest: Mapping[str, Any], *, force: bool) -> dict[str, Any]:
        meta = manifest["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"])
        action = f"apply {key[0]} {key[1]}/{key[2]}"
        existing = self.objects.get(key)
        if existing is not None and not force:
            raise ApiError(action, 409, "Conflict", "Apply failed with conflicts")
        self._write(action)
        body = copy.deepcopy(dict(manifest))
        if existing is not None:
            body["metadata"]["uid"] = existing["metadata"]["uid"]
        else:
            body["metadata"]["uid"] = f"uid-{next(self._versions)}"
        self.objects[key] = body
        return copy.deepcopy(body)

    def patch_node(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        action = f"patch node {name}"
        node = self.nodes.get(name)
        if node is None:
            raise ApiError(action, 404, "NotFound", f'nodes "{name}" not found')
        expected = (patch.get("metadata") or {}).get("resourceVersion")
        if expected is not None and expected != node["metadata"]["resourceVersion"]:
            raise ApiError(action, 409, "Conflict", "the object has been modified")
        self._write(action)
        _merge(node, patch)
        node["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(node)

    def configmap_data(self, where: ConfigMapRef) -> dict[str, str] | None:
        data = self.configmaps.get(where)
        return dict(data) if data is not None else None

    def patch_configmap_data(
        self, where: ConfigMapRef, changes: Mapping[str, str | None]
    ) -> dict[str, str]:
        self._write(f"patch configmap {where.namespace}/{where.name}")
        data = self.configmaps.setdefault(where, {})
        _merge(data, changes)
        return dict(data)

    def patch_fleet_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._write(f"patch status of InferenceFleet {namespace}/{name}")
        if (namespace, name) in self.fleets:
            self.fleets[(namespace, name)]["status"] = copy.deepcopy(dict(status))

    def post_event(self, involved: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        meta = involved["metadata"]
        self.events.append((fleet_id(meta["namespace"], meta["name"]), kind, reason, message))
