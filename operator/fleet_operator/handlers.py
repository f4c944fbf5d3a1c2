"""Every kopf handler of the operator: the watches it reads from, and thin guards around a pass.

The indexes below are the operator's one view of the cluster: kopf keeps them from its
watches, so a pass reads nodes, children and pods from memory instead of listing them per
fleet. A pass takes its Observations in the event loop (where the indexes change), then
decides and acts in a thread (the Kubernetes client blocks).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import kopf

from fleet_operator.kube import ApiError
from fleet_operator.names import (
    CLAIMS_ANNOTATION,
    FLEET_LABEL,
    GPU_RESOURCE,
    GROUP,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    PLURAL,
    TUNE_LABEL,
    VERSION,
    batching_configmap_name,
    fleet_id,
)
from fleet_operator.observe import (
    Observations,
    pod_fleet,
    trim_child,
    trim_job,
    trim_node,
    trim_pod,
    trim_tune_pod,
)
from fleet_operator.reconcile import Reconciler, Retry, SpecInvalid

RESYNC_SECONDS = 30.0  # the timer that looks again, whatever else happens

log = logging.getLogger(__name__)
_pass_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
_later_tasks: set[asyncio.Task[None]] = set()  # passes scheduled by _again_later
_node_gpu_state: dict[str, tuple[Any, ...]] = {}  # what the node said about its GPUs last time


# --- what the operator watches -----------------------------------------------------------


@kopf.index(GROUP, VERSION, PLURAL)
def fleets_by_name(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], Any]:
    return {(namespace, name): _plain(body)}


@kopf.index("", "v1", "nodes")
def all_nodes(body: kopf.Body, **_: Any) -> dict[None, dict[str, Any]]:
    return {None: trim_node(body)}


@kopf.index("apps", "v1", "deployments")
def deployments_by_name(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _child(body)}


@kopf.index("", "v1", "services")
def services_by_name(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _child(body)}


@kopf.index("", "v1", "configmaps")
def configmaps_by_name(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _child(body)}


@kopf.index("policy", "v1", "poddisruptionbudgets")
def pdbs_by_name(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): _child(body)}


@kopf.index("", "v1", "pods", labels={FLEET_LABEL: kopf.PRESENT})
def pods_by_fleet(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, pod_fleet(body)): trim_pod(body)}


@kopf.index("batch", "v1", "jobs", labels={TUNE_LABEL: kopf.PRESENT})
def tune_jobs_by_fleet(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, body["metadata"]["labels"][TUNE_LABEL]): trim_job(body)}


@kopf.index("", "v1", "pods", labels={TUNE_LABEL: kopf.PRESENT})
def tune_pods_by_fleet(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, body["metadata"]["labels"][TUNE_LABEL]): trim_tune_pod(body)}


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a watched object that stays as it is while the watch moves on."""
    plain: dict[str, Any] = copy.deepcopy(dict(body))
    return plain


def _child(body: Mapping[str, Any]) -> dict[str, Any]:
    labels = (body.get("metadata") or {}).get("labels") or {}
    return trim_child(dict(body), ours=labels.get(MANAGED_BY) == MANAGED_BY_VALUE)


def _one(index: Any, key: Any) -> Any:
    store = index.get(key) if key in index else None
    return next(iter(store), None) if store else None


def _all(index: Any, key: Any) -> list[Any]:
    return list(index[key]) if key in index else []


def _observe(fleet: Mapping[str, Any], memo: kopf.Memo, indexes: Mapping[str, Any]) -> Observations:
    """The fleet's Observations, from the indexes as they are now (call in the event loop)."""
    namespace, name = fleet["metadata"]["namespace"], fleet["metadata"]["name"]
    children: dict[tuple[str, str], Any] = {}
    for kind, index, child in (
        ("Deployment", "deployments_by_name", name),
        ("Service", "services_by_name", name),
        ("PodDisruptionBudget", "pdbs_by_name", name),
        ("ConfigMap", "configmaps_by_name", batching_configmap_name(name)),
    ):
        found = _one(indexes[index], (namespace, child))
        if found is not None:
            children[(kind, child)] = found
    nodes = indexes["all_nodes"]
    pods = indexes["pods_by_fleet"]
    jobs, tune_pods = indexes["tune_jobs_by_fleet"], indexes["tune_pods_by_fleet"]
    return Observations(
        fleet=fleet,
        nodes=list(nodes[None]) if None in nodes else [],
        children=children,
        pods=list(pods[(namespace, name)]) if (namespace, name) in pods else [],
        other_pods=[pod for key in pods if key != (namespace, name) for pod in pods[key]],
        fleets=frozenset(fleet_id(ns, n) for ns, n in indexes["fleets_by_name"]),
        watched=memo.watched,
        tune_jobs={job["metadata"]["name"]: job for job in _all(jobs, (namespace, name))},
        tune_pods=_all(tune_pods, (namespace, name)),
    )


