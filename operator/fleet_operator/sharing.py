"""GPU sharing profiles and node claims: which nodes a fleet may use, hold and give back (pure).

A node runs one GPU profile at a time (`exclusive`, `timeslicing-N` or `mps-N`): the device
plugin applies sharing per node. A fleet holds a node by adding itself to the node's
claims annotation, writing the slots it means to use there into the reservations annotation,
and setting the profile label (plus, when shared and once the device plugin's volume can hold
the profile's key, `nvidia.com/device-plugin.config`). Fleets with the same profile may share
a node, each within the slots the others leave; a node held under another profile is never
relabelled: it is reported as a conflict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from fleet_spec.capacity import Capacity, GpuHost, check_capacity, host_slots
from fleet_spec.spec import FleetSpec, GpuSpec

from fleet_operator.names import (
    CLAIMS_ANNOTATION,
    COUNT_LABEL,
    DEVICE_PLUGIN_LABEL,
    GPU_RESOURCE,
    MEMORY_LABEL,
    PRODUCT_LABEL,
    PROFILE_LABEL,
    RESERVED_ANNOTATION,
    SHARED_SUFFIX,
    fleet_id,
)

EXCLUSIVE = "exclusive"
# The device plugin key that shares nothing: config-manager's `named` fallback selects it on
# every node without the config label, so a GPU no fleet shares stays unshared.
DEFAULT_KEY = "default"
NO_SHARING_CONFIG = "version: v1\nflags:\n  migStrategy: none\n"
# Taints Kubernetes itself puts on a node: new pods stay away, but a held node is kept.
SYSTEM_TAINT_PREFIX = "node.kubernetes.io/"
# What the device plugin and feature discovery say a node runs (the profile as applied).
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
STRATEGY_LABEL = "nvidia.com/gpu.sharing-strategy"
_STRATEGY_VALUE = {"timeSlicing": "time-slicing", "mps": "mps"}
# GPU feature discovery's MIG labels, and NVIDIA's MIG manager's.
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
MIG_CONFIG_LABEL = "nvidia.com/mig.config"
_STRATEGY = {"timeSlicing": ("timeslicing", "timeSlicing"), "mps": ("mps", "mps")}


def profile_key(gpu: GpuSpec) -> str:
    """The profile's name: a node label value and, when shared, the device plugin ConfigMap key."""
    if not gpu.shared:
        return EXCLUSIVE
    return f"{_STRATEGY[gpu.sharing][0]}-{gpu.workers_per_gpu}"


def device_plugin_config(gpu: GpuSpec) -> str | None:
    """The NVIDIA device plugin config (a ConfigMap value) for a shared profile, else None."""
    if not gpu.shared:
        return None
    section: dict[str, Any] = {
        "resources": [{"name": GPU_RESOURCE, "replicas": gpu.workers_per_gpu}],
    }
    if gpu.sharing == "timeSlicing":
        section = {"renameByDefault": False, "failRequestsGreaterThanOne": True, **section}
    document = {
        "version": "v1",
        "flags": {"migStrategy": "none"},
        "sharing": {_STRATEGY[gpu.sharing][1]: section},
    }
    return yaml.safe_dump(document, sort_keys=False)


def product_values(product: str) -> list[str]:
    """Label values a node of this product may carry (feature discovery appends -SHARED)."""
    shared = product + SHARED_SUFFIX
    return [product, shared] if len(shared) <= 63 else [product]


@dataclass(frozen=True)
class NodeView:
    """What claiming a node needs to know about it."""

    name: str
    labels: Mapping[str, str]
    gpus: int
    memory_mib: int | None
    claims: frozenset[str]
    unschedulable: bool = False
    taints: tuple[Mapping[str, Any], ...] = ()
    resource_version: str = ""
    allocatable: Mapping[str, str] = field(default_factory=dict)
    reserved: Mapping[str, int] = field(default_factory=dict)  # holder -> slots it means to use

    @property
    def config_label(self) -> str | None:
        return self.labels.get(DEVICE_PLUGIN_LABEL)

    @property
    def product(self) -> str | None:
        value = self.labels.get(PRODUCT_LABEL)
        return value.removesuffix(SHARED_SUFFIX) if value else None

    @property
    def profile(self) -> str | None:
        return self.labels.get(PROFILE_LABEL)

    @property
    def foreign_config(self) -> str | None:
        """A device plugin config that some other party selected on this node."""
        config = self.labels.get(DEVICE_PLUGIN_LABEL)
        return config if config and config != self.profile else None

    def host(self) -> GpuHost:
        return GpuHost(self.name, self.gpus, self.memory_mib)

    @property
    def mig(self) -> str | None:
        """How the node's GPUs are partitioned by MIG (the label that says so), or None."""
        strategy = self.labels.get(MIG_STRATEGY_LABEL, "none")
        if strategy not in ("", "none"):
            return f"{MIG_STRATEGY_LABEL}={strategy}"
        config = self.labels.get(MIG_CONFIG_LABEL, "all-disabled")
        if config not in ("", "all-disabled"):
            return f"{MIG_CONFIG_LABEL}={config}"
        return None


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def parse_reserved(text: str) -> dict[str, int]:
    """The reservations annotation ("ns/a=4,ns/b=2") as holder -> slots; bad entries are
    left out (they reserve nothing)."""
    reserved: dict[str, int] = {}
    for entry in text.split(","):
        holder, _, slots = entry.partition("=")
        count = _int(slots)
        if holder and count is not None and count >= 0:
            reserved[holder] = count
    return reserved


