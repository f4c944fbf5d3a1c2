"""Start, check and stop the test cluster's processes, all on this machine.

They are etcd, kube-apiserver, controller-manager, scheduler, kwok and one NVIDIA
device-plugin pod per GPU node (nvidia.py), plus (where the machine allows) one real
node (realnode.py). All state lives in one directory (default
/dev/shm/inferencefleet-cluster): state.json records every process this module started
(PID + kernel start time, so a recycled PID is never signalled), next to the kubeconfig,
keys, logs and etcd's data.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import profile, realnode

E2E = Path(__file__).resolve().parent.parent
BUILD_SH = E2E / "build.sh"

DEFAULT_PORT_BASE = 16443
# Addresses come from 198.18.0.0/15 (set aside for benchmark networks), never from a
# private range: services, the real node's pods (realnode.POD_SUBNET) and kwok's pods.
SERVICE_CIDR = "198.18.0.0/16"
POD_CIDR = "198.19.128.0/17"  # kwok hands out pod IPs from here (never dialled)
KWOK_NODE_IP = "198.19.64.1"
REAL_NODE_ENV = "INFERENCEFLEET_REAL_NODE"  # 1: required, 0: none, auto (default): if possible
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Offsets from the port base. The workers use 8001/8002; the defaults stay far away.
PORTS = {
    "kube-apiserver": 0,
    "etcd": 1,
    "etcd-peer": 2,
    "kube-controller-manager": 3,
    "kube-scheduler": 4,
    "kwok": 5,
    "kubelet": 6,
    "kubelet-healthz": 7,
    "kube-proxy-healthz": 8,
    "kube-proxy-metrics": 9,
}
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
    "e2e-device-plugin",
    "e2e-pause",
    "kwok",
    "helm",
    "config-manager",
    "advertise",
)
# Stop order: clients first (unlisted ones, such as the device-plugin pods, before all),
# storage last.
STOP_ORDER = (
    "kube-proxy",
    "gpu-device-plugin",
    "kubelet",
    "containerd",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)


class ClusterError(RuntimeError):
    """The cluster could not be built, started, or kept running; the message says why."""


def say(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings & state


def default_state_dir() -> Path:
    env = os.environ.get("INFERENCEFLEET_CLUSTER_DIR")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / "inferencefleet-cluster"


def default_port_base() -> int:
    raw = os.environ.get("INFERENCEFLEET_CLUSTER_PORT_BASE", str(DEFAULT_PORT_BASE))
    try:
        return int(raw)
    except ValueError:
        raise ClusterError(f"INFERENCEFLEET_CLUSTER_PORT_BASE={raw!r} is not a number") from None


@dataclass
class Proc:
    name: str
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled PID apart
    log: str

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start_time

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = Path(self.log).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + s for s in text[-lines:])


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of a live (non-zombie) process, None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass
class State:
    """What state.json records about a cluster this module started."""

    dir: Path
    port_base: int
    bin_dir: str
    token: str
    processes: list[Proc]
    complete: bool = False
    real_node: bool = False

    @property
    def api_host(self) -> str:
        # With a real node the apiserver listens where its pods reach it.
        return realnode.NODE_IP if self.real_node else "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.api_host}:{self.port_base + PORTS['kube-apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "apiserver.crt"

    def save(self) -> None:
        data = {
            "port_base": self.port_base,
            "bin_dir": self.bin_dir,
            "token": self.token,
            "complete": self.complete,
            "real_node": self.real_node,
            "processes": [p.__dict__ for p in self.processes],
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.dir / "state.json")

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        try:
            data = json.loads((state_dir / "state.json").read_text())
            return cls(
                dir=state_dir,
                port_base=int(data["port_base"]),
                bin_dir=str(data["bin_dir"]),
                token=str(data["token"]),
                processes=[Proc(**p) for p in data["processes"]],
                complete=bool(data.get("complete", False)),
                real_node=bool(data.get("real_node", False)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            say(f"ignoring unreadable {state_dir / 'state.json'}: {e}")
            return None

    def dead(self) -> list[Proc]:
        return [p for p in self.processes if not p.alive()]

    def env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """One up/down at a time per state directory (e.g. two pytest sessions)."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{state_dir}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- build


