"""examples/fleet.yaml on the test cluster's real node: the worker image in real pods that serve.

The fleet is the example as a user applies it, scaled to the one GPU the node has (time-sliced
four ways: two pods) and pointed at the node (its node selector and taint); the namespace
enforces Pod Security `restricted`. The operator is the same process as in the other e2e
tests; the pods run the image built from docker/worker.Dockerfile under the name the operator
uses by default.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from e2ecluster import realnode
from e2ecluster.handle import wait_until
from fleet_spec.contract import WorkerSettings

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fleet.yaml"
INFERENCEFLEET = ROOT / ".venv" / "bin" / "inferencefleet"
NAME = "detector"


@pytest.fixture
def worker_image(cluster: Any) -> str:
    """The worker image in the real node's containerd (built or reused); skips without one."""
    if not cluster.state.real_node:
        pytest.skip(f"no real node ({realnode.unavailable() or 'claimed elsewhere'})")
    return realnode.ensure_image(cluster.state.dir, "worker")


def example_on_the_real_node(namespace: str) -> dict[str, Any]:
    fleet: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    fleet["metadata"]["namespace"] = namespace
    spec = fleet["spec"]
    spec["replicas"] = 2  # 1 GPU x 4 time-slicing slots; two pods leave the CPUs some room
    spec["nodeSelector"] = {"inferencefleet.dev/real-node": "true"}
    taint = realnode.TAINT
    spec["tolerations"] = [{"key": taint["key"], "operator": "Exists", "effect": taint["effect"]}]
    return fleet


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _ready_pods(fleets: Any) -> list[dict[str, Any]]:
    pods = [p for p in fleets.pods(NAME) if not p["metadata"].get("deletionTimestamp")]
    return [
        p
        for p in pods
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (p.get("status") or {}).get("conditions") or []
        )
    ]


def _endpoints(fleets: Any) -> list[str]:
    """host:port of every ready endpoint of the fleet's headless Service (EndpointSlices)."""
    out = fleets.kubectl(
        "get", "endpointslices", "-l", f"kubernetes.io/service-name={NAME}", "-o", "json"
    )
    found = []
    for piece in json.loads(out)["items"]:
        port = next(p["port"] for p in piece.get("ports") or [] if p.get("name") == "grpc")
        for endpoint in piece.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready"):
                found += [f"{address}:{port}" for address in endpoint["addresses"]]
    return sorted(found)


