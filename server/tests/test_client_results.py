"""Summary figures of a benchmark step, the sweep's JSON and plot, and target parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fleet_client.report import best_step, plot_sweep, sweep_json
from fleet_client.results import StepResult, percentile
from fleet_client.targets import TargetError, parse_targets


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def _step(concurrency: int, latencies: list[float], window: float = 2.0) -> StepResult:
    return StepResult(concurrency, window, 4, latencies_s=latencies)


def test_step_figures() -> None:
    step = _step(4, [0.010] * 90 + [0.050] * 10)
    step.errors = {"UNAVAILABLE": 3}
    step.per_target = {"127.0.0.1:8002": 100, "127.0.0.1:8001": 300}
    step.client_cpu_s = 0.5
    assert step.frames == 400
    assert step.frames_per_s == 200.0
    assert step.latency_ms(0.5) == pytest.approx(10.0)
    assert step.latency_ms(0.99) == pytest.approx(50.0)
    assert step.shares() == {"127.0.0.1:8001": 0.75, "127.0.0.1:8002": 0.25}
    assert step.client_cpu_percent == 25.0
    doc = step.to_json()
    assert doc["errors"] == {"UNAVAILABLE": 3}
    assert doc["latency_ms"]["p90"] == 10.0


def test_best_step_and_json_ignore_failed_steps(tmp_path: Path) -> None:
    steps = [_step(1, [0.01] * 10), _step(4, [0.02] * 30), _step(16, [])]
    best = best_step(steps)
    assert best is not None
    assert best.concurrency == 4
    doc = sweep_json({"model": "tiny"}, steps)
    assert doc["best"]["concurrency"] == 4
    assert doc["steps"][2]["latency_ms"]["p99"] is None
    plot = tmp_path / "out" / "sweep.png"
    plot_sweep(steps, plot, "tiny")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_are_one_round_robin_target() -> None:
    targets = parse_targets(["127.0.0.1:8001,127.0.0.1:8002", "127.0.0.1:8003"])
    assert targets.grpc_target == "ipv4:127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003"
    assert targets.addresses == ("127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003")
    service = parse_targets(["detector.vision.svc.cluster.local:8001"])
    assert service.grpc_target == "dns:///detector.vision.svc.cluster.local:8001"
    assert service.addresses == ()
    assert parse_targets(["[::1]:8001"]).grpc_target == "ipv6:[::1]:8001"
    assert parse_targets(["dns:///svc:8001"]).grpc_target == "dns:///svc:8001"  # passed through


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:http", ":8001", ""])
def test_bad_targets_are_refused(bad: str) -> None:
    with pytest.raises(TargetError):
        parse_targets([bad])
