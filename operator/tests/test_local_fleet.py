"""`inferencefleet run` with real workers on loopback: bench it, kill a worker, change batching
live, scale 3 -> 1, and Ctrl-C leaves no process. The tests share one fleet and run in order."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from fleet_proto import inference_pb2 as pb
from fleet_proto import inference_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"
DEADLINE_S = 180.0


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def free_base_port(count: int) -> int:
    """A port p such that p .. p+count-1 are free on 127.0.0.1 right now."""
    for base in range(21000 + os.getpid() % 2000 * 10, 60000, 37):
        sockets = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise AssertionError("no free ports")


def processes_with(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (a path unique to one test fleet)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def write_fleet(path: Path, replicas: int, max_batch_size: int = 8) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["replicas"] = replicas
    manifest["spec"]["batching"]["maxBatchSize"] = max_batch_size
    path.write_text(yaml.safe_dump(manifest))


@dataclass
class LocalFleet:
    """A running `inferencefleet run` process and what it printed."""

    process: subprocess.Popen[str]
    manifest: Path
    output: Path
    ready_file: Path
    status_file: Path
    log_dir: Path
    metrics_base: int

    def status(self) -> dict[str, Any]:
        """What `run --status-file` says now ({} before its first write)."""
        try:
            status: dict[str, Any] = json.loads(self.status_file.read_text())
        except FileNotFoundError:
            return {}
        return status

    def workers(self) -> dict[str, tuple[int, str, int]]:
        """(pid, state, restarts) per worker, from the status file."""
        return {
            w["name"]: (w["pid"], w["state"], w["restarts"])
            for w in self.status().get("workers", [])
        }

    def restarted(self, name: str, restarts: int) -> bool:
        """Ready again after more than `restarts` restarts (one read of the status file; a
        restart that failed and was retried counts too)."""
        _, state, now = self.workers()[name]
        return state == "ready" and now > restarts

    def endpoints(self) -> list[str]:
        try:
            return self.ready_file.read_text().strip().split(",")
        except OSError:
            return []

    def metrics(self, index: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.metrics_base + index}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        samples: dict[str, Any] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name + json.dumps(
                    {k: v for k, v in sample.labels.items() if k != "model"}, sort_keys=True
                )
                samples[key] = samples.get(key, 0.0) + sample.value
        return samples


def max_batch_size(endpoint: str) -> int:
    """What the worker's ModelConfig says now."""
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ModelConfig(pb.ModelConfigRequest(name="tiny"), timeout=5)
    return int(reply.config.max_batch_size)


