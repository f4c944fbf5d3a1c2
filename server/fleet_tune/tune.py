"""`inferencefleet tune`: find the worker processes per GPU (per machine on the CPU), maxBatchSize
and maxQueueDelayMicroseconds that give the most frames/s within a p99 budget, by measuring real
workers, and print the result as a fleet.yaml fragment."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from fleet_client.argtypes import at_least_one, int_list, non_negative_seconds, positive_seconds
from fleet_client.targets import TargetError
from fleet_local.host import discover
from fleet_local.manifest import check_model_file, fleet_from_text, read_fleet
from fleet_local.plan import LocalHost, Options
from fleet_local.run import taken_ports
from fleet_spec.spec import API_VERSION, KIND, FleetSpec, FleetSpecError, parse_fleet
from rich.console import Console

from fleet_tune.measure import FleetBench, Setup, TuneError
from fleet_tune.report import (
    fragment_text,
    outcome_json,
    plot_outcome,
    result_json,
    trials_table,
)
from fleet_tune.search import (
    Config,
    Grid,
    Measurement,
    Outcome,
    Schedule,
    Search,
    SearchError,
)

ENV_PREFIX = "env:"
CPU_BATCHES = "1,2,4,8,16"
GPU_BATCHES = "1,2,4,8,16,32"
DELAYS_US = "0,250,1000,4000"
WATCH_INTERVAL_S = 0.05  # workers poll their batching file this often while tuned


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inferencefleet tune",
        description="Search worker processes per GPU (per machine on the CPU) x maxBatchSize x "
        "maxQueueDelayMicroseconds against real workers for the most frames/s within a p99 "
        "budget; prints every measurement, a plot and a fleet.yaml fragment.",
    )
    p.add_argument(
        "source",
        help="a fleet.yaml, a model source (builtin:tiny, a model file), or env:NAME: a fleet "
        "manifest (YAML or JSON) in the environment variable NAME",
    )
    add_search_arguments(p)
    return p


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """Everything but the source (bench/bench_tune.py takes the same)."""
    p.add_argument("--p99-ms", type=positive_seconds, default=100.0, help="p99 budget (ms)")
    p.add_argument(
        "--budget-s",
        type=positive_seconds,
        default=120.0,
        help="seconds of measuring, once the workers are up (default 120)",
    )
    p.add_argument("--workers", type=int_list, help="worker counts to try (default: by cores/GPU)")
    p.add_argument(
        "--batch-sizes", type=int_list, help=f"default {CPU_BATCHES} (GPU: {GPU_BATCHES})"
    )
    p.add_argument(
        "--delays-us", type=int_list, default=int_list(DELAYS_US), help=f"default {DELAYS_US}"
    )
    p.add_argument(
        "--concurrency", type=at_least_one, help="requests in flight (default 2 x workers x batch)"
    )
    p.add_argument("--first-window-s", type=positive_seconds, default=1.0, help="shortest window")
    p.add_argument(
        "--final-window-s", type=positive_seconds, default=4.0, help="the winner's window"
    )
    p.add_argument(
        "--warmup-s", type=non_negative_seconds, default=0.5, help="unmeasured load first"
    )
    p.add_argument(
        "--image-size", type=at_least_one, help="input height = width of a builtin model"
    )
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: ignore GPUs")
    p.add_argument("--port", type=int, default=18601, help="first gRPC port (then +1 per worker)")
    p.add_argument("--log-dir", type=Path, help="worker logs (default: a temp dir)")
    p.add_argument("--json-file", type=Path, help="write every measurement and the result here")
    p.add_argument("--plot", type=Path, help="write frames/s vs p99 per configuration (PNG)")
    p.add_argument(
        "--result-file",
        type=Path,
        help="write the recommendation alone as one line of JSON (at most 4 KiB: a Kubernetes "
        "termination message; the operator's tune Job passes /dev/termination-log)",
    )


def load_spec(source: str) -> FleetSpec:
    """A fleet.yaml, or a fleet around a bare model source (defaults for everything else)."""
    path = Path(source)
    if source.startswith(ENV_PREFIX):
        spec = fleet_from_env(source[len(ENV_PREFIX) :])
    elif path.suffix in (".yaml", ".yml"):
        spec = read_fleet(path)
    else:
        manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "tune"},
                    "spec": {"model": {"source": source}}}  # fmt: skip
        spec = parse_fleet(manifest)
    check_model_file(spec)
    return spec


def fleet_from_env(name: str) -> FleetSpec:
    """A fleet manifest held in an environment variable (how the operator's tune Job passes
    the fleet)."""
    text = os.environ.get(name)
    if not text:
        raise FleetSpecError([(f"${name}", "is not set (env: names a variable holding a fleet)")])
    return fleet_from_text(text, f"${name}")


def one_gpu(host: LocalHost, device: str) -> LocalHost:
    """The tuner measures one GPU (its answer is per GPU), or the CPU."""
    return LocalHost(host.cores, host.gpus[:1] if device != "cpu" else ())


def default_workers(host: LocalHost) -> list[int]:
    """GPU: 1, 2, 4 processes on the one GPU. CPU: 1, 2, 4 ... up to the cores."""
    if host.gpus:
        return [1, 2, 4]
    counts, n = [], 1
    while n <= max(1, host.cores):
        counts.append(n)
        n *= 2
    return counts


def make_setup(args: argparse.Namespace, spec: FleetSpec, host: LocalHost, grid: Grid) -> Setup:
    options = Options(
        port=args.port,
        metrics_port=0,
        device=args.device,
        image_size=args.image_size,
        grace_period_s=2.0,
        watch_interval_s=WATCH_INTERVAL_S,
    )
    return Setup(
        spec, host, options, max(grid.batch_sizes), args.concurrency, args.warmup_s,
    )  # fmt: skip


def make_grid(args: argparse.Namespace, host: LocalHost) -> Grid:
    batches = args.batch_sizes or int_list(GPU_BATCHES if host.gpus else CPU_BATCHES)
    return Grid.of(args.workers or default_workers(host), batches, args.delays_us)


def make_schedule(args: argparse.Namespace) -> Schedule:
    return Schedule(
        budget_s=args.budget_s,
        first_window_s=args.first_window_s,
        final_window_s=args.final_window_s,
        overhead_s=args.warmup_s + 0.3,
        p99_budget_ms=args.p99_ms,
    )


async def run_search(
    grid: Grid, schedule: Schedule, setup: Setup, run_dir: Path, console: Console
) -> tuple[Outcome, FleetBench]:
    """The search against real workers, one line per measurement as it goes."""
    bench = FleetBench(setup, grid.workers, run_dir, lambda _: None)  # fleet notices: in its log

    async def measure(config: Config, window_s: float) -> Measurement:
        m = await bench.measure(config, window_s)
        over = "" if m.within(schedule.p99_budget_ms) else "  (over budget)"
        console.print(
            f"  {config.label():<22} {window_s:>4g} s {m.frames_per_s:8.1f} frames/s  "
            f"p99 {m.p99_ms:7.1f} ms{over}",
            highlight=False,
        )
        return m

    try:
        await bench.start()
        console.print(
            f"{bench.worker_processes} workers ready in {bench.start_s:.0f} s; measuring",
            highlight=False,
        )
        outcome = await Search(grid, schedule, measure, time.monotonic).run()
    finally:
        await bench.close()
    return outcome, bench


def preflight(args: argparse.Namespace, grid: Grid) -> None:
    ports = list(range(args.port, args.port + max(grid.workers)))
    busy = taken_ports("127.0.0.1", ports)
    if busy:
        raise TuneError(f"port(s) {', '.join(map(str, busy))} in use; pick others with --port")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        spec = load_spec(args.source)
        host = one_gpu(discover(), args.device)
        grid = make_grid(args, host)
        schedule = make_schedule(args)
        preflight(args, grid)
    except FleetSpecError as exc:
        print(f"inferencefleet tune: {args.source}: {exc}", file=sys.stderr)
        return 2
    except (SearchError, TuneError) as exc:
        print(f"inferencefleet tune: {exc}", file=sys.stderr)
        return 2
    where = f"GPU 0 ({host.gpus[0].name})" if host.gpus else f"the CPU ({host.cores} cores)"
    console.print(
        f"tuning {spec.model.source} on {where}: {len(grid)} configurations "
        f"(workers {list(grid.workers)} x maxBatchSize {list(grid.batch_sizes)} x delay "
        f"{list(grid.delays_us)} us), p99 budget {args.p99_ms:g} ms, time budget "
        f"{args.budget_s:g} s",
        highlight=False,
    )
    run_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="inferencefleet-tune-"))
    setup = make_setup(args, spec, host, grid)
    try:
        outcome, bench = asyncio.run(run_search(grid, schedule, setup, run_dir, console))
    except (TuneError, TargetError) as exc:
        print(f"inferencefleet tune: {exc}", file=sys.stderr)
        return 1
    return show(args, spec, host, outcome, bench)


def show(
    args: argparse.Namespace, spec: FleetSpec, host: LocalHost, outcome: Outcome, bench: FleetBench
) -> int:
    out = Console() if Console().is_terminal else Console(width=160)
    title = f"inferencefleet tune · {spec.model.source} · p99 budget {args.p99_ms:g} ms"
    out.print(trials_table(outcome, args.p99_ms, title))
    out.print(
        f"{len(outcome.trials)} measurements in {outcome.elapsed_s:.0f} s, after "
        f"{bench.start_s:.0f} s starting {bench.worker_processes} workers",
        highlight=False,
    )
    if args.json_file is not None:
        args.json_file.parent.mkdir(parents=True, exist_ok=True)
        args.json_file.write_text(json.dumps(outcome_json(outcome, args.p99_ms), indent=2) + "\n")
    if args.plot is not None:
        plot_outcome(outcome, args.p99_ms, args.plot, title)
        out.print(f"plot: {args.plot}")
    winner, confirmed = outcome.winner, outcome.confirmed
    if winner is None or confirmed is None:
        return 1
    if not confirmed.within(args.p99_ms):
        met = any(t.measurement.within(args.p99_ms) for t in outcome.trials)
        why = (
            "it met the budget in shorter windows: the machine is noisy, try a longer "
            "--final-window-s"
            if met
            else "no configuration met it; the closest is shown"
        )
        out.print(f"[red]the winner's final window missed p99 <= {args.p99_ms:g} ms: {why}[/red]")
    print(fragment_text(spec, winner, confirmed, bool(host.gpus)), end="")
    if args.result_file is not None:
        document = result_json(spec, outcome, args.p99_ms, host)
        args.result_file.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    return 0 if confirmed.within(args.p99_ms) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
