"""One worker at batch 1 vs the example fleet's configurations (workers x batch) on this machine.

For each configuration `inferencefleet run` starts examples/fleet.yaml with spec.replicas =
workers and spec.batching.maxBatchSize = batch (threads per worker sized from the cores, as
`run` does), and `inferencefleet bench`, a separate process, sweeps concurrency W*B and 2*W*B
(1 and 2 for batch 1); a configuration's best step counts. Prints a table, the baseline
(1 worker, batch 1), the best configuration, and `best/baseline ratio`. Timing lives here,
never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fleet.yaml"


def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in text.split(","):
        workers, _, batch = item.strip().partition("x")
        configs.append((int(workers), int(batch)))
    return configs


def fleet_file(folder: Path, workers: int, batch: int) -> Path:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["replicas"] = workers
    manifest["spec"]["batching"]["maxBatchSize"] = batch
    manifest["spec"]["batching"]["maxQueueSize"] = max(64, 4 * batch * workers)
    path = folder / f"fleet-{workers}x{batch}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "inferencefleet.cli", *args]


def measure(args: argparse.Namespace, workers: int, batch: int, folder: Path) -> dict[str, Any]:
    """Start the fleet, sweep it, stop it; the sweep's JSON plus what `run` said."""
    ready = folder / f"ready-{workers}x{batch}"
    run_argv = cli(
        "run", str(fleet_file(folder, workers, batch)), "--no-table",
        "--port", str(args.port), "--metrics-port", str(args.port + 1000),
        "--ready-file", str(ready), "--log-dir", str(folder / f"logs-{workers}x{batch}"),
    )  # fmt: skip
    if args.model:
        run_argv += ["--model", args.model]
    if args.image_size:
        run_argv += ["--image-size", str(args.image_size)]
    output = folder / f"run-{workers}x{batch}.out"
    with output.open("w") as out:
        fleet = subprocess.Popen(run_argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + args.start_timeout
        while not ready.exists():
            if fleet.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fleet {workers}x{batch} did not start:\n{output.read_text()}")
            time.sleep(0.5)
        model = args.model or yaml.safe_load(EXAMPLE.read_text())["spec"]["model"]["source"]
        sweep = sorted({workers * batch, 2 * workers * batch})
        result_file = folder / f"bench-{workers}x{batch}.json"
        subprocess.run(
            cli(
                "bench", ready.read_text().strip(), "--model", model.removeprefix("builtin:"),
                "--concurrency", ",".join(map(str, sweep)), "--duration", str(args.duration),
                "--warmup", str(args.warmup), "--quiet", "--json-file", str(result_file),
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(result_file.read_text())
    finally:
        fleet.send_signal(signal.SIGINT)
        fleet.wait(timeout=120)
    notice = output.read_text().splitlines()[0]
    threads = re.search(r"(\d+) (?:torch|CPU) thread", notice)
    return {
        **result,
        "workers": workers,
        "batch": batch,  # the workers' maxBatchSize (every request carries one frame)
        "threads_per_worker": int(threads.group(1)) if threads else None,
        "placement": notice,
    }


def row(result: dict[str, Any]) -> str:
    best = result["best"]
    return (
        f"{result['workers']:>7} {result['batch']:>5} {result['threads_per_worker']:>7} "
        f"{best['concurrency']:>11} "
        f"{best['frames_per_s']:>9.1f} {best['latency_ms']['p99']:>8.1f} "
        f"{best['client_cpu_percent']:>9.0f}%"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="override spec.model.source (default: the example's)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--configs", default="1x1,1x8,2x1,2x4,2x8", help="workers x batch, ...")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--port", type=int, default=18501)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=ROOT / "out" / "bench_local.json")
    args = parser.parse_args()

    configs = parse_configs(args.configs)
    if (1, 1) not in configs:
        configs.insert(0, (1, 1))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-local-") as tmp:
        for workers, batch in configs:
            print(f"measuring {workers} worker(s) x batch {batch} ...", flush=True)
            results.append(measure(args, workers, batch, Path(tmp)))
    print(f"\nmachine: {len(os.sched_getaffinity(0))} CPU cores; model {results[-1]['model']}")
    print(
        f"{'workers':>7} {'batch':>5} {'threads':>7} {'concurrency':>11} {'frames/s':>9} "
        f"{'p99 ms':>8} {'client CPU':>10}"
    )
    for result in results:
        print(row(result))
    baseline = next(r for r in results if (r["workers"], r["batch"]) == (1, 1))
    best = max(results, key=lambda r: r["best"]["frames_per_s"])
    base_fps, best_fps = baseline["best"]["frames_per_s"], best["best"]["frames_per_s"]
    print(
        f"\nbaseline 1 worker x batch 1: {base_fps:.1f} frames/s, "
        f"p99 {baseline['best']['latency_ms']['p99']:.1f} ms"
    )
    print(
        f"best {best['workers']} worker(s) x batch {best['batch']}: {best_fps:.1f} frames/s, "
        f"p99 {best['best']['latency_ms']['p99']:.1f} ms"
    )
    print(f"best/baseline ratio: {best_fps / base_fps:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