async def _pass(fleet: Mapping[str, Any], memo: kopf.Memo, indexes: Mapping[str, Any]) -> None:
    """One reconcile pass of a fleet: observe here, decide and act in a thread. A fleet whose
    node waits for a new profile key to reach the device plugin's volume is looked at again
    the moment it may, not at the next timer."""
    reconciler: Reconciler = memo.reconciler
    meta = fleet["metadata"]
    key = fleet_id(meta["namespace"], meta["name"])
    async with _pass_locks[key]:
        observations = _observe(fleet, memo, indexes)
        decision = await asyncio.to_thread(reconciler.reconcile, observations)
    delay = reconciler.seconds_to_key_sync() if decision.waits_for_key_sync else None
    if delay is not None:
        _again_later(meta["namespace"], meta["name"], delay + 0.5, memo, indexes)


def _again_later(
    namespace: str, name: str, delay: float, memo: kopf.Memo, indexes: Mapping[str, Any]
) -> None:
    """One more pass of the fleet after `delay` seconds (if it still exists then)."""

    async def later() -> None:
        await asyncio.sleep(delay)
        await _look_again(namespace, name, memo, indexes)

    task = asyncio.get_running_loop().create_task(later())
    _later_tasks.add(task)
    task.add_done_callback(_later_tasks.discard)


async def _guarded(fleet: Mapping[str, Any], memo: kopf.Memo, indexes: Mapping[str, Any]) -> None:
    """A pass whose failures kopf retries: later each time for the same failure."""
    reconciler: Reconciler = memo.reconciler
    try:
        await _pass(fleet, memo, indexes)
    except SpecInvalid as error:
        raise kopf.PermanentError(str(error)) from error
    except Retry as error:
        raise kopf.TemporaryError(str(error), delay=1) from error
    except ApiError as error:
        if error.will_not_heal:  # invalid or forbidden: the timer tries again, backing off
            raise kopf.PermanentError(str(error)) from error
        raise kopf.TemporaryError(str(error), delay=reconciler.backoff_seconds(fleet)) from error


