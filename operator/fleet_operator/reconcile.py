"""A reconcile pass carried out: decide from observations, act through a Kube, report failures.

Handlers (handlers.py) observe from kopf's indexes and hand the Observations here. A pass
holds its fleet's lock while it decides and acts; a failed pass backs off, longer each time,
and its fleet's status and events say what the apiserver answered.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fleet_operator.decide import Decision, Settings, decide, decide_release
from fleet_operator.kube import ApiError, ConfigMapRef, Kube
from fleet_operator.names import fleet_id
from fleet_operator.observe import Observations, trim_node
from fleet_operator.status import failed_status

log = logging.getLogger(__name__)

DEFAULT_WORKER_IMAGE = "ghcr.io/inferencefleet/worker:0.1.0"
# How long after a ConfigMap change the device plugin's volume may still show the old data: the
# kubelet's sync period (1 min by default) plus its cache, with a margin.
CONFIG_VOLUME_DELAY = 90.0
FIRST_BACKOFF = 5.0  # seconds after a first failure; doubles with each failure in a row
MAX_BACKOFF = 600.0


def _version(node: Mapping[str, Any]) -> int:
    """A node's resourceVersion as a number (etcd's revision; 0 if it is not one)."""
    try:
        return int(node["metadata"].get("resourceVersion", "0"))
    except ValueError:
        return 0


class Retry(Exception):
    """A write met an object that changed under it: decide again from a fresh look."""


class SpecInvalid(Exception):
    """The fleet's spec cannot work; its status says why."""


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_reason(error: ApiError) -> str:
    """The condition reason for an API refusal: Forbidden and Invalid will not heal by waiting."""
    if error.status == 403:
        return "Forbidden"
    if error.status in (400, 422):
        return "Invalid"
    return "APIError"


def act(
    decision: Decision,
    fleet: Mapping[str, Any],
    kube: Kube,
    where: ConfigMapRef,
    wrote_node: Callable[[Mapping[str, Any]], None] = lambda node: None,
) -> None:
    """Write a decision: profiles a node may select, nodes, unused profiles, children, status,
    events. Idempotent; a write that meets a changed object raises Retry. Each node as the
    apiserver returned it goes to `wrote_node`."""
    if decision.profiles_to_write:
        kube.patch_configmap_data(where, dict(decision.profiles_to_write))
    for name, patch in decision.node_patches:
        try:
            wrote_node(kube.patch_node(name, patch))
        except ApiError as error:
            if error.conflict:
                raise Retry(f"node {name} changed while this pass decided") from error
            raise
    if decision.profiles_to_drop:
        kube.patch_configmap_data(where, dict.fromkeys(decision.profiles_to_drop))
    for child in decision.children:
        try:
            kube.apply(child.manifest, force=child.force)
        except ApiError as error:
            if error.conflict and not child.force:
                meta = child.manifest["metadata"]
                raise Retry(
                    f"{child.manifest['kind']} {meta['namespace']}/{meta['name']} appeared "
                    f"and is not this fleet's: {error.message}"
                ) from error
            raise
    meta = fleet["metadata"]
    if decision.status is not None:
        kube.patch_fleet_status(meta["namespace"], meta["name"], decision.status)
    for event in decision.events:
        kube.post_event(fleet, event.kind, event.reason, event.message)


@dataclass(frozen=True)
class _Failures:
    count: int
    not_before: float  # time.monotonic()
    generation: int