def bench(endpoints: list[str], *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "inferencefleet.cli", "bench", ",".join(endpoints)]
    argv += ["--model", "tiny", "--json", "--quiet", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    root = tmp_path_factory.mktemp("local-fleet")
    manifest = root / "fleet.yaml"
    write_fleet(manifest, replicas=3)
    port = free_base_port(6)
    metrics = port + 3
    log_dir = root / "logs"
    output = root / "run.out"
    argv = [
        sys.executable, "-m", "inferencefleet.cli", "run", str(manifest),
        "--model", "builtin:tiny", "--image-size", "64", "--threads", "1",
        "--port", str(port), "--metrics-port", str(metrics),
        "--log-dir", str(log_dir), "--ready-file", str(root / "ready"),
        "--status-file", str(root / "status.json"),
        "--no-table", "--grace-period-s", "2", "--backoff-s", "0.5", "--unresponsive-s", "3",
    ]  # fmt: skip
    with output.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
    running = LocalFleet(
        process, manifest, output, root / "ready", root / "status.json", log_dir, metrics
    )
    try:
        wait_for(
            "3 ready workers", lambda: len(running.endpoints()) == 3 or process.poll() is not None
        )
        assert process.poll() is None, output.read_text()
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in processes_with(str(log_dir)):
            os.kill(pid, signal.SIGKILL)


def test_bench_balances_over_the_fleet(fleet: LocalFleet) -> None:
    result = finish(bench(fleet.endpoints(), "-c", "1,6", "--duration", "2", "--warmup", "0.5"))
    step = result["steps"][-1]
    assert step["requests"] > 0
    assert step["errors"] == {}
    assert set(step["share"]) == set(fleet.endpoints())
    assert all(share > 0.1 for share in step["share"].values())


def test_killed_worker_is_restarted_and_bench_reports_errors(fleet: LocalFleet) -> None:
    pid, state, restarts = fleet.workers()["w1"]
    assert state == "ready"
    frames_key = "inferencefleet_frames_total{}"
    served_before = fleet.metrics(1).get(frames_key, 0.0)
    load = bench(fleet.endpoints(), "-c", "6", "--duration", "8", "--warmup", "0")
    wait_for("load on w1", lambda: fleet.metrics(1).get(frames_key, 0.0) > served_before + 20)
    os.kill(pid, signal.SIGKILL)
    result = finish(load)
    step = result["steps"][0]
    assert sum(step["errors"].values()) > 0, step
    assert step["requests"] > 0
    wait_for("w1 restarted", lambda: fleet.restarted("w1", restarts))
    assert fleet.workers()["w1"][0] != pid
    assert not alive(pid)


def test_worker_that_stops_answering_is_restarted(fleet: LocalFleet) -> None:
    pid, state, restarts = fleet.workers()["w2"]
    assert state == "ready"
    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        wait_for("w2 unresponsive", lambda: fleet.workers()["w2"][1] == "unresponsive")
        wait_for("w2 restarted", lambda: fleet.restarted("w2", restarts))
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert fleet.workers()["w2"][0] != pid
    assert not alive(pid)


def test_batching_change_applies_live(fleet: LocalFleet) -> None:
    pids = {name: w[0] for name, w in fleet.workers().items()}
    write_fleet(fleet.manifest, replicas=3, max_batch_size=2)
    wait_for("the change", lambda: fleet.status()["batching"]["maxBatchSize"] == 2)
    wait_for(
        "every worker to report maxBatchSize 2",
        lambda: all(max_batch_size(endpoint) == 2 for endpoint in fleet.endpoints()),
    )
    before = [fleet.metrics(i) for i in range(3)]
    finish(bench(fleet.endpoints(), "-c", "12", "--duration", "2", "--warmup", "0"))
    for index, old in enumerate(before):
        new = fleet.metrics(index)
        count = "inferencefleet_batch_size_count{}"
        at_most_2 = 'inferencefleet_batch_size_bucket{"le": "2.0"}'
        batches = new[count] - old.get(count, 0.0)
        assert batches > 0
        assert new[at_most_2] - old.get(at_most_2, 0.0) == batches  # no batch above 2 frames
    assert {name: w[0] for name, w in fleet.workers().items()} == pids  # nobody restarted


def test_scale_three_to_one(fleet: LocalFleet) -> None:
    before = fleet.workers()
    write_fleet(fleet.manifest, replicas=1, max_batch_size=2)
    wait_for("one endpoint", lambda: len(fleet.endpoints()) == 1)
    wait_for("w1 and w2 gone", lambda: not alive(before["w1"][0]) and not alive(before["w2"][0]))
    assert fleet.workers()["w0"][0] == before["w0"][0]
    result = finish(bench(fleet.endpoints(), "-c", "2", "--duration", "1", "--warmup", "0"))
    assert result["steps"][0]["requests"] > 0


def test_ctrl_c_drains_and_leaves_no_process(fleet: LocalFleet) -> None:
    workers = [pid for pid, _, _ in fleet.workers().values()]
    fleet.process.send_signal(signal.SIGINT)
    assert fleet.process.wait(timeout=60) == 0
    assert processes_with(str(fleet.log_dir)) == []
    assert not any(alive(pid) for pid in workers)
    status = fleet.status()
    assert status["stopped"]
    assert {w["state"] for w in status["workers"]} == {"stopped"}
