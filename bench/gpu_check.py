"""`make gpu-check`: everything this project can only check on an NVIDIA GPU, in one run of a few
minutes, with one table and one JSON file.

1. the CUDA tests (pytest -m gpu: device choice, fp16/bf16, the GPU memory gauge,
   CUDA_VISIBLE_DEVICES placement, copy stream and CUDA graphs against the plain path);
2. raw frames/s of builtin:resnet18 in-process at batch 1, 8 and 32, fp32 and fp16 (a helper
   process; with and without CUDA graphs at fp16);
3. served vs raw: one worker at maxBatchSize 32 under 64 requests in flight;
4. 1, 2 and 4 worker processes on the one GPU (time-sliced), maxBatchSize 16 each;
5. `inferencefleet tune` on the same workers, with its time budget.
Workers are started as `inferencefleet tune` starts them (fleet_local), once, and reused.

Without a GPU it says so and stops (exit 0). `--cpu-dry-run` runs every step on the CPU with the
tiny model, small frames and short windows: the figures mean nothing, the plumbing is proven.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "operator")]

from fleet_local.host import discover  # noqa: E402
from fleet_local.plan import Options  # noqa: E402
from fleet_spec.spec import API_VERSION, KIND, parse_fleet  # noqa: E402
from fleet_tune.measure import FleetBench, Setup  # noqa: E402
from fleet_tune.search import Config, Grid, Measurement, Schedule, Search  # noqa: E402
from fleet_tune.tune import one_gpu  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """Sizes of one check run: the real one on a GPU, or the CPU dry run."""

    model: str
    image_size: int
    device: str  # "auto" (the GPU) or "cpu"
    precisions: tuple[str, ...]
    raw_batches: tuple[int, ...]
    raw_seconds: float
    window_s: float
    workers: tuple[int, ...]
    per_worker_batch: int
    served_batch: int
    tune_grid: Grid
    tune_budget_s: float


GPU_PLAN = Plan(
    model="builtin:resnet18", image_size=224, device="auto", precisions=("fp32", "fp16"),
    raw_batches=(1, 8, 32), raw_seconds=2.0, window_s=5.0, workers=(1, 2, 4),
    per_worker_batch=16, served_batch=32,
    tune_grid=Grid.of([1, 2, 4], [1, 2, 4, 8, 16, 32], [0, 500, 2000]), tune_budget_s=90.0,
)  # fmt: skip
DRY_PLAN = Plan(
    model="builtin:tiny", image_size=32, device="cpu", precisions=("fp32",),
    raw_batches=(1, 8, 32), raw_seconds=0.3, window_s=0.5, workers=(1, 2),
    per_worker_batch=4, served_batch=8,
    tune_grid=Grid.of([1, 2], [1, 4, 8], [0, 500]), tune_budget_s=5.0,
)  # fmt: skip


def raw_helper(args: argparse.Namespace) -> int:
    """In a process of its own: the runner in a loop, one JSON line per (precision, batch)."""
    import numpy as np
    import torch
    from fleet_server.models import load_model
    from fleet_server.runner import ModelRunner, resolve_device, resolve_dtype

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # as a lone worker gets them
    torch.set_num_interop_threads(1)
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)
    variants = [(p, False) for p in args.precisions.split(",")]
    if device.type == "cuda":
        variants.append(("fp16", True))
    for precision, graphs in variants:
        runner = ModelRunner(
            load_model(args.model), device=device, dtype=resolve_dtype(precision, device),
            image_size=args.image_size, cuda_graphs=graphs,
        )  # fmt: skip
        batches = [int(b) for b in args.batches.split(",")]
        runner.warm_up(max(batches))
        for batch in batches:
            size = args.image_size
            frames = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            count, began = 0, time.perf_counter()
            while time.perf_counter() - began < args.seconds or count < 3:
                runner.infer([frames])
                count += 1
            elapsed = time.perf_counter() - began
            line = {"precision": precision, "cuda_graphs": graphs, "batch": batch,
                    "frames_per_s": round(batch * count / elapsed, 1),
                    "ms_per_batch": round(1000 * elapsed / count, 3)}  # fmt: skip
            print(json.dumps(line), flush=True)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def run_cuda_tests(results: dict[str, Any], timeout_s: float) -> None:
    report = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "junit.xml"
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
         f"--junitxml={report}", "server/tests/test_gpu_cuda.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'operator'}"},
    )  # fmt: skip
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    results["cuda_tests"] = {**counts, "seconds": round(time.monotonic() - began, 1),
                             "exit_code": done.returncode, "tail": done.stdout[-1500:]}  # fmt: skip


def run_raw(plan: Plan, results: dict[str, Any], timeout_s: float) -> None:
    argv = [sys.executable, __file__, "--raw-helper", "--model", plan.model,
            "--image-size", str(plan.image_size), "--device", plan.device,
            "--precisions", ",".join(plan.precisions),
            "--batches", ",".join(map(str, plan.raw_batches)),
            "--seconds", str(plan.raw_seconds)]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # as `inferencefleet serve` runs
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, check=True, env=env
    )
    results["raw"] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def fleet_setup(plan: Plan, precision: str, port: int, largest_batch: int) -> Setup:
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "gpu-check"},
                "spec": {"model": {"source": plan.model, "precision": precision}}}  # fmt: skip
    host = one_gpu(discover(), plan.device)
    options = Options(
        port=port, metrics_port=0, device=plan.device, image_size=plan.image_size,
        grace_period_s=2.0, watch_interval_s=0.05,
    )  # fmt: skip
    return Setup(parse_fleet(manifest), host, options, largest_batch, warmup_s=1.0)


async def run_served(plan: Plan, results: dict[str, Any], port: int, run_dir: Path) -> None:
    """One set of workers (fp16 on the GPU): served vs raw, 1/2/4 processes, then tune."""
    precision = plan.precisions[-1]
    largest = max(max(plan.tune_grid.batch_sizes), plan.served_batch, plan.per_worker_batch)
    counts = sorted({*plan.workers, *plan.tune_grid.workers})
    setup = fleet_setup(plan, precision, port, largest)
    bench = FleetBench(setup, counts, run_dir, lambda _: None)
    try:
        await bench.start()
        results["workers_start_s"] = round(bench.start_s, 1)
        one = await bench.measure(Config(1, plan.served_batch, 2000), plan.window_s)
        results["served"] = {
            "precision": precision, "in_flight": 2 * plan.served_batch, **_figures(one),
            "max_batch_size": plan.served_batch,
        }  # fmt: skip
        results["processes"] = []
        for workers in plan.workers:
            m = await bench.measure(Config(workers, plan.per_worker_batch, 2000), plan.window_s)
            results["processes"].append(
                {"workers": workers, "max_batch_size": plan.per_worker_batch, **_figures(m)}
            )
        schedule = Schedule(budget_s=plan.tune_budget_s, first_window_s=plan.window_s / 4,
                            final_window_s=plan.window_s, overhead_s=1.3)  # fmt: skip
        outcome = await Search(plan.tune_grid, schedule, bench.measure, time.monotonic).run()
        if outcome.winner is None or outcome.confirmed is None:
            raise RuntimeError("tune chose no configuration")
        results["tune"] = {
            "winner": outcome.winner.label(), "measurements": len(outcome.trials),
            "seconds": round(outcome.elapsed_s, 1), **_figures(outcome.confirmed),
        }  # fmt: skip
    finally:
        await bench.close()


def _figures(m: Measurement) -> dict[str, Any]:
    return {"frames_per_s": round(m.frames_per_s, 1), "p99_ms": round(m.p99_ms, 2),
            "errors": m.errors}  # fmt: skip


def table(results: dict[str, Any]) -> str:
    lines = [f"{'check':<44} {'result':>34}"]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<44} {value:>34}")

    tests = results.get("cuda_tests")
    if tests:
        bad = tests["failures"] + tests["errors"]
        passed = tests["tests"] - bad - tests["skipped"]
        row(
            "CUDA tests (pytest -m gpu)",
            f"{passed} passed, {bad} failed, {tests['skipped']} skipped",
        )
    raw = {(r["precision"], r["cuda_graphs"], r["batch"]): r for r in results.get("raw", [])}
    for (precision, graphs, batch), r in sorted(raw.items()):
        name = f"raw {precision}{' + CUDA graphs' if graphs else ''} batch {batch}"
        row(name, f"{r['frames_per_s']:.1f} frames/s")
    served = results.get("served")
    if served:
        same = [
            r["frames_per_s"] for (p, g, _), r in raw.items() if p == served["precision"] and not g
        ]
        best_raw = max(same, default=0.0)
        ratio = served["frames_per_s"] / best_raw if best_raw else float("nan")
        row(f"served 1 worker {served['precision']} b{served['max_batch_size']}",
            f"{served['frames_per_s']:.1f} frames/s, p99 {served['p99_ms']:.1f} ms")  # fmt: skip
        row("served/raw (best raw batch, same precision)", f"{ratio:.2f}")
    for p in results.get("processes", []):
        row(f"{p['workers']} worker process(es) on one GPU, b{p['max_batch_size']}",
            f"{p['frames_per_s']:.1f} frames/s, p99 {p['p99_ms']:.1f} ms")  # fmt: skip
    tune = results.get("tune")
    if tune:
        row(f"tune ({tune['measurements']} measurements, {tune['seconds']:.0f} s)",
            f"{tune['winner']}: {tune['frames_per_s']:.1f} frames/s")  # fmt: skip
    row("total time", f"{results.get('seconds', 0):.0f} s")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU, tiny sizes")
    p.add_argument("--json", type=Path, default=ROOT / "out" / "gpu_check.json")
    p.add_argument("--port", type=int, default=18801)
    p.add_argument("--raw-helper", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model", "--device", "--precisions", "--batches"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_helper:
        return raw_helper(args)
    began = time.monotonic()
    host = discover()
    gpus = [f"{g.index}: {g.name} ({g.memory_mib} MiB)" for g in host.gpus]
    results: dict[str, Any] = {"gpus": gpus, "cores": host.cores, "dry_run": args.cpu_dry_run}
    if not args.cpu_dry_run and not host.gpus:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi lists none); nothing to check. "
              "`--cpu-dry-run` runs every step on the CPU to prove the script itself.")  # fmt: skip
        return 0
    plan = DRY_PLAN if args.cpu_dry_run else GPU_PLAN
    smi = shutil.which("nvidia-smi")
    what = "CPU dry run (figures mean nothing)" if args.cpu_dry_run else ", ".join(gpus)
    print(f"gpu-check: {what}; nvidia-smi {'at ' + smi if smi else 'absent'}", flush=True)
    steps = [
        ("CUDA tests", lambda: run_cuda_tests(results, timeout_s=240)),
        ("raw frames/s", lambda: run_raw(plan, results, timeout_s=120)),
        ("served, processes, tune", lambda: asyncio.run(
            run_served(plan, results, args.port, Path(tempfile.mkdtemp(prefix="gpu-check-"))))),
    ]  # fmt: skip
    failed = False
    for name, step in steps:
        t0 = time.monotonic()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            step()
        except Exception as exc:  # a failed step is reported; the others still run
            failed = True
            results.setdefault("failures", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"gpu-check: {name} FAILED: {exc}", flush=True)
        print(f"gpu-check: {name} took {time.monotonic() - t0:.0f} s", flush=True)
    results["seconds"] = round(time.monotonic() - began, 1)
    print()
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    tests = results.get("cuda_tests", {})
    return 1 if failed or tests.get("failures") or tests.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
