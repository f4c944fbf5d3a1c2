"""The real node: containerd, runc, a CNI bridge, a kubelet, kube-proxy and e2e's device plugin.

One machine holds at most one real node (the kubelet's device-plugin directory and
kube-proxy's iptables chains are machine-wide), so the first cluster to claim it gets it;
the claim file names the state directory that owns it. Everything the node makes is
listed here and removed by `teardown` (also after a failed `up`, and by the next `up`
when a claim's owner is gone): processes, containers, mounts, network namespaces, the
bridge, iptables chains and cgroups.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import profile

if TYPE_CHECKING:
    from .cluster import State

NODE_NAME = "realnode-0"
BRIDGE = "ifc0"
NODE_IP = "198.19.0.1"
POD_SUBNET = "198.19.0.0/24"
SERVICES = "198.18.0.0/16"  # the cluster's Service range (cluster.SERVICE_CIDR)
# Workloads that do not tolerate this stay on the kwok nodes.
TAINT = {"key": "inferencefleet.dev/real-node", "value": "true", "effect": "NoSchedule"}
PAUSE_IMAGE = "inferencefleet.local/pause:1"
KUBELET_ROOT = Path("/var/lib/kubelet")  # the device-plugin API fixes .../device-plugins
DEVICE_PLUGIN_DIR = KUBELET_ROOT / "device-plugins"
NODE_HOME = Path("/var/lib/inferencefleet-node")  # containerd's image store survives `down`
CLAIM = Path("/run/inferencefleet-node.claim")
CNI_BIN = Path("/usr/lib/cni")
NEEDED_TOOLS = ("containerd", "runc", "ctr", "iptables", "ip", "mount", "umount")
# The node is one GPU of the kind a fleet asks for; the sharing config multiplies it.
GPU = {
    "product": "NVIDIA-RTX-6000-Ada-Generation",
    "memoryMiB": 49140,
    "family": "ada-lovelace",
    "computeMajor": 8,
    "computeMinor": 9,
    "mpsCapable": True,
}
GPUS = 1


class RealNodeError(RuntimeError):
    """The real node cannot run here, or did not come up; the message says why."""


def unavailable() -> str | None:
    """Why this machine cannot hold a real node, or None if it can."""
    if os.geteuid() != 0:
        return "not root"
    missing = [t for t in NEEDED_TOOLS if shutil.which(t) is None]
    if not (CNI_BIN / "bridge").exists() or not (CNI_BIN / "host-local").exists():
        missing.append(f"CNI plugins in {CNI_BIN}")
    if missing:
        return (
            "missing "
            + ", ".join(missing)
            + " (Debian: containerd runc containernetworking-plugins iptables)"
        )
    return None


def node_labels() -> dict[str, str]:
    return {**profile.gpu_labels(GPU, GPUS), "inferencefleet.dev/real-node": "true"}


# ---------------------------------------------------------------- paths


def cdir(state_dir: Path) -> Path:
    return state_dir / "containerd"


def socket_path(state_dir: Path) -> Path:
    return cdir(state_dir) / "containerd.sock"


def devices_file(state_dir: Path) -> Path:
    return state_dir / "node" / "gpu-devices"


def _run(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    out = subprocess.run(list(argv), capture_output=True, input=input, check=False)
    if check and out.returncode != 0:
        err = out.stderr.decode(errors="replace")[-800:]
        raise RealNodeError(f"{' '.join(argv[:6])} failed ({out.returncode}): {err}")
    return out.stdout.decode(errors="replace")


def ctr(state_dir: Path, *args: str, check: bool = True, input: bytes | None = None) -> str:
    return _run(
        "ctr",
        "--address",
        str(socket_path(state_dir)),
        "-n",
        "k8s.io",
        *args,
        check=check,
        input=input,
    )


# ---------------------------------------------------------------- claim


def claim(state_dir: Path, alive: Callable[[Path], bool]) -> None:
    """Take the machine's real node for this cluster; sweep a dead owner's leftovers."""
    if CLAIM.exists():
        owner = Path(CLAIM.read_text().strip() or "/nonexistent")
        if owner != state_dir and alive(owner):
            raise RealNodeError(f"the real node belongs to the cluster in {owner}")
        sweep(owner)
    CLAIM.write_text(str(state_dir))


def owns(state_dir: Path) -> bool:
    try:
        return Path(CLAIM.read_text().strip()) == state_dir
    except OSError:
        return False


# ---------------------------------------------------------------- files


def write_files(state: State, ports: dict[str, int], tokens: dict[str, str]) -> None:
    d = state.dir
    node = d / "node"
    (node / "cni").mkdir(parents=True)
    cd = cdir(d)
    cd.mkdir()
    NODE_HOME.mkdir(parents=True, exist_ok=True)
    # The seam for the node's sharing config: whatever applies it writes physical GPUs x
    # replicas here; until then the node advertises its physical GPUs.
    devices_file(d).write_text(f"{GPUS}\n")
    toml = f"""\