def ensure_built() -> Path:
    """Run e2e/build.sh (reuses the cache when complete); return the build dir.

    $INFERENCEFLEET_CLUSTER_BUILD_DIR names a ready build dir (bin/, stages/) instead.
    """
    override = os.environ.get("INFERENCEFLEET_CLUSTER_BUILD_DIR")
    if override:
        return _check_build_dir(Path(override))
    try:
        proc = subprocess.Popen(
            [str(BUILD_SH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as e:
        raise ClusterError(f"cannot run {BUILD_SH}: {e}") from e
    # Progress goes on to our stderr as it comes; the end of it goes into the error.
    tail: collections.deque[str] = collections.deque(maxlen=30)
    assert proc.stderr is not None
    assert proc.stdout is not None
    with proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip())
        stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise ClusterError(
            f"{BUILD_SH} failed (exit {proc.returncode}):\n" + "\n".join("    " + t for t in tail)
        )
    return _check_build_dir(Path(stdout.strip().splitlines()[-1]))


def _check_build_dir(build_dir: Path) -> Path:
    missing = [b for b in BINARIES if not os.access(build_dir / "bin" / b, os.X_OK)]
    if missing:
        raise ClusterError(f"missing binaries in {build_dir / 'bin'}: {', '.join(missing)}")
    return build_dir


# ---------------------------------------------------------------- processes


def port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners do
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def who_listens(port: int) -> str:
    """Best effort: 'users:(("python3",pid=123,fd=3))' from ss, or ''."""
    if not shutil.which("ss"):
        return ""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    )
    return " ".join(out.stdout.split()[5:]) if out.stdout.strip() else ""


_SPAWN = """
import subprocess, sys
log = open(sys.argv[1], "ab")
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True, cwd=sys.argv[1].rsplit("/", 2)[0])
print(p.pid)
"""


def spawn(state: State, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
    """Start a daemon in its own session, reparented to init (so no zombie stays with us)."""
    log = state.dir / "logs" / f"{name}.log"
    out = subprocess.run(
        [sys.executable, "-c", _SPAWN, str(log), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if out.returncode != 0:
        raise ClusterError(f"could not start {name}: {out.stderr.strip()}")
    pid = int(out.stdout.strip())
    start = proc_start_time(pid)
    if start is None:
        raise ClusterError(
            f"{name} exited at once; its log:\n{Proc(name, pid, 0, str(log)).log_tail()}"
        )
    proc = Proc(name, pid, start, str(log))
    state.processes.append(proc)
    state.save()
    return proc


def stop(processes: list[Proc], timeout: float = 15.0) -> None:
    """SIGTERM exactly these processes (if still the same ones), then SIGKILL stragglers."""
    order = {n: i for i, n in enumerate(STOP_ORDER)}
    procs = sorted(processes, key=lambda p: order.get(p.name, -1))
    for p in procs:
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while p.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if p.alive():
                say(f"{p.name} (pid {p.pid}) ignored SIGTERM for {timeout:.0f} s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(p.alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [f"{p.name} (pid {p.pid})" for p in procs if p.alive()]
    if left:
        raise ClusterError(f"could not stop {', '.join(left)}")


def restart_component(state: State, name: str, timeout: float = 60.0) -> Proc:
    """Stop one component (SIGTERM) and start it again with the same command line.

    For faults on purpose, e.g. a kube-apiserver restart under a watching client. The new
    process replaces the old one in state.json; for the apiserver it returns once /readyz is
    200 again."""
    old = next((p for p in state.processes if p.name == name), None)
    if old is None or not old.alive():
        raise ClusterError(f"{name} is not running, nothing to restart")
    argv = Path(f"/proc/{old.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    stop([old])
    state.processes.remove(old)
    state.save()
    spawn(state, name, [a.decode() for a in argv])
    if name == "kube-apiserver":
        wait_for(state, "the restarted apiserver's /readyz", lambda: ready(state), timeout)
    return next(p for p in state.processes if p.name == name)


# ---------------------------------------------------------------- API access


def ssl_context(state: State) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(state.ca_file))


def api_get(state: State, path: str, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(state.server + path)
    req.add_header("Authorization", f"Bearer {state.token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl_context(state)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def api_send(
    state: State,
    method: str,
    path: str,
    body: dict[str, Any],
    content_type: str = "application/json",
) -> tuple[int, str]:
    req = urllib.request.Request(state.server + path, method=method, data=json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {state.token}")
    req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10, context=ssl_context(state)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def api_patch(state: State, path: str, body: dict[str, Any]) -> tuple[int, str]:
    """A JSON merge patch."""
    return api_send(state, "PATCH", path, body, "application/merge-patch+json")


def ready(state: State) -> bool:
    try:
        code, _ = api_get(state, "/readyz", timeout=2)
    except (OSError, ssl.SSLError):
        return False
    return code == 200


def wait_for(state: State, what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll `check` until true; fail at once, naming it, if a started process died."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        dead = state.dead()
        if dead:
            p = dead[0]
            raise ClusterError(
                f"{p.name} (pid {p.pid}) died while waiting for {what}; "
                f"last lines of {p.log}:\n{p.log_tail()}"
            )
        if check():
            say(f"{what}: ok after {time.monotonic() - t0:.1f} s")
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    return check


# ---------------------------------------------------------------- up / down / status


def health(state: State) -> list[str]:
    """Problems with a running cluster: dead components, apiserver not ready."""
    problems = [f"{p.name} (pid {p.pid}) is not running; log: {p.log}" for p in state.dead()]
    if not problems and not ready(state):
        problems.append(f"kube-apiserver at {state.server} is not ready (/readyz)")
    if not state.complete:
        problems.append("the last `up` did not finish")
    return problems


def check(state_dir: Path | None = None) -> State:
    """The running cluster's state; ClusterError naming each dead component otherwise."""
    state_dir = state_dir or default_state_dir()
    state = State.load(state_dir)
    if state is None:
        raise ClusterError(f"no cluster is up (no {state_dir / 'state.json'}); run e2e/cluster up")
    problems = health(state)
    if problems:
        details = "\n".join(
            f"  - {p.name} (pid {p.pid}) exited; last lines of {p.log}:\n{p.log_tail(15)}"
            for p in state.dead()
        )
        raise ClusterError(
            "cluster unhealthy: " + "; ".join(problems) + ("\n" + details if details else "")
        )
    return state


def _clean(state_dir: Path, state: State | None) -> None:
    if state is not None:
        if state.real_node:
            realnode.teardown(state, stop)
        stop(state.processes)
    if state_dir.exists():
        shutil.rmtree(state_dir)


def down(state_dir: Path | None = None) -> bool:
    """Stop exactly the processes `up` started and delete the state. True if any existed."""
    state_dir = state_dir or default_state_dir()
    with locked(state_dir):
        state = State.load(state_dir)
        existed = state_dir.exists()
        _clean(state_dir, state)
    if state is not None:
        say(f"stopped {len(state.processes)} processes and removed {state_dir}")
    return existed


def write_files(state: State) -> None:
    d = state.dir
    (d / "logs").mkdir(parents=True)
    (d / "pki").mkdir()
    if not shutil.which("openssl"):
        raise ClusterError("openssl not found: it makes the service-account signing key")
    key, pub = str(d / "pki" / "sa.key"), str(d / "pki" / "sa.pub")
    for args in (["genrsa", "-out", key, "2048"], ["rsa", "-in", key, "-pubout", "-out", pub]):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    tokens = {n: secrets.token_hex(24) for n in ("kubelet", "kube-proxy")}
    (d / "pki" / "tokens.csv").write_text(
        f"{state.token},admin,admin,system:masters\n"
        + (realnode.tokens_csv_lines(tokens) if state.real_node else "")
    )
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "inferencefleet",
                "cluster": {"server": state.server, "certificate-authority": str(state.ca_file)},
            }
        ],
        "users": [{"name": "admin", "user": {"token": state.token}}],
        "contexts": [
            {"name": "inferencefleet", "context": {"cluster": "inferencefleet", "user": "admin"}}
        ],
        "current-context": "inferencefleet",
    }
    state.kubeconfig.write_text(yaml.safe_dump(kubeconfig))
    state.kubeconfig.chmod(0o600)
    if state.real_node:
        ports = {name: state.port_base + off for name, off in PORTS.items()}
        realnode.write_files(state, ports, tokens)


def start_components(state: State, stages_dir: Path) -> None:
    d, b, port = state.dir, Path(state.bin_dir), state.port_base
    kc = str(state.kubeconfig)
    p = {name: port + off for name, off in PORTS.items()}

    spawn(
        state,
        "etcd",
        [
            str(b / "etcd"),
            "--name=default",
            f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-cluster=default=http://127.0.0.1:{p['etcd-peer']}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ],
    )
    wait_for(state, "etcd /health", http_ok(f"http://127.0.0.1:{p['etcd']}/health"), 30)

    spawn(
        state,
        "kube-apiserver",
        [
            str(b / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            f"--bind-address={state.api_host}",
            f"--advertise-address={state.api_host}",
            "--kubelet-preferred-address-types=InternalIP",
            # Namespaces can pin their pods to a dedicated node (the real node's tests do).
            "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
            f"--secure-port={p['kube-apiserver']}",
            f"--cert-dir={d / 'pki'}",
            f"--token-auth-file={d / 'pki' / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={d / 'pki' / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'pki' / 'sa.key'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            "--max-requests-inflight=1000",
            "--max-mutating-requests-inflight=500",
        ],
    )
    # The controller-manager needs the serving certificate as its root CA at start, and
    # exits if the apiserver is not healthy soon after (a loaded machine is slower): wait.
    wait_for(state, "the apiserver's self-signed certificate", state.ca_file.exists, 60)
    wait_for(state, f"kube-apiserver /readyz at {state.server}", lambda: ready(state), 120)

    common = [
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
    ]
    spawn(
        state,
        "kube-controller-manager",
        [
            str(b / "kube-controller-manager"),
            *common,
            f"--secure-port={p['kube-controller-manager']}",
            f"--cert-dir={d / 'pki' / 'kcm'}",
            f"--service-account-private-key-file={d / 'pki' / 'sa.key'}",
            f"--root-ca-file={state.ca_file}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # kwok heartbeats every 20-45 s (its node-heartbeat stage); keep nodes Ready.
            "--node-monitor-grace-period=2m",
        ],
    )
    spawn(
        state,
        "kube-scheduler",
        [
            str(b / "kube-scheduler"),
            *common,
            f"--secure-port={p['kube-scheduler']}",
            f"--cert-dir={d / 'pki' / 'scheduler'}",
        ],
    )
    stages = sorted(stages_dir.glob("*.yaml"))
    if len(stages) < 5:
        raise ClusterError(f"kwok stages missing in {stages_dir}; rerun e2e/build.sh")
    stages += sorted((E2E / "kwok-stages").glob("*.yaml"))  # ours: what kwok leaves out
    spawn(
        state,
        "kwok",
        [
            str(b / "kwok"),
            f"--kubeconfig={kc}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={profile.KWOK_ANNOTATION}={profile.KWOK_ANNOTATION_VALUE}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={KWOK_NODE_IP}",
            f"--server-address=127.0.0.1:{p['kwok']}",
            *[f"--config={s}" for s in stages],
        ],
    )
    wait_for(state, f"kube-apiserver /readyz at {state.server}", lambda: ready(state), 90)
    if state.real_node:
        realnode.start(state, spawn, wait_for, p)


def create_objects(state: State, node_profile: Path) -> None:
    def create(path: str, body: dict[str, Any]) -> None:
        code, text = api_send(state, "POST", path, body)
        if code not in (201, 409):
            raise ClusterError(f"POST {path} failed ({code}): {text[:500]}")

    from . import nvidia

    nvidia.create_configmap(state)
    nodes = profile.load(node_profile)
    for node in nodes:
        create("/api/v1/nodes", node)

    def all_ready() -> bool:
        _, text = api_get(state, "/api/v1/nodes")
        items = json.loads(text).get("items", [])
        ok = {
            n["metadata"]["name"]
            for n in items
            for c in n.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        }
        return all(n["metadata"]["name"] in ok for n in nodes)

    wait_for(state, f"{len(nodes)} nodes Ready (kwok)", all_ready, 60)
    nvidia.start_pods(state, nodes)
    wait_for(state, "every GPU node's device plugin", lambda: nvidia.advertising(state, nodes), 120)


def want_real_node(state_dir: Path) -> bool:
    """Whether this cluster gets the machine's real node ($INFERENCEFLEET_REAL_NODE)."""
    setting = os.environ.get(REAL_NODE_ENV, "auto")
    if setting not in ("0", "1", "auto"):
        raise ClusterError(f"{REAL_NODE_ENV}={setting!r}: use 1, 0 or auto")
    if setting == "0":
        return False
    why = realnode.unavailable()
    if why is None:
        try:
            realnode.claim(state_dir, lambda owner: bool((s := State.load(owner)) and not s.dead()))
        except realnode.RealNodeError as e:
            why = str(e)
    if why is None:
        return True
    if setting == "1":
        raise ClusterError(f"{REAL_NODE_ENV}=1 but no real node here: {why}")
    say(f"no real node ({why}); only kwok nodes")
    return False


def start_real_node_device_plugin(state: State) -> None:
    """NVIDIA's config-manager for the real node too: the config it selects sets the device
    count the node's own device plugin gives the kubelet."""
    from . import nvidia

    code, text = api_get(state, f"/api/v1/nodes/{realnode.NODE_NAME}")
    if code != 200:
        raise ClusterError(f"GET node {realnode.NODE_NAME}: {code} {text[:200]}")
    node = json.loads(text)
    nvidia.start_pod(state, node)
    wait_for(
        state,
        f"{realnode.NODE_NAME}'s device plugin",
        lambda: nvidia.advertising(state, [node]),
        120,
    )


def node_ready(state: State, name: str = realnode.NODE_NAME) -> bool:
    code, text = api_get(state, f"/api/v1/nodes/{name}")
    if code != 200:
        return False
    conditions = json.loads(text).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def usage(state: State) -> str:
    return f"""\
The test cluster is up (state in {state.dir}, apiserver {state.server}).
  eval "$(e2e/cluster env)"     # pinned kubectl and helm first on PATH, KUBECONFIG set
  kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.count
  e2e/cluster status            # which components run
  e2e/cluster down              # stop everything it started, remove the state"""


def up(
    state_dir: Path | None = None,
    port_base: int | None = None,
    node_profile: Path = profile.DEFAULT_PROFILE,
) -> tuple[State, bool]:
    """Bring the cluster up, or reuse a healthy one. Returns (state, started_now)."""
    state_dir = state_dir or default_state_dir()
    port_base = default_port_base() if port_base is None else port_base
    if not 1024 <= port_base <= 65535 - max(PORTS.values()):
        raise ClusterError(
            f"port base {port_base} out of range 1024..{65535 - max(PORTS.values())}"
        )
    with locked(state_dir):
        build_dir = ensure_built()
        old = State.load(state_dir)
        if old is not None:
            problems = health(old)
            if old.bin_dir != str(build_dir / "bin"):
                problems.append(f"it runs other binaries ({old.bin_dir})")
            if not problems:
                if old.port_base != port_base:
                    say(f"note: reusing the cluster on port base {old.port_base}, not {port_base}")
                return old, False
            say("found a stale cluster (" + "; ".join(problems) + "): cleaning it up")
            _clean(state_dir, old)
        elif state_dir.exists():
            say(f"removing leftover {state_dir} (no state.json)")
            shutil.rmtree(state_dir)

        busy = [
            f"{port} ({name}) {who_listens(port)}".strip()
            for name, off in PORTS.items()
            if port_in_use(port := port_base + off)
        ]
        if busy:
            raise ClusterError(
                "port already in use on 127.0.0.1: "
                + "; ".join(busy)
                + ". Stop whatever holds it, or pick other ports with "
                f"INFERENCEFLEET_CLUSTER_PORT_BASE=N (uses N..N+{max(PORTS.values())}) "
                "or `e2e/cluster up --port-base N`."
            )

        t0 = time.monotonic()
        state_dir.mkdir(parents=True)
        state = State(state_dir, port_base, str(build_dir / "bin"), secrets.token_hex(24), [])
        state.real_node = want_real_node(state_dir)
        state.save()
        try:
            if state.real_node:
                realnode.make_bridge()
            write_files(state)
            start_components(state, build_dir / "stages")
            create_objects(state, node_profile)
            if state.real_node:
                wait_for(
                    state, f"real node {realnode.NODE_NAME} Ready", lambda: node_ready(state), 120
                )
                start_real_node_device_plugin(state)
            state.complete = True
            state.save()
        except BaseException as e:
            why = "failed" if isinstance(e, ClusterError) else "interrupted"
            say(f"up {why}: stopping what it started")
            with contextlib.suppress(ClusterError, realnode.RealNodeError):
                if state.real_node:
                    realnode.teardown(state, stop)
                stop(state.processes)
            raise
        say(f"up in {time.monotonic() - t0:.1f} s")
        return state, True


def status_lines(state: State) -> list[str]:
    lines = [f"cluster in {state.dir}, apiserver {state.server}"]
    for p in state.processes:
        lines.append(f"  {p.name:<24} pid {p.pid:<8} {'running' if p.alive() else 'NOT RUNNING'}")
    lines.append(f"  {'/readyz':<24} {'ok' if ready(state) else 'NOT READY'}")
    return lines
