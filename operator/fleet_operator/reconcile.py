"""One reconcile of a fleet (parse → hold GPU nodes → render → apply → status), and release."""

from __future__ import annotations

import datetime
import functools
import logging
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet_spec.spec import FleetSpec, FleetSpecError, parse_fleet

from fleet_operator import apply
from fleet_operator.names import DEVICE_PLUGIN_LABEL, fleet_id
from fleet_operator.render import Owner, render_children
from fleet_operator.sharing import (
    ClaimPlan,
    NodeView,
    claim_patch,
    device_plugin_config,
    plan_claims,
    release_patch,
)
from fleet_operator.status import Observed, compute_status, condition_events, invalid_status

log = logging.getLogger(__name__)

DEFAULT_WORKER_IMAGE = "ghcr.io/inferencefleet/worker:0.1.0"


@dataclass(frozen=True)
class OperatorConfig:
    """What the command line decides for every fleet."""

    device_plugin: apply.DevicePluginConfig = field(default_factory=apply.DevicePluginConfig)
    worker_image: str = DEFAULT_WORKER_IMAGE
    namespaces: tuple[str, ...] | None = None  # watched namespaces; None: all of them

    def watches(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces


# Handlers run in threads: one fleet is reconciled by one of them at a time.
_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_pending: set[str] = set()  # fleets with a status refresh waiting for their lock
_pending_lock = threading.Lock()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hold_nodes(
    spec: FleetSpec, plan: ClaimPlan, cfg: OperatorConfig, fleet: dict[str, Any]
) -> bool:
    """Write the plan's claims and releases to the nodes; True if any node changed."""
    me = fleet_id(spec.namespace, spec.name)
    config = device_plugin_config(spec.gpu)
    if config is not None and plan.hold:  # the profile must exist before a node selects it
        apply.set_device_plugin_profile(cfg.device_plugin, plan.profile, config)
    claimed = [
        name
        for name in plan.claim
        if apply.patch_node(name, lambda node: claim_patch(node, me, plan.profile, spec.gpu.shared))
    ]
    released = [
        name for name in plan.release if apply.patch_node(name, lambda n: release_patch(n, me))
    ]
    if claimed:
        apply.post_event(
            fleet,
            "Normal",
            "NodesClaimed",
            f"holds {', '.join(claimed)} with GPU profile {plan.profile}",
        )
    if released:
        apply.post_event(fleet, "Normal", "NodesReleased", f"gave back {', '.join(released)}")
        _forget_unused_profiles(cfg)
    return bool(claimed or released)


def _forget_unused_profiles(cfg: OperatorConfig) -> None:
    """Remove device plugin configs that this operator wrote and no node selects any more."""
    in_use = {n.labels.get(DEVICE_PLUGIN_LABEL) for n in apply.list_nodes()}
    for key in apply.get_device_plugin_keys(cfg.device_plugin):
        if key.startswith(("timeslicing-", "mps-")) and key not in in_use:
            apply.set_device_plugin_profile(cfg.device_plugin, key, None)


def _drop_stale_claims(plan: ClaimPlan, cfg: OperatorConfig) -> bool:
    """Claims of fleets that no longer exist (deleted while no operator ran) block nobody."""
    dropped = False
    for conflict in plan.conflicts:
        for holder in conflict.fleets:
            namespace, _, name = holder.partition("/")
            if cfg.watches(namespace) and apply.get_fleet(namespace, name) is None:
                log.info("dropping the claim of deleted fleet %s on %s", holder, conflict.node)
                apply.patch_node(conflict.node, functools.partial(release_patch, me=holder))
                dropped = True
    if dropped:
        _forget_unused_profiles(cfg)
    return dropped


def reconcile(fleet: Mapping[str, Any], cfg: OperatorConfig) -> None:
    """Bring the cluster to what the fleet declares, then write its status. Idempotent."""
    meta = fleet["metadata"]
    with _locks[fleet_id(meta["namespace"], meta["name"])]:
        try:
            spec = parse_fleet(fleet)
        except FleetSpecError as error:
            _report_invalid(dict(fleet), str(error))
            raise
        plan = plan_claims(spec, apply.list_nodes())
        if plan.conflicts and _drop_stale_claims(plan, cfg):
            plan = plan_claims(spec, apply.list_nodes())
        if _hold_nodes(spec, plan, cfg, dict(fleet)):
            plan = plan_claims(spec, apply.list_nodes())  # what the nodes now say
        owner = Owner(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation", 1)))
        for manifest in render_children(
            spec,
            owner,
            replicas=plan.desired_replicas,
            profile=plan.profile,
            default_image=cfg.worker_image,
        ):
            apply.apply(manifest)
        _refresh(meta["namespace"], meta["name"])


def refresh_status(namespace: str, name: str) -> None:
    """Recompute the fleet's status from what the cluster shows now.

    Deployment events come in bursts: one refresh waiting for the fleet's lock covers them
    all (it reads the cluster when it runs), so the others return at once."""
    key = fleet_id(namespace, name)
    with _pending_lock:
        if key in _pending:
            return
        _pending.add(key)
    with _locks[key]:
        with _pending_lock:
            _pending.discard(key)
        _refresh(namespace, name)


def _refresh(namespace: str, name: str) -> None:
    fleet = apply.get_fleet(namespace, name)
    if fleet is None or fleet["metadata"].get("deletionTimestamp"):
        return
    try:
        spec = parse_fleet(fleet)
    except FleetSpecError:
        return  # reconcile reports it
    previous: dict[str, Any] = fleet.get("status") or {}
    observed = Observed(
        generation=int(fleet["metadata"].get("generation", 1)),
        deployment=apply.get_deployment(namespace, name),
        pods=apply.list_worker_pods(namespace, name),
        plan=plan_claims(spec, apply.list_nodes()),
    )
    status = compute_status(spec, observed, previous, _now())
    if status != previous:
        apply.patch_fleet_status(namespace, name, status)
    for kind, reason, message in condition_events(
        previous.get("conditions") or [], status["conditions"]
    ):
        apply.post_event(fleet, kind, reason, message)


def _report_invalid(fleet: dict[str, Any], message: str) -> None:
    meta = fleet["metadata"]
    previous: dict[str, Any] = fleet.get("status") or {}
    status = invalid_status(message, int(meta.get("generation", 1)), previous, _now())
    apply.patch_fleet_status(meta["namespace"], meta["name"], status)
    for kind, reason, text in condition_events(
        previous.get("conditions") or [], status["conditions"]
    ):
        apply.post_event(fleet, "Warning" if kind == "Normal" else kind, reason, text)


def release(fleet: Mapping[str, Any], cfg: OperatorConfig) -> list[str]:
    """Give back every node the fleet holds (it is being deleted); return their names."""
    meta = fleet["metadata"]
    me = fleet_id(meta["namespace"], meta["name"])
    with _locks[me]:
        held: list[NodeView] = [n for n in apply.list_nodes() if me in n.claims]
        released = [
            n.name for n in held if apply.patch_node(n.name, lambda v: release_patch(v, me))
        ]
        if released:
            _forget_unused_profiles(cfg)
            apply.post_event(
                dict(fleet), "Normal", "NodesReleased", f"gave back {', '.join(released)}"
            )
    _locks.pop(me, None)
    return released