def _metric(address: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{address}:8002/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def _infer(
    targets: list[str], model: str, frames: np.ndarray, deadline_s: float = 60
) -> list[np.ndarray]:
    from fleet_client.client import InferenceClient

    answers = []
    for target in targets:
        async with InferenceClient(target) as client:
            answers.append(np.asarray(await client.infer(model, frames, deadline_s=deadline_s)))
    return answers


class BenchLoop:
    """`inferencefleet bench -c 16` against one target, run after run (15 s each) in a thread
    until stopped: per run, when it ended, the requests answered and the errors by code."""

    def __init__(self, target: str, model: str, workdir: Path) -> None:
        self.target, self.model, self.workdir = target, model, workdir
        self.results: list[tuple[float, int, dict[str, int], str]] = []  # end, ok, errors, why
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def runs(self) -> int:
        return len(self.results)

    def since(self, t0: float) -> tuple[int, int, list[str]]:
        """Requests, failed requests and problems of the runs that ended after t0."""
        runs = [r for r in self.results if r[0] > t0]
        problems = [f"{why or errors}" for _, _, errors, why in runs if why or errors]
        return sum(r[1] for r in runs), sum(sum(r[2].values()) for r in runs), problems

    def _loop(self) -> None:
        while not self._stop.is_set():
            out = self.workdir / f"bench-{self.runs:03d}.json"
            argv = [
                str(INFERENCEFLEET), "bench", self.target, "--model", self.model,
                "-c", "16", "--duration", "15", "--warmup", "0", "--retries", "4",
                "--json-file", str(out), "--quiet",
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not out.exists():
                why = f"bench exited {done.returncode}: {done.stderr[-500:]}"
                self.results.append((time.monotonic(), 0, {}, why))
                continue
            step = json.loads(out.read_text())["steps"][0]
            self.results.append((time.monotonic(), step["requests"], step["errors"], ""))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


@pytest.fixture
def local_worker(tmp_path: Path) -> Iterator[Any]:
    """start(argv) runs `inferencefleet serve` here on 127.0.0.1 with a pod's arguments."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], port: int) -> str:
        override = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
        with (tmp_path / "local-worker.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(INFERENCEFLEET), *argv, *override], stdout=log, stderr=subprocess.STDOUT
                )
            )
        return f"127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=60)


def test_example_fleet_serves_on_the_real_node(
    cluster: Any,
    namespace: str,
    fleet_ops: Any,
    start_operator: Any,
    worker_image: str,
    local_worker: Any,
    tmp_path: Path,
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    # The node's GPU is simulated: the workers run the model on the CPU.
    with start_operator(extra=("--worker-device", "cpu")):
        check_the_fleet(cluster, namespace, fleet_ops, worker_image, local_worker, tmp_path)
        check_tune(fleet_ops, worker_image)


def check_the_fleet(
    cluster: Any,
    namespace: str,
    fleets: Any,
    worker_image: str,
    local_worker: Any,
    workdir: Path,
) -> None:
    fleets.apply(example_on_the_real_node(namespace))
    fleets.wait_ready(NAME, timeout=420)  # two pods import torch and warm up on 2 shared CPUs

    # The fleet's status is the operator's last pass; the pods are read now.
    def two_ready_pods() -> list[dict[str, Any]]:
        found = _ready_pods(fleets)
        return found if len(found) == 2 else []

    pods = wait_until("two ready pods", two_ready_pods, timeout=60)
    assert {p["spec"]["nodeName"] for p in pods} == {realnode.NODE_NAME}
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {worker_image}
    uids = {p["metadata"]["uid"] for p in pods}

    # Ready only once warm: the readiness probe is gRPC health, NOT_SERVING until warm-up ends.
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert "grpc" in container["readinessProbe"], container["readinessProbe"]
        logs = fleets.kubectl("logs", pod["metadata"]["name"], "--timestamps")
        warm = next(line for line in logs.splitlines() if "model warm in" in line)
        ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
        # The log's time has sub-second digits; the condition's is whole seconds.
        warm_at = _time(warm.split()[0][:19] + "Z")
        ready_at = _time(ready["lastTransitionTime"])
        assert ready_at >= warm_at, (warm, ready)
        created = _time(pod["metadata"]["creationTimestamp"])
        started = _time(pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
        print(
            f"pod {pod['metadata']['name']}: created to Ready {(ready_at - created).seconds} s, "
            f"container start to Ready {(ready_at - started).seconds} s"
        )

    # Inference through the pods' addresses, as the headless Service's EndpointSlices give
    # them, answered the same as a local worker started with a pod's own arguments.
    def two_endpoints() -> list[str]:
        found = _endpoints(fleets)
        return found if len(found) == 2 else []

    targets: list[str] = wait_until("two ready endpoints", two_endpoints, timeout=60)
    args = pods[0]["spec"]["containers"][0].get("args") or []
    model = WorkerSettings.from_argv(args).served_name
    reference = local_worker(["serve", *args], 18401)
    frames = np.random.default_rng(5).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)

    def local_ready() -> list[np.ndarray] | None:
        try:
            return asyncio.run(_infer([reference], model, frames))
        except Exception:  # still warming up
            return None

    expected = wait_until("the local worker to answer", local_ready, timeout=300, interval=2)[0]
    for answer in asyncio.run(_infer(targets, model, frames)):
        assert answer.shape == expected.shape
        assert (answer.argmax(axis=1) == expected.argmax(axis=1)).all()
        np.testing.assert_allclose(answer, expected, rtol=0.05, atol=0.05)

    # A batching edit is applied in place: the same pods, the new size in their metrics.
    assert {_metric(t.split(":")[0], "inferencefleet_max_batch_size") for t in targets} == {8.0}
    fleets.kubectl(
        "patch", "inferencefleet", NAME, "--type=merge", "-p",
        json.dumps({"spec": {"batching": {"maxBatchSize": 4}}}),
    )  # fmt: skip
    wait_until(
        "maxBatchSize 4 in every pod's metrics (the kubelet refreshes the ConfigMap volume)",
        lambda: (
            {_metric(t.split(":")[0], "inferencefleet_max_batch_size") for t in targets} == {4.0}
        ),
        timeout=180,
        interval=2,
    )
    after = [p for p in fleets.pods(NAME) if not p["metadata"].get("deletionTimestamp")]
    assert {p["metadata"]["uid"] for p in after} == uids
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 0 for p in after)

    # A worker killed inside its container: the kubelet restarts the container, and the pod
    # serves again.
    victim = pods[0]
    container_id = victim["status"]["containerStatuses"][0]["containerID"].split("://")[1]
    tasks = realnode.ctr(cluster.state.dir, "tasks", "ls")
    pid = next(line.split()[1] for line in tasks.splitlines() if line.startswith(container_id))
    subprocess.run(["kill", "-KILL", pid], check=True)

    def restarted() -> bool:
        pod = next(
            p for p in fleets.pods(NAME) if p["metadata"]["uid"] == victim["metadata"]["uid"]
        )
        status = pod["status"]["containerStatuses"][0]
        return bool(status["restartCount"] >= 1 and status.get("ready"))

    wait_until("the killed container restarted and ready", restarted, timeout=300, interval=2)
    address = victim["status"]["podIP"]
    again = asyncio.run(_infer([f"{address}:8001"], model, frames))[0]
    assert (again.argmax(axis=1) == expected.argmax(axis=1)).all()

    # A rollout, then a scale-down, while `inferencefleet bench` keeps 16 requests in flight
    # through a ClusterIP Service of the fleet's pods (kube-proxy on the node picks a ready
    # pod per connection); the client retries UNAVAILABLE as gRPC's retry policy allows.
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{NAME}-load", "namespace": namespace},
        "spec": {
            "selector": {"inferencefleet.dev/fleet": NAME},
            "ports": [{"name": "grpc", "port": 8001, "targetPort": 8001}],
        },
    }
    fleets.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(service))
    ip = json.loads(fleets.kubectl("get", "service", f"{NAME}-load", "-o", "json"))["spec"]
    address = f"{ip['clusterIP']}:8001"

    def service_answers() -> bool:  # kube-proxy has the new Service's rules
        # A short deadline per try, so a try made before the rules exist gives up and the next
        # one opens a new connection (with 60 s, one stuck try used the whole wait).
        try:
            return bool(asyncio.run(_infer([address], model, frames[:1], deadline_s=5)))
        except Exception:
            return False

    try:
        wait_until(f"{address} to answer", service_answers, timeout=60, interval=1)
    except AssertionError as exc:  # say what kube-proxy was doing
        log = fleets.cluster.state.dir / "logs" / "kube-proxy.log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc}\nkube-proxy's log ends:\n{tail}") from exc
    load = BenchLoop(address, model, workdir)
    load.start()
    try:
        wait_until("a first run of the load", lambda: load.runs > 0, 120, 1)
        before = {p["metadata"]["uid"] for p in fleets.pods(NAME)}
        rollout_at = time.monotonic()  # every run that ends from here on counts
        fleets.kubectl("rollout", "restart", f"deployment/{NAME}")

        def rolled() -> bool:
            pods = [p for p in fleets.pods(NAME) if not p["metadata"].get("deletionTimestamp")]
            fresh = [p for p in _ready_pods(fleets) if p["metadata"]["uid"] not in before]
            return len(fresh) == 2 and len(pods) == 2

        wait_until("the rollout to replace both pods", rolled, timeout=600, interval=2)
        fleets.kubectl("scale", "inferencefleet", NAME, "--replicas=1")
        wait_until(
            "the scale-down to one pod",
            lambda: len(fleets.pods(NAME)) == 1 and len(_ready_pods(fleets)) == 1,
            timeout=180,
            interval=2,
        )
        runs = load.runs
        wait_until("one more bench run after the scale-down", lambda: load.runs > runs + 1, 120)
    finally:
        load.stop()
    first = load.results[0]
    print(f"before the rollout: {first[1]} requests, errors {first[2] or 'none'} {first[3]}")
    requests, failed, problems = load.since(rollout_at)
    print(f"under rollout and scale-down: {requests} requests, {failed} failed")
    assert requests > 0
    assert (failed, problems) == (0, [])


def check_tune(fleets: Any, worker_image: str) -> None:
    """spec.tune for real: the operator's Job runs `inferencefleet tune` in the worker image on
    the node, and its recommendation reaches status.tune and `kubectl get`, not the spec; the
    serving pods are left as they are."""
    before = {p["metadata"]["uid"] for p in fleets.pods(NAME)}
    spec_before = (fleets.get(NAME) or {})["spec"]
    tune = {"p99Ms": 5000, "budgetSeconds": 20}
    fleets.kubectl(
        "patch", "ifleet", NAME, "--type=merge", "-p", json.dumps({"spec": {"tune": tune}})
    )
    started = time.monotonic()

    def ended() -> dict[str, Any] | None:
        status = ((fleets.get(NAME) or {}).get("status") or {}).get("tune") or {}
        return status if status.get("state") in ("Succeeded", "Failed") else None

    # the tune pod imports torch and starts its workers on the 2 shared CPUs, then measures 20 s
    status = wait_until("the tune Job to end", ended, timeout=480, interval=2)
    print(f"tune: {status.get('summary')} ({status.get('message')}); "
          f"spec.tune to status {time.monotonic() - started:.0f} s")  # fmt: skip
    assert status["state"] == "Succeeded", status
    job = json.loads(fleets.kubectl("get", "job", status["job"], "-o", "json"))
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == worker_image
    assert status["node"] == realnode.NODE_NAME
    recommendation = status["recommendation"]
    assert recommendation["batching"]["maxBatchSize"] in (1, 2, 4, 8, 16)
    assert recommendation["replicas"] in (1, 2)  # worker processes on the node's 2 CPUs
    assert status["framesPerSecond"] > 0
    assert status["summary"] in fleets.kubectl("get", "ifleet", NAME)
    after = fleets.get(NAME) or {}
    assert after["spec"] == {**spec_before, "tune": tune}  # never written into the spec
    assert {p["metadata"]["uid"] for p in fleets.pods(NAME)} == before