def format_reserved(reserved: Mapping[str, int]) -> str | None:
    """The reservations annotation's value (None: remove the annotation)."""
    return ",".join(f"{holder}={reserved[holder]}" for holder in sorted(reserved)) or None


def node_view(node: Mapping[str, Any]) -> NodeView:
    """Read a Node (as a dict, the API's field names) into a NodeView."""
    meta, spec = node.get("metadata", {}), node.get("spec", {})
    node_labels: dict[str, str] = dict(meta.get("labels") or {})
    annotations = meta.get("annotations") or {}
    claims = annotations.get(CLAIMS_ANNOTATION, "")
    gpus = _int(node_labels.get(COUNT_LABEL, ""))
    if gpus is None:  # no feature discovery label: the advertised count, unshared
        capacity = node.get("status", {}).get("capacity") or {}
        gpus = _int(capacity.get(GPU_RESOURCE, "0")) or 0
    return NodeView(
        name=meta["name"],
        labels=node_labels,
        gpus=gpus,
        memory_mib=_int(node_labels.get(MEMORY_LABEL, "")),
        claims=frozenset(c for c in claims.split(",") if c),
        unschedulable=bool(spec.get("unschedulable", False)),
        taints=tuple(spec.get("taints") or ()),
        resource_version=str(meta.get("resourceVersion", "")),
        allocatable=dict((node.get("status") or {}).get("allocatable") or {}),
        reserved=parse_reserved(annotations.get(RESERVED_ANNOTATION, "")),
    )


def not_advertised(gpu: GpuSpec, node: NodeView) -> str | None:
    """Why the node does not (yet) advertise the profile, or None once it does: the device
    plugin's allocatable GPUs (plain or renamed .shared) are GPUs x replicas, and feature
    discovery's replicas and sharing-strategy labels say the same."""
    replicas = gpu.workers_per_gpu if gpu.shared else 1
    strategy = _STRATEGY_VALUE.get(gpu.sharing, "none") if gpu.shared else "none"
    slots = {
        name: value
        for name in (GPU_RESOURCE, GPU_RESOURCE + ".shared")
        if (value := node.allocatable.get(name)) is not None
    }
    advertised = {
        REPLICAS_LABEL: node.labels.get(REPLICAS_LABEL, "1" if not gpu.shared else "?"),
        STRATEGY_LABEL: node.labels.get(STRATEGY_LABEL, "none" if not gpu.shared else "?"),
    }
    wanted = {REPLICAS_LABEL: str(replicas), STRATEGY_LABEL: strategy}
    if not slots:
        return f"no device plugin advertises {GPU_RESOURCE} on it"
    if str(node.gpus * replicas) not in slots.values():
        got = ", ".join(f"{k}={v}" for k, v in sorted(slots.items())) or f"no {GPU_RESOURCE}"
        return f"advertises {got}, not {node.gpus * replicas} slots"
    wrong = [f"{k}={advertised[k]}" for k in sorted(wanted) if advertised[k] != wanted[k]]
    return f"advertises {', '.join(wrong)}" if wrong else None


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") not in (None, "", taint.get("effect")):
            continue
        if toleration.get("operator") == "Exists" and toleration.get("key") in (None, ""):
            return True
        if toleration.get("key") != taint.get("key"):
            continue
        if toleration.get("operator") == "Exists" or toleration.get("value", "") == taint.get(
            "value", ""
        ):
            return True
    return False


GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def matches(spec: FleetSpec, node: NodeView, held: bool = False) -> bool:
    """Could the fleet's pods run here: the GPU product, the extra node selector, the taints.
    A node the fleet holds keeps matching under Kubernetes' own taints (cordon, not-ready,
    pressure): its pods may still run there, and new ones stay away by the taint itself."""
    if node.gpus <= 0:
        return False
    if spec.gpu.product is not None and node.product != spec.gpu.product:
        return False
    if any(node.labels.get(key) != value for key, value in spec.node_selector.items()):
        return False
    tolerations = [GPU_TOLERATION, *spec.tolerations]
    return all(
        _tolerated(taint, tolerations)
        for taint in node.taints
        if taint.get("effect") in ("NoSchedule", "NoExecute")
        and not (held and str(taint.get("key", "")).startswith(SYSTEM_TAINT_PREFIX))
    )


@dataclass(frozen=True)
class Conflict:
    """A node of the right product that another profile holds."""

    node: str
    profile: str
    fleets: tuple[str, ...]

    def describe(self) -> str:
        holders = ", ".join(self.fleets) if self.fleets else "set outside InferenceFleet"
        return f"{self.node} runs {self.profile} ({holders})"


@dataclass(frozen=True)
class ClaimPlan:
    """The nodes a fleet should hold, what to change on them, and the capacity that results."""

    profile: str
    hold: tuple[str, ...]  # nodes held after the plan (kept and newly claimed)
    claim: tuple[str, ...]  # nodes to claim now (new, or relabelled to a new profile)
    release: tuple[str, ...]  # nodes to give back
    conflicts: tuple[Conflict, ...]  # nodes the fleet could not use because of another profile
    capacity: Capacity
    mig_refused: tuple[str, ...] = ()  # "node (label=value)": MIG mode, where MPS cannot run
    waiting: tuple[str, ...] = ()  # held under an old profile until the old pods leave
    pending: tuple[tuple[str, str], ...] = ()  # (node, why): held, profile not advertised yet
    reserve: tuple[tuple[str, int], ...] = ()  # (node, slots) this fleet means to use, held nodes
    held_back: int = 0  # slots on pending nodes no pod of the fleet uses yet: not asked for

    @property
    def applied(self) -> tuple[str, ...]:
        """Held nodes that advertise the profile."""
        waiting = {node for node, _ in self.pending}
        return tuple(node for node in self.hold if node not in waiting)

    @property
    def desired_replicas(self) -> int:
        """Pods to ask for: never more than the held GPUs take, so no pod waits without a word,
        and none for a node that does not advertise the profile yet (it would get a whole GPU
        under the old profile)."""
        ready = self.capacity.slots_available - self.held_back
        return max(0, min(self.capacity.slots_needed, ready))


def _usable(node: NodeView, me: str, key: str) -> bool:
    """May this fleet hold the node under `key` without taking it from anyone?"""
    if node.foreign_config:
        return False
    others = node.claims - {me}
    return node.profile in (None, key) if others else True


def _keep_needed(
    kept: Sequence[NodeView],
    pods_on: Mapping[str, Sequence[str]],
    free: Callable[[NodeView], int],
    replicas: int,
) -> tuple[list[NodeView], list[str]]:
    """Of the nodes held, those still needed: every node a pod of the fleet runs on, then the
    others (by name) while the slots fall short of the replicas. The rest are given back."""
    keep = [n for n in kept if pods_on.get(n.name)]
    slots = sum(free(n) for n in keep)
    surplus: list[str] = []
    for node in sorted((n for n in kept if not pods_on.get(n.name)), key=lambda n: n.name):
        if slots < replicas:
            keep.append(node)
            slots += free(node)
        else:
            surplus.append(node.name)
    return keep, surplus


def taken_by_others(node: NodeView, me: str, used: Mapping[str, int]) -> int:
    """Slots other fleets take on the node: per fleet, its pods there or what it reserved
    there, whichever is more (a fleet's pods not yet made count through its reservation)."""
    others = (set(used) | set(node.reserved)) - {me}
    return sum(max(used.get(f, 0), node.reserved.get(f, 0)) for f in others)


