"""The worker with NVIDIA's own clients: tritonclient.grpc and a short perf_analyzer run, each in
its own process (see triton_probe.py for why)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_server.runner import ModelRunner

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
VENV = Path(sys.prefix)  # the virtual environment (sys.executable may be a symlink out of it)
SITE = Path(np.__file__).resolve().parents[1]


def test_tritonclient_infers_and_reads_metadata(
    tiny_worker: Any, tiny_reference: ModelRunner
) -> None:
    probe = subprocess.run(
        [sys.executable, str(HERE / "triton_probe.py"), tiny_worker.target, "tiny", "32", "7"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    assert seen["metadata"]["inputs"] == [
        {"name": "frames", "datatype": "UINT8", "shape": ["-1", "32", "32", "3"]}
    ]
    assert seen["max_batch_size"] == 4
    assert seen["missing_model_status"] == "StatusCode.NOT_FOUND"
    frames = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expected = tiny_reference.infer([frames])
    np.testing.assert_allclose(np.array(seen["logits"]), expected, rtol=1e-4, atol=1e-5)


def _perf_analyzer() -> Path:
    for candidate in (VENV / "bin" / "perf_analyzer", SITE / "bin" / "perf_analyzer"):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"perf_analyzer is not in {VENV}/bin (tritonclient's wheel ships it)")


def test_perf_analyzer_measures_the_worker(tiny_worker: Any) -> None:
    cudart = SITE / "nvidia" / "cuda_runtime" / "lib"  # libcudart.so.12, loaded even on CPU
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    run = subprocess.run(
        [
            str(_perf_analyzer()), "-m", "tiny", "-i", "grpc", "-u", tiny_worker.target,
            "--concurrency-range", "2", "--measurement-interval", "1000",
            "--stability-percentage", "100", "--max-trials", "5",
        ],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", run.stdout)
    assert throughput is not None, run.stdout
    assert float(throughput.group(1)) > 0
    assert "Server:" in run.stdout  # server-side statistics from ModelStatistics
    assert re.search(r"Inference count: [1-9]", run.stdout), run.stdout
