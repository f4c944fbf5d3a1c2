"""What `inferencefleet run` shows: the live worker table, and the log tail of failing workers."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from fleet_local.fleet import Fleet
from fleet_local.worker import Worker, tail

_STATE_STYLE = {
    "ready": "green",
    "starting": "yellow",
    "restarting": "yellow",
    "unresponsive": "red",
    "crash-looping": "bold red",
    "stopping": "dim",
}


def _number(value: float, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value * scale:.{digits}f}"


def worker_row(worker: Worker) -> list[str | Text]:
    plan = worker.plan
    return [
        plan.name,
        str(worker.pid or "-"),
        str(plan.port),
        plan.device,
        Text(worker.state, style=_STATE_STYLE.get(worker.state, "")),
        str(worker.restarts),
        _number(worker.rates.frames_per_s()),
        _number(worker.rates.p99_s(), 1000.0),
    ]


def fleet_table(fleet: Fleet) -> Table:
    table = Table(title=f"fleet {fleet.spec.name} · {fleet.spec.model.source}")
    for header in ("worker", "pid", "port", "device", "state", "restarts", "frames/s", "p99 ms"):
        table.add_column(header, justify="left" if header in ("worker", "state") else "right")
    for worker in fleet.ordered():
        table.add_row(*worker_row(worker))
    total = sum(
        w.rates.frames_per_s()
        for w in fleet.workers.values()
        if not math.isnan(w.rates.frames_per_s())
    )
    table.caption = f"total {total:.1f} frames/s · endpoints {','.join(fleet.endpoints())}"
    return table


def crash_logs(fleet: Fleet, lines: int = 8) -> list[RenderableType]:
    """The tail of each crash-looping worker's log: the reason is shown, not hidden."""
    out: list[RenderableType] = []
    for worker in fleet.ordered():
        if worker.state == "crash-looping":
            text = "\n".join(tail(worker.log_path, lines))
            out.append(
                Text(f"{worker.plan.name} is crash-looping; {worker.log_path}:", style="bold red")
            )
            out.append(Text(text, style="dim"))
    return out


def fleet_view(fleet: Fleet) -> Group:
    return Group(fleet_table(fleet), *crash_logs(fleet))


def state_line(worker: Worker) -> str:
    """One line per state change, for logs (when stdout is not a terminal)."""
    return (
        f"{worker.plan.name} pid {worker.pid or '-'} port {worker.plan.port} "
        f"{worker.plan.device}: {worker.state} (restarts {worker.restarts})"
    )