def plan_claims(
    spec: FleetSpec,
    nodes: Sequence[NodeView],
    pods_on: Mapping[str, Sequence[str]] | None = None,
    used: Mapping[str, Mapping[str, int]] | None = None,
    config_ready: bool = True,
) -> ClaimPlan:
    """Decide which nodes the fleet holds: keep what it has and still needs, add usable nodes
    until it fits. `pods_on` names, per node, the profile each pod of the fleet there was
    placed under ("" when not known); `used` per node the pods each other fleet runs there;
    `config_ready`: the device plugin's volume can hold the profile's key by now, so nodes
    may be switched to it."""
    me, key = fleet_id(spec.namespace, spec.name), profile_key(spec.gpu)
    pods_on, used = pods_on or {}, used or {}

    def free(node: NodeView) -> int:
        taken = taken_by_others(node, me, used.get(node.name, {}))
        return max(0, host_slots(spec, node.host()) - taken)

    refused = {
        n.name: n.mig
        for n in nodes
        if spec.gpu.sharing == "mps" and n.mig is not None and matches(spec, n, me in n.claims)
    }
    candidates = [
        n for n in nodes if matches(spec, n, held=me in n.claims) and n.name not in refused
    ]
    kept: list[NodeView] = []
    switch: list[NodeView] = []
    waiting: list[str] = []
    release = [
        n.name
        for n in nodes
        if me in n.claims and (n.name in refused or not matches(spec, n, held=True))
    ]
    for node in candidates:
        if me not in node.claims:
            continue
        if node.profile == key and not node.foreign_config:
            kept.append(node)
        elif _usable(node, me, key) and host_slots(spec, node.host()) > 0:
            if any(profile != key for profile in pods_on.get(node.name, ())):
                waiting.append(node.name)  # the old profile's pods still run there
            else:
                switch.append(node)  # held alone under an old profile: switch it
        else:
            release.append(node.name)
    kept, surplus = _keep_needed([*kept, *switch], pods_on, free, spec.replicas)
    release += surplus
    hold = list(kept)
    claim = [n.name for n in switch if n in kept]
    slots = sum(free(n) for n in hold)
    conflicts: list[Conflict] = []
    # Prefer nodes already running our profile, then free ones; by name for a stable order.
    rest = sorted(
        (n for n in candidates if me not in n.claims and host_slots(spec, n.host()) > 0),
        key=lambda n: (n.profile != key, bool(n.claims), n.name),
    )
    for node in rest:
        if slots >= spec.replicas:
            break
        if not _usable(node, me, key):  # a conflict even when the other profile fills it
            profile = node.foreign_config or node.profile or "?"
            conflicts.append(Conflict(node.name, profile, tuple(sorted(node.claims))))
        elif not node.unschedulable and free(node) > 0:
            hold.append(node)
            claim.append(node.name)
            slots += free(node)
    too_small = [n for n in candidates if host_slots(spec, n.host()) == 0]
    hosts = {n.name: n.host() for n in [*hold, *too_small]}
    capacity = check_capacity(spec, [hosts[name] for name in sorted(hosts)])
    taken = sum(host_slots(spec, n.host()) - free(n) for n in hold)
    if taken:  # slots other fleets' pods take on the nodes held
        capacity = replace(capacity, slots_available=capacity.slots_available - taken)
    reserve = _reserve(hold, pods_on, free, spec.replicas)
    pending = _pending(spec.gpu, hold, claim, config_ready)
    waiting_for = {node for node, _ in pending}
    held_back = sum(
        max(0, free(node) - len(pods_on.get(node.name, ())))
        for node in hold
        if node.name in waiting_for
    )
    return ClaimPlan(
        profile=key,
        hold=tuple(sorted(n.name for n in hold)),
        claim=tuple(sorted(claim)),
        release=tuple(sorted(release)),
        conflicts=tuple(conflicts),
        capacity=capacity,
        mig_refused=tuple(f"{name} ({label})" for name, label in sorted(refused.items())),
        waiting=tuple(sorted(waiting)),
        pending=pending,
        reserve=reserve,
        held_back=held_back,
    )


def _reserve(
    hold: Sequence[NodeView],
    pods_on: Mapping[str, Sequence[str]],
    free: Callable[[NodeView], int],
    replicas: int,
) -> tuple[tuple[str, int], ...]:
    """The slots to reserve on each held node: the replicas spread over the nodes the fleet's
    pods run on first, then the others by name, each node up to what the others leave."""
    order = sorted(hold, key=lambda n: (not pods_on.get(n.name), n.name))
    reserve: dict[str, int] = {}
    left = replicas
    for node in order:
        reserve[node.name] = min(free(node), left)
        left -= reserve[node.name]
    return tuple(sorted(reserve.items()))


CONFIG_SYNC_WAIT = (
    "waiting for the kubelet to bring the profile's key into the device plugin's ConfigMap "
    "volume before labelling the node"
)