# --- the fleet's own lifecycle -------------------------------------------------------------


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Use the credentials the Kubernetes client was configured with (kubeconfig or in-cluster)."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
def peering(memo: kopf.Memo, **_: Any) -> None:
    """Make sure the peering object exists, so that operator replicas see each other."""
    if memo.peering_name:
        for namespace in memo.peering_namespaces:
            memo.kube.ensure_peering(memo.peering_name, namespace)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def fleet_changed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    await _guarded(_plain(body), memo, kwargs)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def resync(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Level-based: nodes appear, GPUs free up, someone edits a child: look again."""
    fleet = _plain(body)
    if memo.reconciler.backing_off(fleet) > 0:
        return
    await _guarded(fleet, memo, kwargs)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def fleet_deleted(
    body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any
) -> None:
    """Give the fleet's nodes back (the finalizer waits for this); children go by owner GC."""
    fleet = _plain(body)
    reconciler: Reconciler = memo.reconciler
    key = fleet_id(fleet["metadata"]["namespace"], fleet["metadata"]["name"])
    try:
        async with _pass_locks[key]:
            observations = _observe(fleet, memo, kwargs)
            released = await asyncio.to_thread(reconciler.release, observations)
    except Retry as error:
        raise kopf.TemporaryError(str(error), delay=1) from error
    except ApiError as error:
        raise kopf.TemporaryError(str(error), delay=10) from error
    _pass_locks.pop(key, None)
    logger.info("released nodes: %s", ", ".join(released) or "none")


# --- children that move: look again at once, not at the next timer -------------------------


async def _look_again(
    namespace: str, name: str, memo: kopf.Memo, indexes: Mapping[str, Any]
) -> None:
    """A pass of the fleet as the index has it now, unless it is gone, going or backing off;
    its failures are left to the fleet's own handlers, which retry them."""
    fleet = _one(indexes["fleets_by_name"], (namespace, name))
    if fleet is None or fleet["metadata"].get("deletionTimestamp"):
        return
    if memo.reconciler.backing_off(fleet) > 0:
        return
    try:
        await _pass(fleet, memo, indexes)
    except (Retry, SpecInvalid, ApiError) as error:
        log.info("fleet %s/%s: %s", namespace, name, error)


async def _child_moved(
    labels: Mapping[str, str], namespace: str | None, memo: kopf.Memo, indexes: Mapping[str, Any]
) -> None:
    name = labels.get(FLEET_LABEL)
    if not name or not namespace or labels.get(MANAGED_BY) != MANAGED_BY_VALUE:
        return
    await _look_again(namespace, name, memo, indexes)


@kopf.on.event("apps", "v1", "deployments", labels={MANAGED_BY: MANAGED_BY_VALUE})
async def deployment_moved(
    labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A worker Deployment changed or was deleted: status and children, now."""
    await _child_moved(labels, namespace, memo, kwargs)


@kopf.on.event("batch", "v1", "jobs", labels={TUNE_LABEL: kopf.PRESENT})
async def tune_job_moved(
    labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A tune Job started, finished or went: status.tune says so now."""
    if namespace and labels.get(MANAGED_BY) == MANAGED_BY_VALUE:
        await _look_again(namespace, labels[TUNE_LABEL], memo, kwargs)


@kopf.on.event("", "v1", "pods", labels={TUNE_LABEL: kopf.PRESENT})
async def tune_pod_moved(
    event: kopf.RawEvent, labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A tune pod's container ended or the pod went: a Job seen ended before its pod waits on
    this for the result."""
    if not namespace or labels.get(MANAGED_BY) != MANAGED_BY_VALUE:
        return
    if event.get("type") == "DELETED" or trim_tune_pod(event["object"])["status"]["terminated"]:
        await _look_again(namespace, labels[TUNE_LABEL], memo, kwargs)


@kopf.on.event("", "v1", "services", labels={MANAGED_BY: MANAGED_BY_VALUE})
@kopf.on.event("", "v1", "configmaps", labels={MANAGED_BY: MANAGED_BY_VALUE})
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels={MANAGED_BY: MANAGED_BY_VALUE})
async def child_deleted(
    event: kopf.RawEvent, labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A child was deleted (by hand, say): make it again now, not at the next timer."""
    if event["type"] == "DELETED":
        await _child_moved(labels, namespace, memo, kwargs)


def _gpu_state(node: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a node says about its GPUs that decides a held profile: advertised slots, feature
    discovery's sharing labels, the config label, its claims, its taints."""
    meta, status = node.get("metadata") or {}, node.get("status") or {}
    node_labels = meta.get("labels") or {}
    gpu = {k: v for k, v in (status.get("allocatable") or {}).items() if k.startswith(GPU_RESOURCE)}
    return (
        tuple(sorted(gpu.items())),
        tuple(sorted((k, v) for k, v in node_labels.items() if k.startswith("nvidia.com/"))),
        (meta.get("annotations") or {}).get(CLAIMS_ANNOTATION, ""),
        bool((node.get("spec") or {}).get("unschedulable")),
        len((node.get("spec") or {}).get("taints") or []),
    )


@kopf.on.event("", "v1", "nodes")
async def node_moved(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """A held node starts (or stops) advertising a profile, is cordoned or goes away: the fleets
    holding it look again now (status, replicas held back), not at the next timer."""
    name = body.get("metadata", {}).get("name", "")
    state = None if event["type"] == "DELETED" else _gpu_state(body)
    if _node_gpu_state.get(name) == state:
        return
    before = _node_gpu_state.pop(name, None)
    if state is not None:
        _node_gpu_state[name] = state
    if before is None:
        return  # first sight (start-up): the fleets' own resume handlers look at everything
    claimed_by = f"{before[2]},{state[2] if state else ''}"
    claims = {holder for holder in claimed_by.split(",") if holder}
    for holder in sorted(claims):
        namespace, _, fleet_name = holder.partition("/")
        await _look_again(namespace, fleet_name, memo, kwargs)


@kopf.on.probe(id="fleets")
def fleets_probe(**_: Any) -> str:
    """The liveness endpoint answers once the operator runs its handlers."""
    return "ok"
