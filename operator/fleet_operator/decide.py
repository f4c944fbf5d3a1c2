"""The pure half of a reconcile: from Observations (and the clock) to a Decision.

A Decision says everything a pass will write: device plugin profile keys, node claims and
releases, the children to apply, the status and the events. No API call happens here;
reconcile.act carries a Decision out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet_spec.spec import FleetSpec, FleetSpecError, parse_fleet

from fleet_operator.names import (
    DEVICE_PLUGIN_LABEL,
    PROFILE_LABEL,
)
from fleet_operator.names import fleet_id as make_fleet_id
from fleet_operator.observe import Observations, owns, profiles_by_node, slots_used
from fleet_operator.render import Owner, render_children
from fleet_operator.sharing import (
    CONFIG_SYNC_WAIT,
    DEFAULT_KEY,
    NO_SHARING_CONFIG,
    ClaimPlan,
    NodeView,
    claim_patch,
    device_plugin_config,
    drop_holders,
    node_view,
    patched,
    plan_claims,
    profile_key,
    release_patch,
)
from fleet_operator.status import Observed, compute_status, condition_events, failed_status
from fleet_operator.tuning import plan_tune

# Device plugin keys this operator writes (profile_key's shared names); only these are dropped.
OUR_PROFILE_PREFIXES = ("timeslicing-", "mps-")


@dataclass(frozen=True)
class Event:
    """A core/v1 Event about the fleet."""

    kind: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Apply:
    """A child to server-side apply; force only once the object is known to be the fleet's."""

    manifest: Mapping[str, Any]
    force: bool


@dataclass(frozen=True)
class Decision:
    """What one pass writes, in the order reconcile.act writes it."""

    profiles_to_write: Mapping[str, str] = field(default_factory=dict)  # before any node uses them
    node_patches: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    profiles_to_drop: tuple[str, ...] = ()  # after the nodes stopped using them
    children: tuple[Apply, ...] = ()
    status: Mapping[str, Any] | None = None  # None: unchanged
    events: tuple[Event, ...] = ()
    invalid: str | None = None  # the spec cannot work: why
    waits_for_key_sync: bool = False  # a held node waits for its profile key to reach the volume


@dataclass(frozen=True)
class Settings:
    """What the command line decides for every fleet."""

    worker_image: str
    worker_device: str = "cuda"  # the workers' --device ("cpu" where GPUs are simulated)
    device_plugin_configmap: str = "nvidia-device-plugin/device-plugin-config"  # "ns/name"


