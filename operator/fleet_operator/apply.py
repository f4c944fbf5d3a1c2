"""The one module that talks to the Kubernetes API: reads, and idempotent writes.

Children are written by server-side apply (one field manager, forced: the operator owns
them); nodes by merge patches guarded by resourceVersion; the shared device plugin
ConfigMap by a merge patch of one key. Every verb used here is listed in operator/RBAC.md.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from fleet_spec.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fleet_operator.names import FIELD_MANAGER, FLEET_LABEL
from fleet_operator.sharing import NodeView, node_view

log = logging.getLogger(__name__)

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
TIMEOUT = (10, 30)  # connect, read (seconds): a stalled request fails instead of hanging
CONFLICT_RETRIES = 5

NodePatcher = Callable[[NodeView], dict[str, Any] | None]


def connect() -> None:
    """Configure the client: in-cluster (a ServiceAccount) or from KUBECONFIG / ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    for api in (_core, _apps, _custom, _policy):  # import the API classes now, not mid-reconcile
        api()


# One client per API group, sharing one connection pool (created after connect()).
@functools.cache
def _api_client() -> client.ApiClient:
    return client.ApiClient()


@functools.cache
def _core() -> client.CoreV1Api:
    return client.CoreV1Api(_api_client())


@functools.cache
def _apps() -> client.AppsV1Api:
    return client.AppsV1Api(_api_client())


@functools.cache
def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(_api_client())


@functools.cache
def _policy() -> client.PolicyV1Api:
    return client.PolicyV1Api(_api_client())


def _json(response: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(response.data)
    return document


def _missing(error: ApiException) -> bool:
    return bool(error.status == 404)


@dataclass(frozen=True)
class DevicePluginConfig:
    """Where the NVIDIA device plugin reads its sharing configs from."""

    name: str = "device-plugin-config"
    namespace: str = "nvidia-device-plugin"


# --- reads -------------------------------------------------------------------------------


def get_fleet(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _json(
            _custom().get_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        )
    except ApiException as error:
        if _missing(error):
            return None
        raise


def get_deployment(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _json(
            _apps().read_namespaced_deployment(
                name, namespace, _preload_content=False, _request_timeout=TIMEOUT
            )
        )
    except ApiException as error:
        if _missing(error):
            return None
        raise


def list_worker_pods(namespace: str, fleet: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = _json(
        _core().list_namespaced_pod(
            namespace,
            label_selector=f"{FLEET_LABEL}={fleet}",
            _preload_content=False,
            _request_timeout=TIMEOUT,
        )
    )["items"]
    return items


def list_nodes() -> list[NodeView]:
    items = _json(_core().list_node(_preload_content=False, _request_timeout=TIMEOUT))
    return [node_view(item) for item in items["items"]]


# --- writes ------------------------------------------------------------------------------


def apply(manifest: dict[str, Any]) -> None:
    """Server-side apply of one child (ConfigMap, Service, PodDisruptionBudget, Deployment)."""
    meta = manifest["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    options: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "force": True,
        "_content_type": APPLY,
        "_preload_content": False,
        "_request_timeout": TIMEOUT,
    }
    kind = manifest["kind"]
    if kind == "Deployment":
        _apps().patch_namespaced_deployment(name, namespace, manifest, **options)
    elif kind == "Service":
        _core().patch_namespaced_service(name, namespace, manifest, **options)
    elif kind == "ConfigMap":
        _core().patch_namespaced_config_map(name, namespace, manifest, **options)
    elif kind == "PodDisruptionBudget":
        _policy().patch_namespaced_pod_disruption_budget(name, namespace, manifest, **options)
    else:
        raise ValueError(f"no apply for kind {kind}")


def patch_node(name: str, patcher: NodePatcher) -> bool | None:
    """Read the node, ask `patcher` for a patch, write it guarded by resourceVersion.

    Returns True if the node changed, False if nothing was needed, None if the patcher
    refused (the node is no longer usable). Retries on a conflicting concurrent write.
    """
    api = _core()
    for _ in range(CONFLICT_RETRIES):
        try:
            node = node_view(
                _json(api.read_node(name, _preload_content=False, _request_timeout=TIMEOUT))
            )
        except ApiException as error:
            if _missing(error):
                return None
            raise
        patch = patcher(node)
        if patch is None:
            return None
        if not patch:
            return False
        try:
            api.patch_node(
                name,
                patch,
                field_manager=FIELD_MANAGER,
                _content_type=MERGE,
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
            return True
        except ApiException as error:
            if error.status != 409:
                raise
            log.info("node %s changed under us; reading it again", name)
    raise RuntimeError(f"node {name}: {CONFLICT_RETRIES} conflicting writes in a row")


def set_device_plugin_profile(where: DevicePluginConfig, key: str, value: str | None) -> None:
    """Add (value) or remove (None) one key of the device plugin's ConfigMap; other keys stay."""
    api = _core()
    options: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "_preload_content": False,
        "_request_timeout": TIMEOUT,
    }
    for _ in range(CONFLICT_RETRIES):
        try:
            api.patch_namespaced_config_map(
                where.name, where.namespace, {"data": {key: value}}, _content_type=MERGE, **options
            )
            return
        except ApiException as error:
            if not _missing(error) or value is None:
                if _missing(error):
                    return
                raise
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": where.name, "namespace": where.namespace},
            "data": {key: value},
        }
        try:
            api.create_namespaced_config_map(where.namespace, cast(Any, body), **options)
            return
        except ApiException as error:
            if error.status != 409:  # created meanwhile: patch it on the next round
                raise
    raise RuntimeError(f"configmap {where.namespace}/{where.name}: could not write key {key}")


def get_device_plugin_keys(where: DevicePluginConfig) -> dict[str, str]:
    try:
        document = _json(
            _core().read_namespaced_config_map(
                where.name, where.namespace, _preload_content=False, _request_timeout=TIMEOUT
            )
        )
    except ApiException as error:
        if _missing(error):
            return {}
        raise
    data: dict[str, str] = document.get("data") or {}
    return data


def patch_fleet_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Replace the fleet's status (merge patch of the status subresource; lists are replaced)."""
    try:
        _custom().patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            field_manager=FIELD_MANAGER,
            _content_type=MERGE,
            _preload_content=False,
            _request_timeout=TIMEOUT,
        )
    except ApiException as error:
        if not _missing(error):  # deleted meanwhile: nothing to report on
            raise


def post_event(fleet: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """A core/v1 Event about the fleet (kind Normal or Warning)."""
    meta = fleet["metadata"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion", ""),
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": os.environ.get("POD_NAME", FIELD_MANAGER),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        _core().create_namespaced_event(
            meta["namespace"], cast(Any, body), _preload_content=False, _request_timeout=TIMEOUT
        )
    except ApiException as error:  # an Event is worth a log line, never a failed reconcile
        log.warning("could not post event %s on %s: %s", reason, meta["name"], error.reason)


def ensure_peering(name: str, namespace: str | None) -> None:
    """Create kopf's peering object (KopfPeering, or ClusterKopfPeering when namespace is None)."""
    api = _custom()
    kind = "KopfPeering" if namespace else "ClusterKopfPeering"
    body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
    try:
        if namespace:
            api.create_namespaced_custom_object(
                "kopf.dev", "v1", namespace, "kopfpeerings", body, _preload_content=False
            )
        else:
            api.create_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", body, _preload_content=False
            )
        log.info("created %s %s", kind, name)
    except ApiException as error:
        if error.status == 403:  # not ours to create: the chart (or an admin) made it
            log.warning("may not create %s %s; expecting it to exist", kind, name)
        elif error.status != 409:
            raise
