"""The CUDA path, on a machine with an NVIDIA GPU (skipped, with the reason, where there is none):
device choice, fp16/bf16, the GPU memory gauge, CUDA_VISIBLE_DEVICES placement of local workers,
and the optional copy stream and CUDA graphs giving the same logits as the plain path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fleet_local.host import discover
from fleet_local.plan import Options, plan_workers
from fleet_server.models import load_model
from fleet_server.runner import ModelRunner, resolve_device, resolve_dtype
from fleet_spec.spec import API_VERSION, KIND, parse_fleet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs an NVIDIA GPU: torch.cuda.is_available() is False on this machine",
    ),
]
Frames = Callable[..., npt.NDArray[np.uint8]]
SIZE = 64


def cuda_runner(source: str, precision: str = "fp32", **flags: bool) -> ModelRunner:
    device = torch.device("cuda", 0)
    return ModelRunner(
        load_model(source),
        device=device,
        dtype=resolve_dtype(precision, device),
        image_size=SIZE,
        **flags,
    )


def test_auto_picks_cuda_and_the_worker_index_picks_the_gpu() -> None:
    count = torch.cuda.device_count()
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", worker_index=count) == torch.device("cuda", 0)
    assert resolve_device("auto", worker_index=count + 1).index == 1 % count
    assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_agree_with_fp32(precision: str, frames: Frames) -> None:
    x = frames(4, seed=7, size=SIZE)
    full = cuda_runner("builtin:resnet18").infer([x])
    half = cuda_runner("builtin:resnet18", precision).infer([x])
    assert half.dtype == np.float32
    assert half.shape == full.shape == (4, 1000)
    # logits of a random-weight network: same ranking of the top class, close values
    assert (half.argmax(1) == full.argmax(1)).mean() >= 0.75
    np.testing.assert_allclose(half, full, rtol=0.1, atol=0.1 * float(np.abs(full).max()))


def test_gpu_memory_gauge_reports_the_models_memory(start_worker: Callable[..., Any]) -> None:
    runner = cuda_runner("builtin:resnet18")
    allocated = runner.gpu_memory_allocated()
    assert allocated is not None
    assert allocated > 40 * 2**20  # ResNet-18's fp32 weights alone are ~45 MB
    worker = start_worker("--model", "builtin:resnet18", "--device", "cuda", "--image-size", "64")
    port = worker.metrics_port
    deadline = time.monotonic() + 30
    pattern = re.compile(r"^inferencefleet_gpu_memory_allocated_bytes\{[^}]*\} (\S+)$", re.M)
    value = 0.0
    while time.monotonic() < deadline and value <= 0:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            found = pattern.search(reply.read().decode())
        value = float(found.group(1)) if found else 0.0
        time.sleep(0.5)
    assert value > 40 * 2**20


def test_local_workers_each_see_only_their_gpu(tmp_path: Path) -> None:
    """`inferencefleet run` hands every worker CUDA_VISIBLE_DEVICES=<its GPU>: torch in that
    process sees exactly that one GPU, by the name nvidia-smi gives it."""
    host = discover()
    assert host.gpus, "nvidia-smi lists no GPU although torch sees CUDA"
    replicas = 2 * len(host.gpus)
    manifest = {"replicas": replicas, "model": {"source": "builtin:tiny"}}
    spec = parse_fleet(
        {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "p"}, "spec": manifest}
    )
    plans = plan_workers(spec, host, Options(), tmp_path / "batching.json")
    probe = (
        "import json, torch; "
        "print(json.dumps([torch.cuda.device_count(), torch.cuda.get_device_name(0)]))"
    )
    for plan in plans:
        env = {**os.environ, **dict(plan.env)}
        gpu = host.gpus[plan.replica % len(host.gpus)]
        assert env["CUDA_VISIBLE_DEVICES"] == str(gpu.index)
        assert plan.device == f"cuda:{gpu.index}"
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              text=True, timeout=120, check=True)  # fmt: skip
        count, name = json.loads(done.stdout)
        assert count == 1
        assert name == gpu.name


@pytest.mark.parametrize(
    "flags",
    [{"copy_stream": True}, {"cuda_graphs": True}, {"copy_stream": True, "cuda_graphs": True}],
)
def test_copy_stream_and_cuda_graphs_give_the_plain_paths_logits(
    flags: dict[str, bool], frames: Frames
) -> None:
    plain = cuda_runner("builtin:resnet18")
    plain.warm_up(4)
    fast = cuda_runner("builtin:resnet18", **flags)
    fast.warm_up(4)
    for batch in (1, 3, 4):
        for seed in range(3):  # a replayed graph must not keep the previous batch's frames
            x = frames(batch, seed=seed, size=SIZE)
            np.testing.assert_allclose(fast.infer([x]), plain.infer([x]), rtol=1e-3, atol=1e-3)
    if flags.get("cuda_graphs"):
        assert fast.graph_batch_sizes == [1, 2, 3, 4]