def covers(observed: Any, desired: Any) -> bool:
    """Does the observed object already hold every value of the desired one (a subset test;
    scalars compared as text, since the apiserver writes quantities such as 1 as "1"; an empty
    or false value may be missing, as the API leaves such fields out)."""
    if observed is None:
        return not desired
    if isinstance(desired, Mapping):
        return isinstance(observed, Mapping) and all(
            covers(observed.get(key), value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(desired)
            and all(covers(o, d) for o, d in zip(observed, desired, strict=True))
        )
    return str(observed) == str(desired)


def _owner(fleet: Mapping[str, Any]) -> Owner:
    meta = fleet["metadata"]
    return Owner(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation", 1)))


def _stale_holders(plan: ClaimPlan, obs: Observations) -> set[str]:
    """Fleets that hold nodes this fleet needs but no longer exist (deleted while no operator
    ran). Only fleets of watched namespaces can be known to be gone."""
    holders = {holder for conflict in plan.conflicts for holder in conflict.fleets}
    return {
        holder
        for holder in holders
        if obs.watches(holder.partition("/")[0]) and holder not in obs.fleets
    }


def _children(
    spec: FleetSpec, obs: Observations, plan: ClaimPlan, settings: Settings
) -> tuple[list[Apply], list[str], Mapping[str, Any] | None]:
    """Children to apply, names taken by objects that are not ours, our observed Deployment."""
    applies: list[Apply] = []
    not_owned: list[str] = []
    deployment: Mapping[str, Any] | None = None
    for manifest in render_children(
        spec,
        _owner(obs.fleet),
        replicas=plan.desired_replicas,
        profile=plan.profile,
        default_image=settings.worker_image,
        device=settings.worker_device,
    ):
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        observed = obs.children.get((kind, name))
        if observed is None:
            applies.append(Apply(manifest, force=False))
        elif not owns(obs.fleet, observed):
            not_owned.append(f"{kind} {spec.namespace}/{name}")
        else:
            if kind == "Deployment":
                deployment = observed
            if not covers(observed, manifest):
                applies.append(Apply(manifest, force=True))
    if not_owned:  # no worker pods while their config or Service may be someone else's
        applies = [a for a in applies if a.manifest["kind"] != "Deployment"]
    return applies, not_owned, deployment


def _profiles_to_drop(
    obs: Observations, nodes_after: Sequence[NodeView], keep: str | None
) -> tuple[str, ...]:
    """Device plugin keys this operator wrote that no node selects any more (nor is held
    under, waiting to select it)."""
    in_use = {node.labels.get(DEVICE_PLUGIN_LABEL) for node in nodes_after}
    in_use |= {node.labels.get(PROFILE_LABEL) for node in nodes_after}
    return tuple(
        sorted(
            key
            for key in obs.device_plugin or {}
            if key.startswith(OUR_PROFILE_PREFIXES) and key not in in_use and key != keep
        )
    )


def _default_key(obs: Observations, writing: bool) -> dict[str, str]:
    """The key that shares nothing, when the ConfigMap lacks it and this pass writes to it:
    without it config-manager's fallback hands a profile to every unlabelled GPU node."""
    if writing and DEFAULT_KEY not in (obs.device_plugin or {}):
        return {DEFAULT_KEY: NO_SHARING_CONFIG}
    return {}


def _invalid(obs: Observations, message: str, now: str) -> Decision:
    meta, previous = obs.fleet["metadata"], obs.fleet.get("status") or {}
    status = failed_status("InvalidSpec", message, int(meta.get("generation", 1)), previous, now)
    events = tuple(
        Event("Warning" if kind == "Normal" else kind, reason, text)
        for kind, reason, text in condition_events(
            previous.get("conditions") or [], status["conditions"]
        )
    )
    return Decision(status=None if status == previous else status, events=events, invalid=message)


def decide(obs: Observations, settings: Settings, now: str) -> Decision:
    """Everything one pass should write to bring the cluster to what the fleet declares."""
    try:
        spec = parse_fleet(obs.fleet)
    except FleetSpecError as error:
        return _invalid(obs, str(error), now)
    me = make_fleet_id(spec.namespace, spec.name)
    nodes = {view.name: view for view in (node_view(node) for node in obs.nodes)}
    patches: dict[str, Mapping[str, Any]] = {}
    events: list[Event] = []
    pods_on, used = profiles_by_node(obs.pods), slots_used(obs.other_pods)
    config = device_plugin_config(spec.gpu)
    key = profile_key(spec.gpu)
    config_ready = obs.synced_keys is None or (
        key in obs.synced_keys and (obs.device_plugin or {}).get(key) == config
    )
    plan = plan_claims(spec, list(nodes.values()), pods_on, used, config_ready)
    stale = _stale_holders(plan, obs)
    if stale:
        for name, view in list(nodes.items()):
            after, dropped = drop_holders(view, stale)
            if dropped:
                nodes[name], patches[name] = after, dropped
        plan = plan_claims(spec, list(nodes.values()), pods_on, used, config_ready)
    claimed, released = [], []
    reserve = dict(plan.reserve)
    for name in plan.hold:
        claim = claim_patch(
            nodes[name], me, plan.profile, spec.gpu.shared, config_ready, reserve.get(name)
        )
        if claim:  # None: not ours to take after all; {}: already as it should be
            patches[name] = claim
            nodes[name] = patched(nodes[name], claim)
            if name in plan.claim:
                claimed.append(name)
    for name in plan.release:
        patch = release_patch(nodes[name], me)
        if patch:
            patches[name] = patch
            nodes[name] = patched(nodes[name], patch)
            released.append(name)
    if claimed:
        events.append(
            Event(
                "Normal",
                "NodesClaimed",
                f"holds {', '.join(claimed)} with GPU profile {plan.profile}",
            )
        )
    if released:
        events.append(Event("Normal", "NodesReleased", f"gave back {', '.join(released)}"))

    write: dict[str, str] = {}
    if config is not None and plan.hold and (obs.device_plugin or {}).get(plan.profile) != config:
        write[plan.profile] = config
    write.update(_default_key(obs, bool(write)))
    drop: tuple[str, ...] = ()
    if released or stale:
        drop = _profiles_to_drop(obs, list(nodes.values()), plan.profile if plan.hold else None)

    applies, not_owned, deployment = _children(spec, obs, plan, settings)
    tune = plan_tune(
        spec,
        obs.fleet,
        obs.tune_jobs,
        obs.tune_pods,
        owner=_owner(obs.fleet),
        image=spec.image or settings.worker_image,
        device=settings.worker_device,
        now=now,
    )
    if tune.job is not None:
        applies.append(Apply(tune.job, force=tune.force))
    if tune.event is not None:
        events.append(Event(*tune.event))
    previous: Mapping[str, Any] = obs.fleet.get("status") or {}
    observed = Observed(
        generation=int(obs.fleet["metadata"].get("generation", 1)),
        deployment=deployment,
        pods=obs.pods,
        plan=plan,
        not_owned=tuple(not_owned),
        configmap_missing=(
            settings.device_plugin_configmap
            if spec.gpu.shared and obs.device_plugin is None
            else None
        ),
    )
    status = compute_status(spec, observed, previous, now)
    if tune.status is not None:
        status["tune"] = dict(tune.status)
    events += [
        Event(kind, reason, message)
        for kind, reason, message in condition_events(
            previous.get("conditions") or [], status["conditions"]
        )
    ]
    return Decision(
        profiles_to_write=write,
        node_patches=tuple(sorted(patches.items())),
        profiles_to_drop=drop,
        children=tuple(applies),
        status=None if status == previous else status,
        events=tuple(events),
        waits_for_key_sync=any(why == CONFIG_SYNC_WAIT for _, why in plan.pending),
    )


def decide_release(obs: Observations) -> Decision:
    """The fleet is being deleted: give back every node it holds (its children go by owner
    garbage collection), and drop the profiles no node selects any more."""
    meta = obs.fleet["metadata"]
    me = make_fleet_id(meta["namespace"], meta["name"])
    patches: list[tuple[str, Mapping[str, Any]]] = []
    after: list[NodeView] = []
    for view in (node_view(node) for node in obs.nodes):
        patch = release_patch(view, me)
        if patch:
            patches.append((view.name, patch))
            view = patched(view, patch)
        after.append(view)
    if not patches:
        return Decision()
    names = ", ".join(name for name, _ in patches)
    return Decision(
        node_patches=tuple(patches),
        profiles_to_drop=_profiles_to_drop(obs, after, None),
        events=(Event("Normal", "NodesReleased", f"gave back {names}"),),
    )
