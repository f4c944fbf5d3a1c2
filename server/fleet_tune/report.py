"""How a tuning run is shown: the table of every measurement, the plot, the fleet.yaml fragment
and the JSON document."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from fleet_local.plan import LocalHost
from fleet_spec.contract import BatchSettings
from fleet_spec.spec import FleetSpec
from rich.table import Table

from fleet_tune.measure import spec_for_workers
from fleet_tune.search import Config, Measurement, Outcome


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def trials_table(outcome: Outcome, p99_budget_ms: float, title: str) -> Table:
    table = Table(title=title)
    for header in ("#", "phase", "workers", "maxBatch", "delay us", "window s", "frames/s"):
        table.add_column(header, justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("in budget")
    for index, trial in enumerate(outcome.trials, 1):
        m, c = trial.measurement, trial.config
        table.add_row(
            str(index),
            trial.phase,
            str(c.workers),
            str(c.max_batch_size),
            str(c.max_queue_delay_us),
            f"{m.window_s:g}",
            f"{m.frames_per_s:.1f}",
            _ms(m.p99_ms),
            str(m.errors),
            "yes" if m.within(p99_budget_ms) else "no",
            style="bold" if trial.phase == "confirm" else None,
        )
    return table


def fragment(spec: FleetSpec, config: Config, on_gpu: bool) -> dict[str, Any]:
    """The fleet.yaml lines the result changes (merge them into spec:)."""
    queue = max(spec.batching.max_queue_size, config.max_batch_size)
    batching = BatchSettings(config.max_batch_size, config.max_queue_delay_us, queue)
    body: dict[str, Any] = {"batching": batching.to_mapping()}
    if on_gpu:
        gpu = spec_for_workers(spec, config.workers, batching).gpu
        body["gpu"] = {"sharing": gpu.sharing, "workersPerGPU": gpu.workers_per_gpu}
    else:  # on one machine without a GPU, `inferencefleet run` starts replicas x processes
        body["replicas"] = config.workers
        body["processesPerPod"] = 1
    return {"spec": body}


def fragment_text(spec: FleetSpec, config: Config, measured: Measurement, on_gpu: bool) -> str:
    where = "per GPU" if on_gpu else "on this machine (no GPU: replicas = worker processes)"
    head = (
        f"# inferencefleet tune: {measured.frames_per_s:.1f} frames/s, p99 {_ms(measured.p99_ms)}"
        f" ms, {config.workers} worker(s) {where}\n"
    )
    return head + yaml.safe_dump(fragment(spec, config, on_gpu), sort_keys=False)


def outcome_json(outcome: Outcome, p99_budget_ms: float) -> dict[str, Any]:
    def measurement(m: Measurement) -> dict[str, Any]:
        return {
            "frames_per_s": round(m.frames_per_s, 2),
            "p99_ms": None if math.isnan(m.p99_ms) else round(m.p99_ms, 3),
            "errors": m.errors,
            "window_s": m.window_s,
            "within_budget": m.within(p99_budget_ms),
        }

    def config(c: Config) -> dict[str, int]:
        return {
            "workers": c.workers,
            "maxBatchSize": c.max_batch_size,
            "maxQueueDelayMicroseconds": c.max_queue_delay_us,
        }

    return {
        "p99_budget_ms": p99_budget_ms,
        "elapsed_s": round(outcome.elapsed_s, 2),
        "winner": None if outcome.winner is None else config(outcome.winner),
        "confirmed": None if outcome.confirmed is None else measurement(outcome.confirmed),
        "trials": [
            {"phase": t.phase, "started_s": round(t.started_s, 2), **config(t.config),
             **measurement(t.measurement)}
            for t in outcome.trials
        ],
    }  # fmt: skip


def result_json(
    spec: FleetSpec, outcome: Outcome, p99_budget_ms: float, host: LocalHost
) -> dict[str, Any]:
    """The recommendation alone, small enough for a termination message: the fragment's spec
    fields, the winner's confirming window, where it ran."""
    winner, confirmed = outcome.winner, outcome.confirmed
    if winner is None or confirmed is None:
        raise ValueError("no winner to report")
    return {
        "recommendation": fragment(spec, winner, bool(host.gpus))["spec"],
        "workers": winner.workers,
        "framesPerSecond": round(confirmed.frames_per_s, 1),
        "p99Ms": None if math.isnan(confirmed.p99_ms) else round(confirmed.p99_ms, 2),
        "p99BudgetMs": p99_budget_ms,
        "withinBudget": confirmed.within(p99_budget_ms),
        "measurements": len(outcome.trials),
        "seconds": round(outcome.elapsed_s, 1),
        "device": host.gpus[0].name if host.gpus else f"cpu ({host.cores} cores)",
    }


def plot_outcome(outcome: Outcome, p99_budget_ms: float, path: Path, title: str) -> None:
    """frames/s against p99, one point per configuration (its longest window), the winner
    ringed and the budget drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = outcome.best_by_config(p99_budget_ms)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for workers in sorted({c.workers for c in points}):
        mine = [(m.p99_ms, m.frames_per_s) for c, m in points.items() if c.workers == workers]
        mine = [p for p in mine if not math.isnan(p[0])]
        ax.scatter([p[0] for p in mine], [p[1] for p in mine], label=f"{workers} worker(s)")
    if outcome.winner is not None and outcome.confirmed is not None:
        won = outcome.confirmed
        ax.scatter([won.p99_ms], [won.frames_per_s], s=180, facecolors="none", edgecolors="k")
        ax.annotate(outcome.winner.label(), (won.p99_ms, won.frames_per_s),
                    textcoords="offset points", xytext=(8, 6))  # fmt: skip
    if math.isfinite(p99_budget_ms):
        ax.axvline(p99_budget_ms, linestyle="--", color="grey", label="p99 budget")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (frames/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
