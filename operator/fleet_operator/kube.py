"""The one object that writes to the Kubernetes API: idempotent writes of plain dicts.

Children are written by server-side apply (forced only once they are known to be ours),
nodes by merge patches guarded by resourceVersion, the shared device plugin ConfigMap by a
merge patch of its keys. Reads of the cluster come from kopf's watches (handlers.py); the
only read here is the device plugin ConfigMap, cached for every fleet. Every verb used
here is listed in operator/RBAC.md. Failures become ApiError with the apiserver's message.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fleet_operator.names import API_VERSION, FIELD_MANAGER, GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
TIMEOUT = (10, 30)  # connect, read (seconds): a stalled request fails instead of hanging
CACHE_SECONDS = 30.0  # the device plugin ConfigMap is read again at most this often


@dataclass(frozen=True)
class ConfigMapRef:
    """Where the NVIDIA device plugin reads its sharing configs from."""

    name: str = "device-plugin-config"
    namespace: str = "nvidia-device-plugin"


class ApiError(Exception):
    """An API call that failed, with what the apiserver said (status, reason, message)."""

    def __init__(self, action: str, status: int, reason: str, message: str) -> None:
        self.action, self.status, self.reason, self.message = action, status, reason, message
        super().__init__(f"{action}: {status} {reason}: {message}")

    @property
    def conflict(self) -> bool:
        """409: the object changed (or exists) under us; a fresh look will do."""
        return self.status == 409

    @property
    def will_not_heal(self) -> bool:
        """A refusal that retrying cannot change: the request is invalid or forbidden."""
        return self.status in (400, 403, 422)

    @classmethod
    def from_exception(cls, action: str, error: ApiException) -> ApiError:
        reason, message = str(error.reason or ""), ""
        try:
            body = json.loads(error.body or "{}")
        except (TypeError, ValueError):
            body = {}
        if isinstance(body, dict):
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
        if not message:
            message = str(error.body or error.reason or "no response body")
        return cls(action, int(error.status or 0), reason, message)


class Kube(Protocol):
    """The writes a reconcile makes; KubeApi against a cluster, FakeKube in unit tests."""

    def apply(self, manifest: Mapping[str, Any], *, force: bool) -> dict[str, Any]: ...

    def patch_node(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]: ...

    def configmap_data(self, where: ConfigMapRef) -> dict[str, str] | None: ...

    def patch_configmap_data(
        self, where: ConfigMapRef, changes: Mapping[str, str | None]
    ) -> dict[str, str]: ...

    def patch_fleet_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def post_event(
        self, involved: Mapping[str, Any], kind: str, reason: str, message: str
    ) -> None: ...


def connect() -> client.ApiClient:
    """A client configured in-cluster (a ServiceAccount) or from KUBECONFIG / ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def _json(response: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(response.data)
    return document


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeApi:
    """Kube against a real apiserver (one connection pool for every API group)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.policy = client.PolicyV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self._cache: dict[ConfigMapRef, tuple[float, dict[str, str] | None]] = {}
        self._cache_lock = threading.Lock()

    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return _json(fn(*args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs))
        except ApiException as error:
            raise ApiError.from_exception(action, error) from error

    def apply(self, manifest: Mapping[str, Any], *, force: bool) -> dict[str, Any]:
        """Server-side apply of one child. Without force, fields someone else set conflict (409)."""
        meta = manifest["metadata"]
        name, namespace, kind = meta["name"], meta["namespace"], manifest["kind"]
        writers = {
            "Deployment": self.apps.patch_namespaced_deployment,
            "Service": self.core.patch_namespaced_service,
            "ConfigMap": self.core.patch_namespaced_config_map,
            "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
            "Job": self.batch.patch_namespaced_job,
        }
        if kind not in writers:
            raise ValueError(f"no apply for kind {kind}")
        return self._call(
            f"apply {kind} {namespace}/{name}",
            writers[kind],
            name,
            namespace,
            dict(manifest),
            field_manager=FIELD_MANAGER,
            force=force,
            _content_type=APPLY,
        )

    def patch_node(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge patch of a node (guarded when it carries metadata.resourceVersion: 409)."""
        return self._call(
            f"patch node {name}",
            self.core.patch_node,
            name,
            dict(patch),
            field_manager=FIELD_MANAGER,
            _content_type=MERGE,
        )

    def configmap_data(self, where: ConfigMapRef) -> dict[str, str] | None:
        """The ConfigMap's data (None: no such ConfigMap), read at most every CACHE_SECONDS."""
        with self._cache_lock:
            cached = self._cache.get(where)
            if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
                return dict(cached[1]) if cached[1] is not None else None
        try:
            document: dict[str, Any] | None = self._call(
                f"get configmap {where.namespace}/{where.name}",
                self.core.read_namespaced_config_map,
                where.name,
                where.namespace,
            )
        except ApiError as error:
            if error.status != 404:
                raise
            document = None
        return self._remember(where, document)

    def _remember(self, where: ConfigMapRef, document: dict[str, Any] | None) -> dict[str, str]:
        data: dict[str, str] | None = None if document is None else dict(document.get("data") or {})
        with self._cache_lock:
            self._cache[where] = (time.monotonic(), data)
        return dict(data or {})

    def patch_configmap_data(
        self, where: ConfigMapRef, changes: Mapping[str, str | None]
    ) -> dict[str, str]:
        """Set (a value) or remove (None) keys of a ConfigMap, creating it when it is missing."""
        action = f"patch configmap {where.namespace}/{where.name}"
        try:
            document = self._call(
                action,
                self.core.patch_namespaced_config_map,
                where.name,
                where.namespace,
                {"data": dict(changes)},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE,
            )
        except ApiError as error:
            if error.status != 404:
                raise
            data = {key: value for key, value in changes.items() if value is not None}
            if not data:
                return self._remember(where, None)
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": where.name, "namespace": where.namespace},
                "data": data,
            }
            # Made meanwhile by someone else: a 409, and the next pass patches it.
            document = self._call(
                f"create configmap {where.namespace}/{where.name}",
                self.core.create_namespaced_config_map,
                where.namespace,
                cast(Any, body),
                field_manager=FIELD_MANAGER,
            )
        return self._remember(where, document)

    def patch_fleet_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Replace the fleet's status (merge patch of the status subresource; lists replaced)."""
        try:
            self._call(
                f"patch status of {KIND} {namespace}/{name}",
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": dict(status)},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE,
            )
        except ApiError as error:
            if error.status != 404:  # deleted meanwhile: nothing to report on
                raise

    def post_event(self, involved: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event about the fleet (kind Normal or Warning); never fails the caller."""
        meta = involved["metadata"]
        now = _now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
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
            self._call(
                f"create event {reason}",
                self.core.create_namespaced_event,
                meta["namespace"],
                cast(Any, body),
            )
        except ApiError as error:  # an Event is worth a log line, never a failed reconcile
            log.warning("could not post event %s on %s: %s", reason, meta["name"], error)

    def ensure_peering(self, name: str, namespace: str | None) -> None:
        """Create kopf's peering object (KopfPeering, or ClusterKopfPeering without namespace)."""
        kind = "KopfPeering" if namespace else "ClusterKopfPeering"
        body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
        try:
            if namespace:
                self._call(
                    f"create {kind} {name}",
                    self.custom.create_namespaced_custom_object,
                    "kopf.dev",
                    "v1",
                    namespace,
                    "kopfpeerings",
                    body,
                )
            else:
                self._call(
                    f"create {kind} {name}",
                    self.custom.create_cluster_custom_object,
                    "kopf.dev",
                    "v1",
                    "clusterkopfpeerings",
                    body,
                )
            log.info("created %s %s", kind, name)
        except ApiError as error:
            if error.status == 403:  # not ours to create: the chart (or an admin) made it
                log.warning("may not create %s %s; expecting it to exist", kind, name)
            elif error.status != 409:
                raise
