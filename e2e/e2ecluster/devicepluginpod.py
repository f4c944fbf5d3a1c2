"""One GPU node's NVIDIA device-plugin pod, run the way a kubelet runs it, minus the GPU.

The containers are those of NVIDIA's Helm chart (k8s-device-plugin v0.19.0,
templates/daemonset-device-plugin.yml, with a ConfigMap): the init container
`config-manager` with ONESHOT=true and no signal, then the plugin and the
`config-manager` sidecar that sends SIGHUP to the process named
`nvidia-device-plugin`. config-manager is NVIDIA's binary; the plugin is our
`advertise --watch` (NVIDIA's config parser, no NVML) under that name. This process
is PID 1 of the pod's own PID namespace (`shareProcessNamespace: true` in the chart),
so config-manager finds exactly this node's plugin in /proc.

What has no upstream counterpart is the kubelet's part, kept thin: the ConfigMap
volume (refreshed `lag` seconds behind the API, laid out like the kubelet's atomic
writer), restarts with CrashLoopBackOff (10 s doubling to 300 s, reset after 10 min
of running), and node status: capacity/allocatable and the feature-discovery labels
from what the plugin reports; no running plugin means no GPU to allocate.

On the real node (`--devices-file`) the real kubelet owns the node's status: the count
the plugin reports (GPUs x replicas, 0 without a plugin) goes to the file that the node's
own device plugin serves to the kubelet over the device plugin API; the labels are
patched as on kwok nodes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .cluster import State, api_get, api_patch
from .profile import LABEL_PRODUCT, LABEL_REPLICAS, LABEL_SHARING, RESOURCE_GPU

BACKOFF_START, BACKOFF_MAX, BACKOFF_RESET = 10.0, 300.0, 600.0  # the kubelet's
RESYNC_SECONDS = 10.0  # how often the node's status is checked against the plugin's report
MPS_ROOT = "/run/nvidia/mps"  # the chart's mps.root


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class Api:
    """The few calls this pod makes, with the cluster's admin token."""

    def __init__(self, state: State) -> None:
        self.state = state

    def get(self, path: str) -> dict[str, Any] | None:
        code, text = api_get(self.state, path)
        if code == 404:
            return None
        if code != 200:
            raise OSError(f"GET {path}: {code} {text[:200]}")
        data: dict[str, Any] = json.loads(text)
        return data

    def patch(self, path: str, body: dict[str, Any]) -> None:
        code, text = api_patch(self.state, path, body)
        if code != 200:
            raise OSError(f"PATCH {path}: {code} {text[:200]}")


