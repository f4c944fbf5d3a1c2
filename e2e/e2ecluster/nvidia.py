"""NVIDIA's device plugin on the test cluster: one pod per GPU node, its ConfigMap, its lag.

Each GPU node of the profile gets a device-plugin pod (devicepluginpod.py) in its own
PID namespace (`unshare`), running NVIDIA's config-manager as the Helm chart does. The
ConfigMap is the one the operator writes to by default and that NVIDIA's chart reads
with `config.name`: `device-plugin-config` in `nvidia-device-plugin`; `up` creates it
with a `default` key that shares nothing, the setup the README recommends.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from . import realnode
from .cluster import E2E, ClusterError, Proc, State, api_get, api_patch, api_send, spawn, stop
from .profile import LABEL_COUNT, LABEL_PRODUCT, LABEL_REPLICAS, RESOURCE_GPU

CONFIG_NAMESPACE = "nvidia-device-plugin"
CONFIG_NAME = "device-plugin-config"
LABEL_CONFIG = "nvidia.com/device-plugin.config"
DEFAULT_KEY = "default"
NO_SHARING = "version: v1\nflags:\n  migStrategy: none\n"
# NVIDIA's chart: config.default "" and config.fallbackStrategies [named, single].
DEFAULT_CONFIG = ""
FALLBACK_STRATEGIES = "named,single"
# Seconds the ConfigMap volume lags the API (a kubelet takes a minute or so).
LAG_ENV = "INFERENCEFLEET_CONFIG_VOLUME_LAG"
DEFAULT_LAG = 2.0
POD_PREFIX = "device-plugin-"

# The pod's PID namespace ends with it: SIGTERM to the wrapper kills unshare, whose
# --kill-child then kills the pod's PID 1, and with it every process in the namespace.
_WRAPPER = 'unshare "$@" & trap "kill -KILL $!" TERM; wait $!'


def default_lag() -> float:
    raw = os.environ.get(LAG_ENV, str(DEFAULT_LAG))
    try:
        lag = float(raw)
    except ValueError:
        raise ClusterError(f"{LAG_ENV}={raw!r} is not a number of seconds") from None
    if lag < 0:
        raise ClusterError(f"{LAG_ENV}={raw!r} must be >= 0")
    return lag


def gpu_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in nodes if LABEL_COUNT in n["metadata"]["labels"]]


def pod_dir(state: State, node: str) -> Path:
    return state.dir / "device-plugin" / node


def create_configmap(state: State) -> None:
    """The device plugin's ConfigMap with its `default` key (kept if it exists)."""
    for path, body in (
        ("/api/v1/namespaces", {"metadata": {"name": CONFIG_NAMESPACE}}),
        (
            f"/api/v1/namespaces/{CONFIG_NAMESPACE}/configmaps",
            {"metadata": {"name": CONFIG_NAME}, "data": {DEFAULT_KEY: NO_SHARING}},
        ),
    ):
        code, text = api_send(state, "POST", path, {"apiVersion": "v1", **body})
        if code not in (201, 409):
            raise ClusterError(f"POST {path} failed ({code}): {text[:500]}")


def start_pod(state: State, node: dict[str, Any], lag: float | None = None) -> Proc:
    """Start the node's device-plugin pod; a fresh pod has a fresh `config` emptyDir. On the
    real node it feeds the node's own device plugin (its devices file) instead of the status."""
    name, labels = node["metadata"]["name"], node["metadata"]["labels"]
    d = pod_dir(state, name)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "lag").write_text(str(default_lag() if lag is None else lag))
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    argv = [
        "sh", "-c", _WRAPPER, POD_PREFIX + name,
        *userns, "--pid", "--fork", "--mount-proc", "--kill-child",
        sys.executable, "-m", "e2ecluster.devicepluginpod",
        f"--state-dir={state.dir}",
        f"--node={name}",
        f"--gpus={labels[LABEL_COUNT]}",
        f"--product={labels[LABEL_PRODUCT].removesuffix('-SHARED')}",
        f"--dir={d}",
        f"--bin={state.bin_dir}",
        f"--kubeconfig={state.kubeconfig}",
        f"--namespace={CONFIG_NAMESPACE}",
        f"--configmap={CONFIG_NAME}",
        f"--default-config={DEFAULT_CONFIG}",
        f"--fallback-strategies={FALLBACK_STRATEGIES}",
    ]  # fmt: skip
    if name == realnode.NODE_NAME:
        argv.append(f"--devices-file={realnode.devices_file(state.dir)}")
    if not shutil.which("unshare"):
        raise ClusterError("unshare (util-linux) not found: each device-plugin pod needs one")
    return spawn(state, POD_PREFIX + name, argv, env={"PYTHONPATH": str(E2E)})


def start_pods(state: State, nodes: list[dict[str, Any]]) -> None:
    for node in gpu_nodes(nodes):
        start_pod(state, node)


def restart_pod(state: State, node: str, lag: float | None = None) -> None:
    """Delete the node's device-plugin pod and start a new one (as a reboot or rollout does)."""
    procs = [p for p in state.processes if p.name == POD_PREFIX + node]
    if not procs:
        raise ClusterError(f"node {node} has no device-plugin pod")
    stop(procs)
    state.processes = [p for p in state.processes if p not in procs]
    state.save()
    code, text = api_get(state, f"/api/v1/nodes/{node}")
    if code != 200:
        raise ClusterError(f"GET node {node}: {code} {text[:200]}")
    start_pod(state, json.loads(text), lag)