version = 2
root = "{NODE_HOME / "containerd"}"
state = "{cd / "state"}"
[grpc]
  address = "{socket_path(d)}"
[ttrpc]
  address = "{cd / "ttrpc.sock"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{cd / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{node / "cni"}"
    max_conf_num = 1
"""
    (cd / "config.toml").write_text(toml)
    cni = {
        "cniVersion": "0.4.0",
        "name": "inferencefleet",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                    # Services only (kube-proxy turns them into pod or node addresses); no
                    # default route, so a pod reaches nothing beyond this machine's ranges.
                    "routes": [{"dst": SERVICES}],
                    "dataDir": str(node / "ipam"),
                },
            }
        ],
    }
    (node / "cni" / "10-inferencefleet.conflist").write_text(json.dumps(cni, indent=2))

    def kubeconfig(name: str, token: str) -> Path:
        path = node / f"{name}.kubeconfig"
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "c",
                    "cluster": {
                        "server": state.server,
                        "certificate-authority": str(state.ca_file),
                    },
                }
            ],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": name}}],
            "current-context": "c",
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    kubelet_cfg: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet-healthz"],
        # The apiserver reaches the kubelet (logs, exec) without a client certificate.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{socket_path(d)}",
        "resolvConf": "",
        "registerWithTaints": [TAINT],
        "maxPods": 32,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "nodeStatusUpdateFrequency": "5s",
        "enforceNodeAllocatable": ["pods"],
    }
    (node / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_cfg))
    proxy_cfg = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig("kube-proxy", tokens["kube-proxy"]))},
        "mode": "iptables",
        "clusterCIDR": POD_SUBNET,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Leave the machine's conntrack sysctls alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
    }
    (node / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy_cfg))
    kubeconfig("kubelet", tokens["kubelet"])


def tokens_csv_lines(tokens: dict[str, str]) -> str:
    """Static-token users of the node's components (Node authorizer + RBAC apply)."""
    return (
        f"{tokens['kubelet']},system:node:{NODE_NAME},system:node:{NODE_NAME},system:nodes\n"
        f"{tokens['kube-proxy']},system:kube-proxy,system:kube-proxy\n"
    )


# ---------------------------------------------------------------- network


def make_bridge() -> None:
    """The bridge the CNI plugin attaches pods to; the apiserver listens on its address."""
    if _run("ip", "link", "show", BRIDGE, check=False) == "":
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "replace", f"{NODE_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")


# ---------------------------------------------------------------- pause image


