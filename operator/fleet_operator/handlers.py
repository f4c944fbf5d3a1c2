"""Every kopf handler of the operator: thin guards around fleet_operator.reconcile."""

from __future__ import annotations

from typing import Any

import kopf
from fleet_spec.spec import GROUP, PLURAL, VERSION, FleetSpecError
from kubernetes.client.exceptions import ApiException

from fleet_operator import apply, reconcile
from fleet_operator.names import FLEET_LABEL, MANAGED_BY, MANAGED_BY_VALUE

RESYNC_SECONDS = 30.0  # the timer that re-reads nodes and pods, whatever else happens
RETRY_SECONDS = 10


def _config(memo: kopf.Memo) -> reconcile.OperatorConfig:
    cfg: reconcile.OperatorConfig = memo.config
    return cfg


def _run(body: kopf.Body, memo: kopf.Memo) -> None:
    try:
        reconcile.reconcile(body, _config(memo))
    except FleetSpecError as error:
        raise kopf.PermanentError(str(error)) from error
    except ApiException as error:
        raise kopf.TemporaryError(
            f"API {error.status} {error.reason}", delay=RETRY_SECONDS
        ) from error


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Use the credentials the Kubernetes client was configured with (kubeconfig or in-cluster)."""
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
def peering(memo: kopf.Memo, **_: Any) -> None:
    """Make sure the peering object exists, so that operator replicas see each other."""
    if memo.peering_name:
        for namespace in memo.peering_namespaces:
            apply.ensure_peering(memo.peering_name, namespace)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def fleet_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _run(body, memo)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Level-based: nodes appear, GPUs free up, someone edits a child: apply again."""
    _run(body, memo)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def fleet_deleted(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Give the fleet's nodes back (the finalizer waits for this); children go by owner GC."""
    released = reconcile.release(body, _config(memo))
    logger.info("released nodes: %s", ", ".join(released) or "none")


@kopf.on.event("apps", "v1", "deployments", labels={MANAGED_BY: MANAGED_BY_VALUE})
def deployment_changed(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
    """A worker Deployment moved: refresh its fleet's status now, not at the next timer."""
    fleet = labels.get(FLEET_LABEL)
    if fleet and namespace:
        reconcile.refresh_status(namespace, fleet)


@kopf.on.probe(id="fleets")
def fleets_probe(**_: Any) -> str:
    """The liveness endpoint answers once the operator runs its handlers."""
    return "ok"