def _pending(
    gpu: GpuSpec, hold: Sequence[NodeView], claim: Sequence[str], config_ready: bool
) -> tuple[Any, ...]:
    """(node, why) for each held node that does not advertise the shared profile yet."""
    if not gpu.shared:
        return ()  # exclusive is what a node without the config label runs
    key = profile_key(gpu)
    pending: list[tuple[str, str]] = []
    for node in sorted(hold, key=lambda n: n.name):
        if node.config_label != key and not config_ready:
            why: str | None = CONFIG_SYNC_WAIT
        elif node.name in claim or node.config_label != key:
            why = "labelled now"
        else:
            why = not_advertised(gpu, node)
        if why is not None:
            pending.append((node.name, why))
    return tuple(pending)


def claim_patch(
    node: NodeView,
    me: str,
    key: str,
    shared: bool,
    config_ready: bool = True,
    reserve: int | None = None,
) -> dict[str, Any] | None:
    """The node patch that makes `me` hold it under `key` (reserving `reserve` slots when
    given); None if the node is no longer usable. The device plugin's config label is set only
    once `config_ready` (its volume can hold the key), and never taken off a node that has it."""
    if not _usable(node, me, key):
        return None
    claims = ",".join(sorted(node.claims | {me}))
    if not shared:
        config_label = None
    elif config_ready or node.config_label == key:
        config_label = key
    else:
        config_label = None
    reserved = dict(node.reserved)
    if reserve is not None:
        reserved[me] = reserve
    if (
        node.profile == key
        and node.config_label == config_label
        and me in node.claims
        and reserved == node.reserved
    ):
        return {}
    annotations: dict[str, str | None] = {CLAIMS_ANNOTATION: claims}
    if reserved != node.reserved:
        annotations[RESERVED_ANNOTATION] = format_reserved(reserved)
    return {
        "metadata": {
            "resourceVersion": node.resource_version,
            "labels": {PROFILE_LABEL: key, DEVICE_PLUGIN_LABEL: config_label},
            "annotations": annotations,
        }
    }


def release_patch(node: NodeView, me: str) -> dict[str, Any]:
    """The node patch that gives `me`'s hold back; the last holder removes the profile labels."""
    if me not in node.claims and me not in node.reserved:
        return {}
    rest = node.claims - {me}
    reserved = {holder: n for holder, n in node.reserved.items() if holder != me}
    if rest:
        annotations: dict[str, str | None] = {CLAIMS_ANNOTATION: ",".join(sorted(rest))}
        if reserved != node.reserved:
            annotations[RESERVED_ANNOTATION] = format_reserved(reserved)
        return {
            "metadata": {
                "resourceVersion": node.resource_version,
                "annotations": annotations,
            }
        }
    label_patch: dict[str, str | None] = {PROFILE_LABEL: None}
    if node.labels.get(DEVICE_PLUGIN_LABEL) == node.profile:
        label_patch[DEVICE_PLUGIN_LABEL] = None
    return {
        "metadata": {
            "resourceVersion": node.resource_version,
            "labels": label_patch,
            "annotations": {CLAIMS_ANNOTATION: None, RESERVED_ANNOTATION: None},
        }
    }


def patched(node: NodeView, patch: Mapping[str, Any]) -> NodeView:
    """The node as it reads after a claim or release patch (labels and claims merged in)."""
    meta = patch.get("metadata") or {}
    labels = dict(node.labels)
    for key, value in (meta.get("labels") or {}).items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    claims, reserved = node.claims, node.reserved
    annotations = meta.get("annotations") or {}
    if CLAIMS_ANNOTATION in annotations:
        claims = frozenset(c for c in (annotations[CLAIMS_ANNOTATION] or "").split(",") if c)
    if RESERVED_ANNOTATION in annotations:
        reserved = parse_reserved(annotations[RESERVED_ANNOTATION] or "")
    return replace(node, labels=labels, claims=claims, reserved=reserved)


def drop_holders(node: NodeView, holders: Iterable[str]) -> tuple[NodeView, dict[str, Any]]:
    """Release the node for each of `holders` (fleets that no longer exist): the node after,
    and the one patch that does it ({} when none of them holds it)."""
    merged: dict[str, Any] = {}
    for holder in sorted(set(holders) & node.claims):
        patch = release_patch(node, holder)
        node = patched(node, patch)
        for part in ("labels", "annotations"):
            if part in patch["metadata"]:
                merged.setdefault(part, {}).update(patch["metadata"][part])
        merged["resourceVersion"] = patch["metadata"]["resourceVersion"]
    return node, ({"metadata": merged} if merged else {})
