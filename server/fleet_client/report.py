"""How a benchmark sweep is shown: the result table, the JSON document and the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from fleet_client.results import StepResult


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) or "0"


def _share_text(shares: dict[str, float]) -> str:
    """'8001 50% · 8002 50%' when every target is on one host, else full addresses."""
    hosts = {address.rpartition(":")[0] for address in shares}
    short = len(hosts) == 1
    return (
        " · ".join(
            f"{address.rpartition(':')[2] if short else address} {100 * share:.0f}%"
            for address, share in shares.items()
        )
        or "-"
    )


def result_table(steps: Sequence[StepResult], title: str) -> Table:
    table = Table(title=title)
    for header in ("concurrency", "frames/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(header, justify="right")
    table.add_column("errors")
    table.add_column("share per target")
    table.add_column("client CPU", justify="right")
    for step in steps:
        table.add_row(
            str(step.concurrency),
            f"{step.frames_per_s:.1f}",
            _ms(step.latency_ms(0.50)),
            _ms(step.latency_ms(0.90)),
            _ms(step.latency_ms(0.99)),
            _errors_text(step.errors),
            _share_text(step.shares()),
            f"{step.client_cpu_percent:.0f}%",
        )
    return table


def best_step(steps: Sequence[StepResult]) -> StepResult | None:
    """The step with the most frames/s (None when nothing succeeded)."""
    useful = [step for step in steps if step.requests]
    return max(useful, key=lambda step: step.frames_per_s) if useful else None


def sweep_json(meta: dict[str, Any], steps: Sequence[StepResult]) -> dict[str, Any]:
    best = best_step(steps)
    return {
        **meta,
        "steps": [step.to_json() for step in steps],
        "best": None if best is None else best.to_json(),
    }


def plot_sweep(steps: Sequence[StepResult], path: Path, title: str) -> None:
    """Throughput against p99 latency, one point per concurrency step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = [(step.latency_ms(0.99), step.frames_per_s, step.concurrency) for step in steps]
    points = [p for p in points if not math.isnan(p[0])]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for p99, fps, concurrency in points:
        ax.annotate(f"c={concurrency}", (p99, fps), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (frames/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if points:  # room for the labels
        ax.set_xlim(0, 1.2 * max(p[0] for p in points))
        ax.set_ylim(0, 1.15 * max(p[1] for p in points))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