def set_lag(state: State, node: str, seconds: float) -> None:
    """How far the node's ConfigMap volume lags the API from now on."""
    (pod_dir(state, node) / "lag").write_text(str(seconds))


def serving(state: State, node: str) -> bool:
    """The node's plugin has reported a config since its pod started."""
    path = pod_dir(state, node) / "logs" / "plugin.log"
    return path.exists() and '"replicas":' in path.read_text(errors="replace")


def advertising(state: State, nodes: list[dict[str, Any]]) -> bool:
    """True once every GPU node's plugin serves and the node advertises all its GPUs."""
    if not all(serving(state, n["metadata"]["name"]) for n in gpu_nodes(nodes)):
        return False
    code, text = api_get(state, "/api/v1/nodes")
    if code != 200:
        return False
    live = {n["metadata"]["name"]: n for n in json.loads(text)["items"]}
    for node in gpu_nodes(nodes):
        have = live.get(node["metadata"]["name"], {}).get("status", {}).get("allocatable", {})
        if have.get(RESOURCE_GPU) != node["metadata"]["labels"][LABEL_COUNT]:
            return False
    return True


class DevicePlugins:
    """For tests: the device plugin's ConfigMap and pods, put back as they were by restore()."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.saved = self.configmap()
        self.touched: set[str] = set()

    def configmap(self) -> dict[str, str]:
        code, text = api_get(
            self.state, f"/api/v1/namespaces/{CONFIG_NAMESPACE}/configmaps/{CONFIG_NAME}"
        )
        if code != 200:
            raise ClusterError(f"GET configmap {CONFIG_NAME}: {code} {text[:300]}")
        data: dict[str, str] = json.loads(text).get("data") or {}
        return data

    def set_configmap(self, data: dict[str, str] | None) -> None:
        """Replace the ConfigMap's data (created if missing); None deletes the ConfigMap."""
        path = f"/api/v1/namespaces/{CONFIG_NAMESPACE}/configmaps"
        body = {"apiVersion": "v1", "metadata": {"name": CONFIG_NAME}, "data": data}
        code, text = api_send(
            self.state, "DELETE" if data is None else "PUT", f"{path}/{CONFIG_NAME}", body
        )
        if code == 404 and data is not None:
            code, text = api_send(self.state, "POST", path, body)
        if code >= 300 and not (code == 404 and data is None):
            raise ClusterError(f"writing configmap {CONFIG_NAME}: {code} {text[:300]}")

    def restart(self, node: str) -> None:
        self.touched.add(node)
        restart_pod(self.state, node)

    def set_lag(self, node: str, seconds: float) -> None:
        self.touched.add(node)
        set_lag(self.state, node, seconds)

    def label(self, node: str, key: str | None) -> None:
        self.touched.add(node)
        body = {"metadata": {"labels": {LABEL_CONFIG: key}}}
        code, text = api_patch(self.state, f"/api/v1/nodes/{node}", body)
        if code != 200:
            raise ClusterError(f"PATCH node {node}: {code} {text[:300]}")

    def in_volume(self, node: str, key: str) -> bool:
        return (pod_dir(self.state, node) / "available-configs" / key).exists()

    def log(self, node: str, container: str) -> str:
        """The output of the node's `init`, `sidecar` or `plugin` container so far."""
        path = pod_dir(self.state, node) / "logs" / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def node(self, node: str) -> tuple[dict[str, str], dict[str, str]]:
        """(allocatable nvidia.com/gpu*, nvidia.com/gpu.* labels) of a node."""
        code, text = api_get(self.state, f"/api/v1/nodes/{node}")
        if code != 200:
            raise ClusterError(f"GET node {node}: {code} {text[:300]}")
        n = json.loads(text)
        allocatable = n["status"].get("allocatable") or {}
        gpus = {k: v for k, v in allocatable.items() if k.startswith(RESOURCE_GPU)}
        labels = n["metadata"].get("labels") or {}
        return gpus, {k: v for k, v in labels.items() if k.startswith(RESOURCE_GPU + ".")}

    def serving(self, node: str) -> bool:
        return serving(self.state, node)

    def restore(self) -> list[str]:
        """The saved ConfigMap, and a fresh pod on every node a test touched or left shared.

        Returns the nodes whose pods were restarted."""
        self.set_configmap(self.saved)
        for node in self.touched:
            self.label(node, None)
        code, text = api_get(self.state, "/api/v1/nodes")
        if code != 200:
            raise ClusterError(f"GET nodes: {code} {text[:300]}")
        restart = set(self.touched)
        for n in gpu_nodes(json.loads(text)["items"]):
            labels = n["metadata"]["labels"]
            unshared = (
                labels.get(LABEL_REPLICAS) == "1"
                and n["status"].get("allocatable", {}).get(RESOURCE_GPU) == labels[LABEL_COUNT]
            )
            if LABEL_CONFIG not in labels and not unshared:
                restart.add(n["metadata"]["name"])
        for node in sorted(restart):
            restart_pod(self.state, node)
        self.touched.clear()
        return sorted(restart)
