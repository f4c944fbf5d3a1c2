"""Operator benchmark on the test cluster: `kubectl apply` → status Ready for a 100-replica
fleet, `kubectl scale` → the Deployment's new replicas (p50/p99 over 20 scales), and the
operator's API load at rest: requests per minute it sends with 100 Ready fleets.

Starts (or reuses) the e2e cluster, installs crds/, runs `inferencefleet operator` as a
process for a fresh namespace (through bench/count_api_requests.py, which counts every
request the process sends), measures, and removes everything it made. Pods are kwok's:
"Ready" means the Deployment's readyReplicas as reported in the fleet's status.

    .venv/bin/python bench/bench_operator.py [--replicas 100] [--scales 20]
        [--fleets 100] [--rest-seconds 120] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e"))

from e2ecluster import down, up  # noqa: E402
from e2ecluster.handle import Cluster  # noqa: E402
from e2ecluster.nvidia import default_lag  # noqa: E402
from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

GROUP, VERSION, PLURAL = "inferencefleet.dev", "v1alpha1", "inferencefleets"
ADA = "NVIDIA-RTX-6000-Ada-Generation"


def poll(what: str, fn: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    deadline = time.perf_counter() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (with 20 samples, p99 is the largest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Bench:
    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.custom = client.CustomObjectsApi(cluster.api)
        self.apps = client.AppsV1Api(cluster.api)

    def fleet(self, name: str) -> dict[str, Any] | None:
        try:
            fleet: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
            return fleet
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def ready(self, name: str) -> bool:
        fleet = self.fleet(name) or {}
        status = fleet.get("status") or {}
        if status.get("observedGeneration") != fleet.get("metadata", {}).get("generation"):
            return False
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
        )

    def all_observed(self, count: int) -> bool:
        """`count` fleets, each with a status written for its current generation."""
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        seen = [
            fleet
            for fleet in items["items"]
            if (fleet.get("status") or {}).get("observedGeneration")
            == fleet["metadata"].get("generation")
        ]
        return len(seen) >= count

    def deployment_replicas(self, name: str) -> int | None:
        try:
            replicas: int = self.apps.read_namespaced_deployment(name, self.namespace).spec.replicas
            return replicas
        except ApiException as error:
            if error.status == 404:
                return None
            raise


def start_operator(
    cluster: Cluster, namespace: str, log: Path, counts: Path
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [
        sys.executable, str(REPO / "bench" / "count_api_requests.py"), str(counts), "operator",
        "--namespace", namespace,
        "--liveness-host", "127.0.0.1", "--liveness-port", str(port),
        "--log-level", "warning",
        "--config-volume-delay", f"{default_lag() + 3:g}",
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=cluster.env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/healthz"

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"operator exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    poll("the operator's liveness endpoint", healthy, timeout=300, interval=0.2)
    return process, url


def measure(bench: Bench, replicas: int, scales: int) -> dict[str, Any]:
    name = "bench"
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceFleet",
        "metadata": {"name": name, "namespace": bench.namespace},
        "spec": {
            "replicas": replicas,
            "model": {"source": "builtin:tiny"},
            # 3 nodes x 2 GPUs x 20 = 120 slots; 20 x 2048 MiB fits a 49140 MiB GPU
            "gpu": {"product": ADA, "sharing": "timeSlicing", "workersPerGPU": 20},
        },
    }
    start = time.perf_counter()
    bench.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    applied = time.perf_counter()
    poll("the Deployment", lambda: bench.deployment_replicas(name) is not None, timeout=120)
    deployed = time.perf_counter()
    poll(f"{replicas} replicas Ready", lambda: bench.ready(name), timeout=600, interval=0.05)
    ready = time.perf_counter()

    samples, commands = [], []
    for i in range(scales):
        target = replicas + 1 if i % 2 == 0 else replicas
        t0 = time.perf_counter()
        bench.cluster.kubectl(
            "scale", f"ifleet/{name}", f"--replicas={target}", "-n", bench.namespace
        )
        t1 = time.perf_counter()
        poll("the Deployment's replicas", lambda n=target: bench.deployment_replicas(name) == n, 60)
        samples.append(time.perf_counter() - t0)
        commands.append(t1 - t0)
        poll("Ready after the scale", lambda: bench.ready(name), timeout=120, interval=0.05)
    bench.cluster.kubectl("delete", "ifleet", name, "-n", bench.namespace, "--timeout=120s")
    return {
        "replicas": replicas,
        "apply_to_deployment_s": round(deployed - start, 3),
        "apply_to_ready_s": round(ready - start, 3),
        "kubectl_apply_s": round(applied - start, 3),
        "scales": scales,
        "scale_to_deployment_ms": {
            "p50": round(statistics.median(samples) * 1000, 1),
            "p99": round(percentile(samples, 99) * 1000, 1),
            "min": round(min(samples) * 1000, 1),
            "max": round(max(samples) * 1000, 1),
        },
        "kubectl_scale_command_ms_p50": round(statistics.median(commands) * 1000, 1),
    }


def read_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = json.loads(path.read_text(encoding="utf-8"))["counts"]
    return counts


def at_rest(bench: Bench, counts: Path, fleets: int, seconds: float) -> dict[str, Any]:
    """Requests per minute the operator sends while `fleets` one-replica fleets sit Ready."""
    names = [f"rest-{i:03d}" for i in range(fleets)]
    documents = [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceFleet",
            "metadata": {"name": name, "namespace": bench.namespace},
            "spec": {
                "replicas": 1,
                "model": {"source": "builtin:tiny"},
                "gpu": {"product": ADA, "sharing": "timeSlicing", "workersPerGPU": 20},
            },
        }
        for name in names
    ]
    start = time.perf_counter()
    for first in range(0, len(documents), 10):  # small batches: a busy apiserver is slow
        batch = yaml.safe_dump_all(documents[first : first + 10])
        bench.cluster.kubectl("apply", "-f", "-", input=batch, timeout=600)
    # Every fleet seen and its status written for its generation. Not all get Ready: fleets
    # of one profile do not yet count each other's pods on a shared node, so some pods of the
    # last fleets stay Pending; the operator's passes over them cost the same.
    poll(f"all {fleets} fleets observed", functools.partial(bench.all_observed, fleets), 900, 2)
    all_observed = time.perf_counter() - start
    time.sleep(30)  # let the last status writes and events settle
    before, t0 = read_counts(counts), time.perf_counter()
    time.sleep(seconds)
    after, t1 = read_counts(counts), time.perf_counter()
    minutes = (t1 - t0) / 60
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v}
    bench.cluster.kubectl(
        "delete", "ifleet", "--all", "-n", bench.namespace, "--timeout=900s", timeout=960
    )
    return {
        "fleets": fleets,
        "all_observed_s": round(all_observed, 1),
        "window_s": round(t1 - t0, 1),
        "requests_per_minute": round(sum(delta.values()) / minutes, 1),
        "by_request_per_minute": {k: round(v / minutes, 1) for k, v in delta.items()},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--scales", type=int, default=20)
    parser.add_argument("--fleets", type=int, default=100, help="fleets at rest (0: skip)")
    parser.add_argument("--rest-seconds", type=float, default=120)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    state, started = up()
    cluster = Cluster(state)
    namespace = f"bench-operator-{secrets.token_hex(3)}"
    core = client.CoreV1Api(cluster.api)
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    log, counts = workdir / "operator.log", workdir / "counts.json"
    process = None
    try:
        for crd in ("inferencefleet.yaml", "kopf-peering.yaml"):
            cluster.kubectl("apply", "-f", str(REPO / "crds" / crd))
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/inferencefleets.inferencefleet.dev",
        )  # fmt: skip
        core.create_namespace({"metadata": {"name": namespace}})
        process, _ = start_operator(cluster, namespace, log, counts)
        bench = Bench(cluster, namespace)
        figures = measure(bench, args.replicas, args.scales)
        print(json.dumps(figures), file=sys.stderr, flush=True)
        if args.fleets:
            figures["at_rest"] = at_rest(bench, counts, args.fleets, args.rest_seconds)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        core.delete_namespace(namespace)
        cluster.close()
        if started:
            down(state.dir)
    print(json.dumps(figures, indent=2))
    print(
        f"apply -> Ready ({figures['replicas']} replicas): {figures['apply_to_ready_s']} s; "
        f"scale -> Deployment replicas over {figures['scales']} scales: "
        f"p50 {figures['scale_to_deployment_ms']['p50']} ms, "
        f"p99 {figures['scale_to_deployment_ms']['p99']} ms "
        f"(kubectl scale itself: p50 {figures['kubectl_scale_command_ms_p50']} ms); "
        + (
            f"at rest with {figures['at_rest']['fleets']} fleets: "
            f"{figures['at_rest']['requests_per_minute']} requests/min; "
            if "at_rest" in figures
            else ""
        )
        + f"operator log: {log}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
