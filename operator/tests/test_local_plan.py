"""The local runtime's pure parts: worker plan, thread sizing, capacity refusal, metrics maths."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from fleet_local.host import parse_nvidia_smi
from fleet_local.manifest import read_fleet
from fleet_local.plan import (
    LocalGpu,
    LocalHost,
    Options,
    local_capacity,
    placement,
    plan_workers,
    same_process,
)
from fleet_local.run import RefusedError, preflight
from fleet_local.run import main as run_main
from fleet_local.scrape import Rates, histogram_quantile, parse_metrics
from fleet_local.worker import dial_address
from fleet_spec.contract import WorkerSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"
CPU_HOST = LocalHost(cores=2)
ADA = LocalGpu(0, "NVIDIA RTX 6000 Ada Generation", 49140)
TWO_ADA = LocalHost(cores=16, gpus=(ADA, replace(ADA, index=1)))
BATCHING = Path("/run/batching.json")


def _env(plan_env: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(plan_env)


def test_example_fleet_on_two_cpu_cores() -> None:
    spec = read_fleet(EXAMPLE)
    plans = plan_workers(spec, CPU_HOST, Options(), BATCHING)
    assert [(p.name, p.port, p.metrics_port, p.device, p.threads) for p in plans] == [
        ("w0", 8001, 9001, "cpu", 1),
        ("w1", 8002, 9002, "cpu", 1),
    ]
    assert plans[0].argv[1:4] == ("-m", "inferencefleet.cli", "serve")
    serve = WorkerSettings.from_argv(list(plans[0].argv[4:]))  # what the worker will parse
    assert serve == plans[0].settings
    assert (serve.model, serve.served_name, serve.workers) == ("builtin:resnet18", "resnet18", 1)
    assert (serve.host, serve.port, serve.threads) == ("127.0.0.1", 8001, 1)
    assert serve.batching_config == BATCHING
    assert _env(plans[0].env)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert _env(plans[0].env)["CUDA_VISIBLE_DEVICES"] == ""
    notice = placement(spec, CPU_HOST, Options()).notice
    assert notice.startswith("no GPU found: running 2 workers on the CPU")


def test_one_worker_gets_every_core_and_overrides_win() -> None:
    spec = replace(read_fleet(EXAMPLE), replicas=1)
    assert plan_workers(spec, CPU_HOST, Options(), BATCHING)[0].threads == 2
    many = replace(spec, replicas=3)
    assert placement(many, CPU_HOST, Options()).notice.endswith(
        "3 workers oversubscribe 2 cores, expect less than 3x the frames/s of one"
    )
    plan = plan_workers(spec, CPU_HOST, Options(threads=1, image_size=64, port=7000), BATCHING)[0]
    assert (plan.threads, plan.port) == (1, 7000)
    no_metrics = plan_workers(
        replace(spec, replicas=2), CPU_HOST, Options(metrics_port=0), BATCHING
    )
    assert [p.metrics_port for p in no_metrics] == [0, 0]
    assert WorkerSettings.from_argv(list(plan.argv[4:])).image_size == 64


def test_replicas_go_round_the_gpus_and_share_one_per_pod() -> None:
    spec = replace(read_fleet(EXAMPLE), replicas=3, processes_per_pod=2)
    plans = plan_workers(spec, TWO_ADA, Options(), BATCHING)
    assert [(p.replica, p.device) for p in plans] == [
        (0, "cuda:0"), (0, "cuda:0"), (1, "cuda:1"), (1, "cuda:1"), (2, "cuda:0"), (2, "cuda:0"),
    ]  # fmt: skip
    assert [_env(p.env)["CUDA_VISIBLE_DEVICES"] for p in plans[:3]] == ["0", "0", "1"]
    assert WorkerSettings.from_argv(list(plans[0].argv[4:])).device == "cuda"
    assert [p.port for p in plans] == list(range(8001, 8007))
    assert not placement(spec, TWO_ADA, Options(device="cpu")).on_gpu


def test_capacity_refuses_with_numbers() -> None:
    spec = read_fleet(EXAMPLE)  # 2 replicas, 4 per GPU, 2048 MiB each
    assert local_capacity(spec, TWO_ADA).fits
    too_many = replace(spec, replicas=9)
    capacity = local_capacity(too_many, TWO_ADA)
    assert not capacity.fits
    assert "needs 9 GPU slots" in capacity.message()
    assert "short by 1 slots" in capacity.message()
    small = LocalHost(cores=4, gpus=(LocalGpu(0, "small", 4096),))
    assert local_capacity(spec, small).hosts_too_small == ("local",)
    assert "4096 MiB < 8192 MiB" in local_capacity(spec, small).message()


def test_preflight_refuses_a_fleet_the_gpus_cannot_hold() -> None:
    spec = replace(read_fleet(EXAMPLE), replicas=9)
    with pytest.raises(RefusedError, match=r"needs 9 GPU slots .* 8 slots available"):
        preflight(spec, TWO_ADA, Options())
    small = LocalHost(cores=4, gpus=(LocalGpu(0, "small", 4096),))
    with pytest.raises(RefusedError, match=r"4096 MiB < 8192 MiB"):
        preflight(read_fleet(EXAMPLE), small, Options())


def test_scaling_keeps_workers_whose_only_change_is_threads() -> None:
    spec = read_fleet(EXAMPLE)
    three = plan_workers(replace(spec, replicas=3), CPU_HOST, Options(), BATCHING)
    one = plan_workers(replace(spec, replicas=1), CPU_HOST, Options(), BATCHING)
    assert (three[0].threads, one[0].threads) == (1, 2)
    assert same_process(three[0], one[0])
    tiny = plan_workers(spec, CPU_HOST, Options(image_size=32), BATCHING)
    assert not same_process(three[0], tiny[0])


def test_invalid_fleet_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["batching"]["maxBatchSize"] = 0
    bad = tmp_path / "fleet.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    assert run_main([str(bad)]) == 2
    assert "spec.batching.maxBatchSize" in capsys.readouterr().err


def test_missing_model_file_is_refused_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main([str(EXAMPLE), "--model", str(tmp_path / "absent.pt")]) == 2
    assert "spec.model.source" in capsys.readouterr().err


def test_nvidia_smi_lines() -> None:
    text = "0, NVIDIA RTX 6000 Ada Generation, 49140\n1, NVIDIA RTX PRO 6000, [N/A]\n\n"
    assert parse_nvidia_smi(text) == (
        LocalGpu(0, "NVIDIA RTX 6000 Ada Generation", 49140),
        LocalGpu(1, "NVIDIA RTX PRO 6000", None),
    )


METRICS = """\
# TYPE inferencefleet_frames_total counter
inferencefleet_frames_total{{model="tiny"}} {frames}
# TYPE inferencefleet_request_duration_seconds histogram
inferencefleet_request_duration_seconds_bucket{{le="0.01",model="tiny"}} {fast}
inferencefleet_request_duration_seconds_bucket{{le="0.1",model="tiny"}} {total}
inferencefleet_request_duration_seconds_bucket{{le="+Inf",model="tiny"}} {total}
inferencefleet_request_duration_seconds_count{{model="tiny"}} {total}
inferencefleet_request_duration_seconds_sum{{model="tiny"}} 1.0
"""


def test_rates_from_two_scrapes() -> None:
    rates = Rates(window_s=5.0)
    assert math.isnan(rates.frames_per_s())
    rates.add(parse_metrics(METRICS.format(frames=100, fast=100, total=100), at=10.0))
    rates.add(parse_metrics(METRICS.format(frames=300, fast=150, total=200), at=12.0))
    assert rates.frames_per_s() == pytest.approx(100.0)
    # 100 new requests: 50 under 10 ms, 50 between 10 and 100 ms -> p99 at 98.2 ms
    assert rates.p99_s() == pytest.approx(0.01 + 0.09 * (99 - 50) / 50)
    rates.add(parse_metrics(METRICS.format(frames=5, fast=5, total=5), at=13.0))
    assert math.isnan(rates.frames_per_s())  # the worker restarted: counters began again


def test_histogram_quantile_edges() -> None:
    assert math.isnan(histogram_quantile(0.99, ()))
    assert histogram_quantile(0.5, ((0.1, 10.0), (math.inf, 10.0))) == pytest.approx(0.05)
    assert histogram_quantile(0.99, ((0.1, 0.0), (math.inf, 4.0))) == 0.1
    # 10 requests <= 0.1 s, 10 more <= 1 s: the 15th lies halfway through the second bucket
    buckets = ((0.1, 10.0), (1.0, 20.0), (math.inf, 20.0))
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.55)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1:8001"),
        ("198.18.0.7", "198.18.0.7:8001"),
        ("::1", "[::1]:8001"),
        ("0.0.0.0", "127.0.0.1:8001"),
        ("::", "127.0.0.1:8001"),
    ],
)
def test_workers_are_health_checked_where_they_listen(host: str, address: str) -> None:
    spec = replace(read_fleet(EXAMPLE), replicas=1)
    plan = plan_workers(spec, CPU_HOST, Options(host=host), BATCHING)[0]
    assert plan.settings.host == host
    assert dial_address(plan.settings.host, plan.port) == address