class ConfigVolume:
    """The ConfigMap as a volume: each refresh writes what the API held `lag` seconds ago.

    Layout as the kubelet's atomic writer: `..<time>/` holds the files, `..data` points at
    it, and each key is a symlink `<key> -> ..data/<key>` (config-manager skips `..*`).
    The first mount writes what the API holds. A ConfigMap that does not exist (yet)
    leaves the volume unmountable, so the pod does not start; one deleted later leaves
    the last contents in place.
    """

    def __init__(self, api: Api, namespace: str, name: str, path: Path, lag_file: Path) -> None:
        self.api, self.path, self.lag_file = api, path, lag_file
        self.url = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.history: collections.deque[tuple[float, dict[str, str] | None]] = collections.deque()
        self.written: dict[str, str] | None = None

    def lag(self) -> float:
        return float(self.lag_file.read_text())

    def refresh(self) -> None:
        cm = self.api.get(self.url)
        data = None if cm is None else dict(cm.get("data") or {})
        now = time.monotonic()
        if not self.history or self.history[-1][1] != data:
            self.history.append((now, data))
        due = now - self.lag()
        while len(self.history) > 1 and self.history[1][0] <= due:
            self.history.popleft()
        if self.written is None and data is not None:  # the first mount reads the API
            self.history.clear()
            self.history.append((now, data))
            self.write(data)
            return
        seen_at, wanted = self.history[0]
        if seen_at <= due and wanted is not None and wanted != self.written:
            self.write(wanted)

    def write(self, data: dict[str, str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = self.path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
        stamp.mkdir()
        for key, value in data.items():
            (stamp / key).write_text(value)
        tmp = self.path / "..data_tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(stamp.name)
        tmp.replace(self.path / "..data")
        for key in data:
            link = self.path / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        for entry in self.path.iterdir():
            if entry.name.startswith(".."):
                if entry.is_dir() and not entry.is_symlink() and entry != stamp:
                    shutil.rmtree(entry)
            elif entry.name not in data:
                entry.unlink()
        log(f"volume: wrote keys {sorted(data)}")
        self.written = data


class Container:
    """A container of the pod: a program run under a name, restarted with the kubelet's back-off."""

    def __init__(
        self, name: str, program: str, argv: list[str], env: dict[str, str], logs: Path
    ) -> None:
        self.name, self.program, self.argv, self.env, self.logs = name, program, argv, env, logs
        self.delay = BACKOFF_START

    def start(self, stdout: int | None = None) -> subprocess.Popen[bytes]:
        log(f"{self.name}: starting")
        with (self.logs / f"{self.name}.log").open("ab") as sink:
            return subprocess.Popen(
                self.argv,  # argv[0] is the name /proc shows, as in the container
                executable=self.program,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink if stdout is None else stdout,
                stderr=sink,
            )

    def exited(self, code: int, ran: float) -> float:
        """Log the exit; return how long to wait before the next start (CrashLoopBackOff)."""
        if ran >= BACKOFF_RESET:
            self.delay = BACKOFF_START
        wait, self.delay = self.delay, min(self.delay * 2, BACKOFF_MAX)
        log(f"{self.name}: exited {code} after {ran:.1f} s; back-off {wait:.0f} s")
        return wait


class Node:
    """The node's GPU status: what the running plugin reports, or nothing to allocate."""

    def __init__(
        self, api: Api, name: str, gpus: int, product: str, devices_file: Path | None = None
    ) -> None:
        self.api, self.name, self.gpus, self.product = api, name, gpus, product
        self.devices_file = devices_file  # the real node: its kubelet reads devices from here
        self.lock = threading.Lock()
        self.report: dict[str, Any] | None = None  # None: no plugin serving

    def set(self, report: dict[str, Any] | None) -> None:
        with self.lock:
            self.report = report
        try:
            self.sync()
        except OSError as e:  # the next resync retries
            log(f"node: {e}")

    def sync(self) -> None:
        with self.lock:
            report = self.report
        node = self.api.get(f"/api/v1/nodes/{self.name}")
        if node is None:
            return
        labels_patch, status_patch = node_patches(node, self.gpus, self.product, report)
        if self.devices_file is not None:
            count = f"{self.gpus * int(report['replicas']) if report else 0}\n"
            if not self.devices_file.exists() or self.devices_file.read_text() != count:
                log(f"node: {count.strip()} devices for the kubelet")
                self.devices_file.write_text(count)
            status_patch = {}  # the kubelet writes the status from the device plugin API
        if status_patch:
            log(f"node: status {status_patch}")
            self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": status_patch})
        if labels_patch:
            log(f"node: labels {labels_patch}")
            self.api.patch(f"/api/v1/nodes/{self.name}", {"metadata": {"labels": labels_patch}})


def node_patches(
    node: dict[str, Any], gpus: int, product: str, report: dict[str, Any] | None
) -> tuple[dict[str, str], dict[str, dict[str, str | None]]]:
    """(label changes, status changes) that make the node show `report` (None: no plugin).

    The plugin advertises `gpus x replicas` devices under its resource name; the kubelet
    keeps a resource whose plugin went away (or was renamed) at 0. Feature discovery's
    labels follow the loaded config and stay as they were while no plugin runs.
    """
    want: dict[str, str] = {}
    labels: dict[str, str] = {}
    if report is not None:
        want[report["resource"]] = str(gpus * int(report["replicas"]))
        labels = {
            LABEL_PRODUCT: product + report["product_suffix"],
            LABEL_REPLICAS: str(report["replicas"]),
            LABEL_SHARING: report["strategy"],
        }
    have_labels = node["metadata"].get("labels") or {}
    label_patch = {k: v for k, v in labels.items() if have_labels.get(k) != v}
    status: dict[str, dict[str, str | None]] = {}
    for section in ("capacity", "allocatable"):
        have: dict[str, str] = node.get("status", {}).get(section) or {}
        names = {RESOURCE_GPU, *want, *(k for k in have if k.startswith(RESOURCE_GPU + "."))}
        change = {k: want.get(k, "0") for k in names if have.get(k) != want.get(k, "0")}
        if change:
            status[section] = dict(change)
    return label_patch, status


class Pod:
    """The pod's life: volume, init container, then plugin and sidecar side by side."""

    def __init__(self, args: argparse.Namespace, api: Api) -> None:
        self.dir = Path(args.dir)
        self.volume = ConfigVolume(
            api, args.namespace, args.configmap, self.dir / "available-configs", self.dir / "lag"
        )
        devices = Path(args.devices_file) if args.devices_file else None
        self.node = Node(api, args.node, args.gpus, args.product, devices)
        (self.dir / "config").mkdir(parents=True, exist_ok=True)
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        # The chart's environment for both config-manager containers.
        manager = {
            "KUBECONFIG": args.kubeconfig,
            "NODE_NAME": args.node,
            "NODE_LABEL": "nvidia.com/device-plugin.config",
            "CONFIG_FILE_SRCDIR": str(self.dir / "available-configs"),
            "CONFIG_FILE_DST": str(self.dir / "config" / "config.yaml"),
            "DEFAULT_CONFIG": args.default_config,
            "FALLBACK_STRATEGIES": args.fallback_strategies,
        }
        cm = str(Path(args.bin) / "config-manager")
        signal_none = {"SEND_SIGNAL": "false", "SIGNAL": "", "PROCESS_TO_SIGNAL": ""}
        sighup = {"SEND_SIGNAL": "true", "SIGNAL": "1", "PROCESS_TO_SIGNAL": "nvidia-device-plugin"}
        self.init = Container(
            "init", cm, ["config-manager"], {**manager, "ONESHOT": "true", **signal_none}, logs
        )
        self.sidecar = Container(
            "sidecar", cm, ["config-manager"], {**manager, "ONESHOT": "false", **sighup}, logs
        )
        plugin_env = {"MPS_ROOT": MPS_ROOT, "CONFIG_FILE": manager["CONFIG_FILE_DST"]}
        plugin_args = ["--watch", *(["--mig-enabled"] if args.mig_enabled else [])]
        self.plugin = Container(
            "plugin",
            str(Path(args.bin) / "advertise"),
            ["nvidia-device-plugin", *plugin_args],
            plugin_env,
            logs,
        )

    def run(self) -> None:
        self.node.set(None)
        threading.Thread(target=self.kubelet_loop, daemon=True).start()
        while self.volume.written is None:  # the volume must mount before any container
            time.sleep(0.5)
        while True:  # init container: until it succeeds
            t0 = time.monotonic()
            code = self.init.start().wait()
            if code == 0:
                break
            time.sleep(self.init.exited(code, time.monotonic() - t0))
        log("init: done")
        threading.Thread(target=self.run_sidecar, daemon=True).start()
        self.run_plugin()

    def kubelet_loop(self) -> None:
        last_sync = 0.0
        while True:
            try:
                self.volume.refresh()
                if time.monotonic() - last_sync >= RESYNC_SECONDS:
                    self.node.sync()
                    last_sync = time.monotonic()
            except (OSError, ValueError) as e:  # the apiserver may be restarting: retry
                log(f"kubelet: {e}")
            time.sleep(0.5)

    def run_sidecar(self) -> None:
        while True:
            t0 = time.monotonic()
            code = self.sidecar.start().wait()
            time.sleep(self.sidecar.exited(code, time.monotonic() - t0))

    def run_plugin(self) -> None:
        while True:
            t0 = time.monotonic()
            proc = self.plugin.start(stdout=subprocess.PIPE)
            assert proc.stdout is not None
            for line in proc.stdout:
                with (self.plugin.logs / "plugin.log").open("ab") as sink:
                    sink.write(line)  # as a container's stdout is logged
                report = json.loads(line)
                log(f"plugin: {report}")
                self.node.set(None if "error" in report else report)
            code = proc.wait()
            self.node.set(None)
            time.sleep(self.plugin.exited(code, time.monotonic() - t0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--product", required=True)
    parser.add_argument("--mig-enabled", action="store_true")
    parser.add_argument("--dir", required=True, help="the pod's files: volume, config, logs")
    parser.add_argument("--bin", required=True, help="where config-manager and advertise are")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--configmap", required=True)
    parser.add_argument("--default-config", default="")
    parser.add_argument("--fallback-strategies", default="named,single")
    parser.add_argument(
        "--devices-file", help="a real node: write the device count here, not the node status"
    )
    args = parser.parse_args(argv)
    state = State.load(Path(args.state_dir))
    if state is None:
        sys.exit(f"no cluster state in {args.state_dir}")
    log(f"pod for node {args.node} (pid {os.getpid()} in its namespace)")
    Pod(args, Api(state)).run()


if __name__ == "__main__":
    main()