def _tar_bytes(files: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pause_image_archive(pause_binary: Path, name: str = PAUSE_IMAGE) -> bytes:
    """An OCI image archive holding one static binary as /pause (no registry needed)."""
    layer = _tar_bytes({"pause": (pause_binary.read_bytes(), 0o755)})
    layer_gz = gzip.compress(layer, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    config_b = json.dumps(config).encode()

    def desc(media: str, data: bytes) -> dict[str, Any]:
        return {
            "mediaType": media,
            "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", config_b),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", layer_gz)],
    }
    manifest_b = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **desc("application/vnd.oci.image.manifest.v1+json", manifest_b),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name,
                },
            }
        ],
    }
    blobs = {
        f"blobs/sha256/{hashlib.sha256(b).hexdigest()}": (b, 0o644)
        for b in (layer_gz, config_b, manifest_b)
    }
    return _tar_bytes(
        {
            "oci-layout": (b'{"imageLayoutVersion":"1.0.0"}', 0o644),
            "index.json": (json.dumps(index).encode(), 0o644),
            **blobs,
        }
    )


# ---------------------------------------------------------------- start


def start(
    state: State, spawn: Callable[..., Any], wait_for: Callable[..., None], ports: dict[str, int]
) -> None:
    """Start containerd, the kubelet, e2e's device plugin and kube-proxy (apiserver is up)."""
    d, b = state.dir, Path(state.bin_dir)
    node = d / "node"
    spawn(state, "containerd", ["containerd", "--config", str(cdir(d) / "config.toml")])
    wait_for(state, "containerd", lambda: ctr(d, "version", check=False) != "", 30)
    # Containers of an earlier node (the image store persists): remove before the kubelet sees them.
    for cid in ctr(d, "containers", "ls", "-q").split():
        ctr(d, "tasks", "rm", "-f", cid, check=False)
        ctr(d, "containers", "rm", cid, check=False)
    ctr(d, "images", "import", "-", input=pause_image_archive(b / "e2e-pause"))
    DEVICE_PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
    labels = ",".join(f"{k}={v}" for k, v in node_labels().items())
    spawn(
        state,
        "kubelet",
        [
            str(b / "kubelet"),
            f"--config={node / 'kubelet.yaml'}",
            f"--kubeconfig={node / 'kubelet.kubeconfig'}",
            f"--root-dir={KUBELET_ROOT}",
            f"--cert-dir={node / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            f"--node-labels={labels}",
            "--v=1",
        ],
    )
    spawn(
        state,
        "gpu-device-plugin",
        [
            str(b / "e2e-device-plugin"),
            f"--devices-file={devices_file(d)}",
            f"--socket-dir={DEVICE_PLUGIN_DIR}",
        ],
    )
    spawn(
        state,
        "kube-proxy",
        [str(b / "kube-proxy"), f"--config={node / 'kube-proxy.yaml'}", "--v=1"],
    )


# ---------------------------------------------------------------- teardown


