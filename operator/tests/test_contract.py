"""The worker contract: argv round trip, batching bounds held against the CRD, the served name,
CPU quota from cgroup files, and which runtimes each package pulls in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fleet_spec.contract import (
    BATCHING_KEYS,
    BatchSettings,
    SettingsError,
    WorkerSettings,
    served_model_name,
)
from fleet_spec.cpus import available_cpus, cgroup_cpu_limit
from fleet_spec.spec import openapi_schema
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]


@st.composite
def batch_settings(draw: st.DrawFn) -> BatchSettings:
    size = draw(st.integers(1, 256))
    return BatchSettings(
        max_batch_size=size,
        max_queue_delay_us=draw(st.integers(0, 1_000_000)),
        max_queue_size=draw(st.integers(size, 65_536)),
    )


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1)
flag_safe = text.filter(lambda s: not s.startswith("-"))  # a value argparse takes as a value

worker_settings = st.builds(
    WorkerSettings,
    model=flag_safe,
    model_name=st.none() | flag_safe,
    host=st.sampled_from(["::", "0.0.0.0", "127.0.0.1", "::1", "worker.local"]),
    port=st.integers(1, 65535),
    metrics_port=st.integers(0, 65535),
    workers=st.just(1) | st.integers(1, 64),
    device=st.sampled_from(["auto", "cpu", "cuda", "cuda:3"]),
    precision=st.sampled_from(["fp32", "fp16", "bf16"]),
    threads=st.none() | st.integers(1, 512),
    image_size=st.integers(8, 4096),
    batching=batch_settings(),
    batching_config=st.none() | flag_safe.map(Path),
    max_message_bytes=st.integers(1024, 2**31),
    max_concurrent_rpcs=st.integers(1, 100_000),
    grace_period_s=st.floats(0, 3600, allow_nan=False),
    watch_interval_s=st.floats(0.001, 60, allow_nan=False),
    worker_index=st.integers(0, 1000),
    reuse_port=st.booleans(),
)


@given(worker_settings)
def test_argv_round_trips(settings: WorkerSettings) -> None:
    assert WorkerSettings.from_argv(settings.to_argv()) == settings


def test_defaults_make_the_shortest_command_line() -> None:
    assert WorkerSettings(model="builtin:tiny").to_argv() == ["--model", "builtin:tiny"]
    argv = WorkerSettings(model="m.pt", workers=4, batching=BatchSettings(16, 2000, 64)).to_argv()
    assert argv == ["--model", "m.pt", "--workers", "4", "--max-batch-size", "16"]
    argv += ["--max-queue-delay-us", "0"]
    assert WorkerSettings.from_argv(argv).batching == BatchSettings(16, 0, 64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "2", "--port", "0"], "--workers: > 1 needs a fixed --port"),
        (["--precision", "fp8"], "--precision: must be one of"),
        (["--max-batch-size", "65"], "maxQueueSize: must be >= maxBatchSize (65)"),
        (["--max-batch-size", "0"], "maxBatchSize: must be between 1 and 256"),
        (["--threads", "0"], "--threads: must be >= 1"),
    ],
)
def test_bad_flags_exit_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        WorkerSettings.from_argv(["--model", "builtin:tiny", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_batching_bounds_and_defaults_are_the_crds() -> None:
    batching = openapi_schema()["properties"]["spec"]["properties"]["batching"]
    defaults = BatchSettings()
    for key, (name, low, high) in BATCHING_KEYS.items():
        field = batching["properties"][key]
        assert (field["minimum"], field["maximum"]) == (low, high), key
        assert field["default"] == getattr(defaults, name), key
    assert set(batching["properties"]) == set(BATCHING_KEYS)
    rules = [rule["rule"] for rule in batching.get("x-kubernetes-validations", [])]
    assert "self.maxQueueSize >= self.maxBatchSize" in rules  # enforced by BatchSettings too
    with pytest.raises(SettingsError, match="maxQueueSize: must be >= maxBatchSize"):
        BatchSettings(max_batch_size=8, max_queue_size=7)
    assert BatchSettings(max_batch_size=8, max_queue_size=8).max_queue_size == 8


def test_batching_mapping_round_trips() -> None:
    settings = BatchSettings(4, 500, 32)
    assert BatchSettings.from_mapping(settings.to_mapping()) == settings
    assert BatchSettings.from_mapping({"maxQueueSize": 9}, settings).max_queue_size == 9


@pytest.mark.parametrize(
    ("source", "name", "served"),
    [
        ("builtin:tiny", None, "tiny"),
        ("builtin:resnet18", "fast", "fast"),
        ("/models/detector.pt", None, "detector"),
        ("/models/detector.v2.pt2", "", "detector.v2"),
    ],
)
def test_served_model_name(source: str, name: str | None, served: str) -> None:
    assert served_model_name(source, name) == served
    assert WorkerSettings(model=source, model_name=name).served_name == served


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    (tmp_path / "proc").write_text(proc)
    return root, tmp_path / "proc"


@pytest.mark.parametrize(
    ("proc", "files", "limit"),
    [
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        # a parent's quota limits its children too; the smallest wins
        ("0::/pod/c\n", {"pod/cpu.max": "200000 100000", "pod/c/cpu.max": "max 100000"}, 2.0),
        (
            "4:cpu,cpuacct:/kubepods/pod1\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            3.0,
        ),
        (
            "1:cpu:/\n0::/\n",
            {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
            None,
        ),
        ("", {}, None),
    ],
)
def test_cpu_quota_from_cgroup_v1_and_v2(
    tmp_path: Path, proc: str, files: dict[str, str], limit: float | None
) -> None:
    root, proc_file = _cgroup(tmp_path, proc, files)
    assert cgroup_cpu_limit(root, proc_file) == limit
    cores = available_cpus(root, proc_file)
    assert 1 <= cores <= (int(limit) if limit else cores)


def test_a_half_cpu_quota_still_gives_one_thread(tmp_path: Path) -> None:
    root, proc_file = _cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000"})
    assert available_cpus(root, proc_file) == 1


def _imports(statement: str) -> set[str]:
    """Top-level modules loaded by `statement` in a fresh interpreter."""
    probe = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    env_path = f"{ROOT / 'server'}:{ROOT / 'operator'}"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    return {name.split(".")[0] for name in done.stdout.split()}


@pytest.mark.parametrize(
    ("statement", "forbidden"),
    [
        ("import fleet_spec.spec, fleet_spec.capacity, fleet_spec.contract", {"torch", "grpc"}),
        ("import fleet_local.run, fleet_local.fleet", {"torch", "kopf", "kubernetes"}),
        ("import fleet_proto.inference_pb2_grpc, fleet_proto.tensors", {"torch", "kopf"}),
        ("import fleet_client.bench, fleet_client.client", {"torch", "kopf", "kubernetes"}),
        ("import fleet_server.serve", {"torch", "kopf", "kubernetes"}),  # torch after prctl
        ("import fleet_server.worker", {"kopf", "kubernetes"}),
        ("import fleet_operator.render.deployment", {"torch", "grpc"}),
    ],
)
def test_each_package_loads_only_its_runtime(statement: str, forbidden: set[str]) -> None:
    loaded = _imports(statement)
    assert statement.split()[1].split(".")[0] in loaded  # the probe really imported it
    assert not loaded & forbidden