class Reconciler:
    """Runs passes for every fleet: one at a time per fleet, with a backoff after failures."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        device_plugin: ConfigMapRef,
        clock: Callable[[], str] = now_text,
        config_volume_delay: float = CONFIG_VOLUME_DELAY,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.settings, self.device_plugin, self.clock = (
            kube,
            settings,
            device_plugin,
            clock,
        )
        self.config_volume_delay, self._monotonic = config_volume_delay, monotonic
        # When each key of the device plugin's ConfigMap was first seen (or written) by this
        # process: a node is pointed at a key only once the kubelet can have synced it.
        self._key_since: dict[str, float] = {}
        # One pass at a time, for every fleet: fleets claim the same nodes, and each pass
        # must see the claims the one before it wrote.
        self._lock = threading.Lock()
        # Nodes as this operator last wrote them, until the watch delivers that version.
        self._nodes: dict[str, Mapping[str, Any]] = {}
        self._failures: dict[str, _Failures] = {}
        # The status last written, by fleet uid: only this operator writes it, so it is the
        # current one even when the watch has not delivered it yet.
        self._written: dict[str, Mapping[str, Any]] = {}

    def _wrote_node(self, node: Mapping[str, Any]) -> None:
        self._nodes[node["metadata"]["name"]] = trim_node(node)

    def _current_nodes(self, observed: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The observed nodes, each replaced by the one this operator wrote if that is newer."""
        current = []
        for node in observed:
            name = node["metadata"]["name"]
            written = self._nodes.get(name)
            if written is not None and _version(written) > _version(node):
                current.append(written)
            else:
                self._nodes.pop(name, None)  # the watch has caught up (or someone wrote later)
                current.append(node)
        return current

    def _synced_keys(self, data: Mapping[str, str] | None) -> frozenset[str] | None:
        """Keys present in the ConfigMap for at least the volume delay (first seen counts as
        written: after a restart the operator waits once more rather than guess); None when
        there is no delay."""
        if self.config_volume_delay <= 0:
            return None
        now = self._monotonic()
        present = set(data or {})
        for key in list(self._key_since):
            if key not in present:
                del self._key_since[key]
        for key in present:
            self._key_since.setdefault(key, now)
        return frozenset(
            key for key, since in self._key_since.items() if now - since >= self.config_volume_delay
        )

    def seconds_to_key_sync(self) -> float | None:
        """Seconds until the next ConfigMap key is old enough to be selected (None: none
        waits)."""
        if self.config_volume_delay <= 0:
            return None
        now = self._monotonic()
        waits = [
            since + self.config_volume_delay - now
            for since in self._key_since.values()
            if now - since < self.config_volume_delay
        ]
        return max(0.0, min(waits)) if waits else None

    def _with_written_status(self, fleet: Mapping[str, Any]) -> Mapping[str, Any]:
        written = self._written.get(fleet["metadata"].get("uid", ""))
        return fleet if written is None else {**fleet, "status": written}

    def backing_off(self, fleet: Mapping[str, Any]) -> float:
        """Seconds left before a fleet that failed may be tried again (0: go ahead). A new
        generation of the spec is tried at once."""
        meta = fleet["metadata"]
        failures = self._failures.get(fleet_id(meta["namespace"], meta["name"]))
        if failures is None or failures.generation != int(meta.get("generation", 1)):
            return 0.0
        return max(0.0, failures.not_before - time.monotonic())

    def reconcile(self, obs: Observations) -> Decision:
        """Decide and act for one fleet. Raises SpecInvalid, Retry or ApiError (reported)."""
        meta = obs.fleet["metadata"]
        key = fleet_id(meta["namespace"], meta["name"])
        with self._lock:
            try:
                data = self.kube.configmap_data(self.device_plugin)
                obs = replace(
                    obs,
                    fleet=self._with_written_status(obs.fleet),
                    nodes=self._current_nodes(obs.nodes),
                    device_plugin=data,
                    synced_keys=self._synced_keys(data),
                )
                decision = decide(obs, self.settings, self.clock())
                act(decision, obs.fleet, self.kube, self.device_plugin, self._wrote_node)
                for key in decision.profiles_to_write:
                    self._key_since.setdefault(key, self._monotonic())
                if decision.status is not None:
                    self._written[meta.get("uid", "")] = decision.status
            except ApiError as error:
                self._failed(obs.fleet, error)
                raise
            if decision.invalid is not None:
                raise SpecInvalid(decision.invalid)
            self._failures.pop(key, None)
            return decision

    def release(self, obs: Observations) -> list[str]:
        """The fleet is being deleted: give its nodes back; return their names."""
        meta = obs.fleet["metadata"]
        key = fleet_id(meta["namespace"], meta["name"])
        with self._lock:
            obs = replace(
                obs,
                nodes=self._current_nodes(obs.nodes),
                device_plugin=self.kube.configmap_data(self.device_plugin),
            )
            decision = decide_release(obs)
            act(decision, obs.fleet, self.kube, self.device_plugin, self._wrote_node)
        self._failures.pop(key, None)
        self._written.pop(meta.get("uid", ""), None)
        return [name for name, _ in decision.node_patches]

    def _failed(self, fleet: Mapping[str, Any], error: ApiError) -> None:
        """Remember the failure (for the backoff) and say what the apiserver answered: in the
        log, in an Event and in the Ready condition (unless the status write itself failed)."""
        meta = fleet["metadata"]
        key = fleet_id(meta["namespace"], meta["name"])
        generation = int(meta.get("generation", 1))
        before = self._failures.get(key)
        count = before.count + 1 if before and before.generation == generation else 1
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (count - 1))
        self._failures[key] = _Failures(count, time.monotonic() + delay, generation)
        reason = api_reason(error)
        log.error(
            "fleet %s: %s (failure %d in a row; next try in %.0f s)", key, error, count, delay
        )
        self.kube.post_event(fleet, "Warning", reason, str(error))
        if "status" in error.action:
            return
        previous: Mapping[str, Any] = self._with_written_status(fleet).get("status") or {}
        status = failed_status(reason, str(error), generation, previous, self.clock())
        try:
            self.kube.patch_fleet_status(meta["namespace"], meta["name"], status)
            self._written[meta.get("uid", "")] = status
        except ApiError as also:
            log.error("fleet %s: could not report the failure in status: %s", key, also)

    def backoff_seconds(self, fleet: Mapping[str, Any]) -> float:
        """The delay a handler should ask kopf for after this fleet's latest failure."""
        meta = fleet["metadata"]
        failures = self._failures.get(fleet_id(meta["namespace"], meta["name"]))
        return min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (failures.count - 1)) if failures else 1.0