def _mounts_under(*roots: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if any(target == str(r) or target.startswith(str(r) + "/") for r in roots):
            found.append(target)
    return sorted(found, key=len, reverse=True)


def _shim_pids(state_dir: Path) -> list[int]:
    """containerd's shims for this node (their command line names our socket)."""
    sock = str(socket_path(state_dir)).encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and sock in cmd:
                pids.append(int(p.name))
    return pids


def kill_containers(state_dir: Path) -> None:
    """Kill every container (through containerd if it answers, else runc) and its shim."""
    if socket_path(state_dir).exists() and ctr(state_dir, "version", check=False):
        for cid in ctr(state_dir, "containers", "ls", "-q", check=False).split():
            ctr(state_dir, "tasks", "rm", "-f", cid, check=False)  # -f kills a running task
            ctr(state_dir, "containers", "rm", cid, check=False)
    runc_root = cdir(state_dir) / "runc" / "k8s.io"
    if runc_root.is_dir():
        for cid in _run("runc", "--root", str(runc_root), "list", "-q", check=False).split():
            _run("runc", "--root", str(runc_root), "kill", "--all", cid, "KILL", check=False)
            _run("runc", "--root", str(runc_root), "delete", "--force", cid, check=False)
    for pid in _shim_pids(state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def _iptables_cleanup(bin_dir: Path | None) -> None:
    proxy = bin_dir / "kube-proxy" if bin_dir else None
    if proxy and proxy.exists():
        _run(str(proxy), "--cleanup", check=False)
    # What kube-proxy --cleanup leaves (the kubelet's KUBE-FIREWALL and canary chains):
    # first the jumps into KUBE-* chains from other chains, then the chains themselves.
    for tool in ("iptables", "ip6tables"):
        for table in ("mangle", "nat", "filter"):
            rules = _run(tool, "-w", "-t", table, "-S", check=False).splitlines()
            for rule in rules:
                words = rule.split()
                if words[:1] == ["-A"] and not words[1].startswith("KUBE-") and "KUBE-" in rule:
                    _run(tool, "-w", "-t", table, "-D", *words[1:], check=False)
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for chain in chains:
                _run(tool, "-w", "-t", table, "-F", chain, check=False)
            for chain in chains:
                _run(tool, "-w", "-t", table, "-X", chain, check=False)


def _remove_cgroups() -> None:
    root = Path("/sys/fs/cgroup")
    for ctl in root.iterdir() if root.is_dir() else []:
        top = ctl / "kubepods"
        if not top.is_dir():
            continue
        dirs = sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        for p in [*dirs, top]:
            with contextlib.suppress(OSError):
                p.rmdir()


def sweep(state_dir: Path, bin_dir: Path | None = None) -> None:
    """Remove what a node owned by `state_dir` left on the machine (processes already stopped)."""
    kill_containers(state_dir)
    for target in _mounts_under(KUBELET_ROOT, state_dir, NODE_HOME):
        _run("umount", "-l", target, check=False)
    netns_dir = cdir(state_dir) / "state" / "io.containerd.grpc.v1.cri"
    if netns_dir.exists():
        shutil.rmtree(netns_dir, ignore_errors=True)
    _iptables_cleanup(bin_dir)
    _run("ip", "link", "del", BRIDGE, check=False)
    for sub in (
        "pods",
        "plugins",
        "plugins_registry",
        "pod-resources",
        "checkpoints",
        "device-plugins",
    ):
        shutil.rmtree(KUBELET_ROOT / sub, ignore_errors=True)
    for f in ("cpu_manager_state", "memory_manager_state", "dra_manager_state"):
        with contextlib.suppress(OSError):
            (KUBELET_ROOT / f).unlink()
    _remove_cgroups()
    with contextlib.suppress(OSError):
        if CLAIM.read_text().strip() == str(state_dir):
            CLAIM.unlink()


def teardown(state: State, stop: Callable[[list[Any]], None]) -> None:
    """Stop the node's processes in order and remove everything the node made."""
    node_side = [
        p for p in state.processes if p.name in ("kube-proxy", "gpu-device-plugin", "kubelet")
    ]
    stop(node_side)
    kill_containers(state.dir)  # through containerd while it still runs
    stop([p for p in state.processes if p.name == "containerd"])
    sweep(state.dir, Path(state.bin_dir))


# ---------------------------------------------------------------- project images

IMAGES_SH = Path(__file__).resolve().parent.parent / "images.sh"


def ensure_image(state_dir: Path, name: str) -> str:
    """Build (or reuse) image `name` with e2e/images.sh and import it into the node's
    containerd (once per build: the image store persists); return its reference."""
    out = subprocess.run([str(IMAGES_SH), name], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RealNodeError(f"{IMAGES_SH} {name} failed:\n{out.stderr[-3000:]}")
    _, archive, ref = out.stdout.strip().splitlines()[-1].split()
    marker = NODE_HOME / "imported" / Path(archive).name
    if marker.exists() and ref in ctr(state_dir, "images", "ls", "-q").split():
        return ref
    argv = ["ctr", "--address", str(socket_path(state_dir)), "-n", "k8s.io", "images", "import"]
    for attempt in (1, 2):  # containerd may still be settling after `up`: one more try
        with open(archive, "rb") as f:
            done = subprocess.run([*argv, "-"], stdin=f, capture_output=True, check=False)
        if done.returncode == 0:
            break
        why = done.stderr.decode(errors="replace")[-2000:]
        if attempt == 2:
            raise RealNodeError(f"importing {archive} into the node's containerd failed: {why}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return ref
