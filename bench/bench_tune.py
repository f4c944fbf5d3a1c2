"""`inferencefleet tune` against an exhaustive sweep of the same grid, in one run, on one set of
workers.

The workers are started once (as `inferencefleet tune` starts them), then the sweep measures
every configuration of the grid with the tuner's final window, then the search runs with its
time budget. Prints both tables and:
  `tune/sweep ratio: X`  the frames/s tune reports for its winner (its final window) over the
                         sweep's best within the p99 budget;
  `pick/sweep ratio: X'` the sweep's own figure for tune's winner over the sweep's best (the
                         same comparison without the host's drift between the two phases);
  `time ratio: Y`        tune's measuring time over the sweep's (starting the workers, shared,
                         is in neither).
Timing lives here, never in tests. Goal: X >= 0.95, Y <= 0.25.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "operator")]

from fleet_client.argtypes import int_list  # noqa: E402
from fleet_local.host import discover  # noqa: E402
from fleet_tune.measure import FleetBench  # noqa: E402
from fleet_tune.report import outcome_json, trials_table  # noqa: E402
from fleet_tune.search import Search, sweep  # noqa: E402
from fleet_tune.tune import (  # noqa: E402
    add_search_arguments,
    load_spec,
    make_grid,
    make_schedule,
    make_setup,
    one_gpu,
)
from rich.console import Console  # noqa: E402


async def compare(args: argparse.Namespace) -> dict[str, object]:
    spec = load_spec(args.source)
    host = one_gpu(discover(), args.device)
    grid = make_grid(args, host)
    schedule = make_schedule(args)
    setup = make_setup(args, spec, host, grid)
    run_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    bench = FleetBench(setup, grid.workers, run_dir, lambda _: None)
    print(
        f"{len(grid)} configurations: workers {list(grid.workers)} x maxBatchSize "
        f"{list(grid.batch_sizes)} x delay {list(grid.delays_us)} us; p99 budget "
        f"{args.p99_ms:g} ms; tune budget {args.budget_s:g} s",
        flush=True,
    )
    try:
        await bench.start()
        print(f"{bench.worker_processes} workers ready in {bench.start_s:.0f} s", flush=True)
        began = time.monotonic()
        best, results = await sweep(grid, args.final_window_s, bench.measure, args.p99_ms)
        sweep_s = time.monotonic() - began
        print(f"sweep: {len(results)} measurements in {sweep_s:.0f} s", flush=True)
        outcome = await Search(grid, schedule, bench.measure, time.monotonic).run()
        print(f"tune: {len(outcome.trials)} measurements in {outcome.elapsed_s:.0f} s", flush=True)
    finally:
        await bench.close()
    console = Console(width=160)
    rows = sorted(results.items(), key=lambda item: -item[1].frames_per_s)
    print("\nsweep (best first):")
    for config, m in rows:
        mark = "" if m.within(args.p99_ms) else "  over budget"
        print(
            f"  {config.label():<22} {m.frames_per_s:8.1f} frames/s  p99 {m.p99_ms:7.1f} ms{mark}"
        )
    console.print(trials_table(outcome, args.p99_ms, "tune"))
    time_ratio = outcome.elapsed_s / sweep_s
    if best is None or outcome.winner is None or outcome.confirmed is None:
        print("no configuration met the p99 budget in the sweep: no tune/sweep ratio")
        print(f"time ratio: {time_ratio:.2f}")
        return {"sweep_s": round(sweep_s, 2), "time_ratio": round(time_ratio, 3)}
    sweep_best = results[best].frames_per_s
    tune_fps = outcome.confirmed.frames_per_s if outcome.confirmed.within(args.p99_ms) else 0.0
    pick = results[outcome.winner]
    pick_fps = pick.frames_per_s if pick.within(args.p99_ms) else 0.0
    print(f"\nsweep best: {best.label()} {sweep_best:.1f} frames/s")
    won = outcome.confirmed
    print(
        f"tune winner: {outcome.winner.label()} {won.frames_per_s:.1f} frames/s, p99 "
        f"{won.p99_ms:.1f} ms (the sweep measured it at {pick.frames_per_s:.1f})"
    )
    print(f"tune/sweep ratio: {tune_fps / sweep_best:.2f}")
    print(f"pick/sweep ratio: {pick_fps / sweep_best:.2f}")
    print(f"time ratio: {time_ratio:.2f}")
    return {
        "sweep_s": round(sweep_s, 2),
        "sweep_best": {"config": best.label(), "frames_per_s": round(sweep_best, 2)},
        "sweep": {c.label(): {"frames_per_s": m.frames_per_s, "p99_ms": m.p99_ms}
                  for c, m in results.items()},
        "tune": outcome_json(outcome, args.p99_ms),
        "tune_sweep_ratio": round(tune_fps / sweep_best, 3),
        "pick_sweep_ratio": round(pick_fps / sweep_best, 3),
        "time_ratio": round(time_ratio, 3),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="builtin:tiny", help="model source or fleet.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_tune.json")
    add_search_arguments(parser)
    parser.set_defaults(p99_ms=50.0, budget_s=60.0, workers=int_list("1,2,4"))
    args = parser.parse_args()
    document = asyncio.run(compare(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
