"""The running local fleet: its workers, the batching file they watch, scaling, and draining."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet_spec.contract import BatchSettings
from fleet_spec.spec import FleetSpec

from fleet_local.plan import LocalHost, Options, WorkerPlan, plan_workers, same_process
from fleet_local.worker import Policy, Worker

Say = Callable[[str], None]


def write_atomically(path: Path, text: str) -> None:
    """Readers of `path` see the old content or the new, never half of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


class Fleet:
    """Workers of one fleet spec on this machine, supervised."""

    def __init__(
        self, spec: FleetSpec, host: LocalHost, options: Options, run_dir: Path, policy: Policy,
        say: Say,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.host = host
        self.options = options
        self.run_dir = run_dir
        self.policy = policy
        self.say = say
        self.batching_file = run_dir / "batching.json"
        self.workers: dict[int, Worker] = {}
        self._retiring: set[Worker] = set()
        # a worker drains for its grace period; it is killed if it takes much longer than that
        self.kill_after_s = options.grace_period_s + 5.0

    def plans(self, spec: FleetSpec) -> list[WorkerPlan]:
        return plan_workers(spec, self.host, self.options, self.batching_file)

    def write_batching(self, batching: BatchSettings) -> None:
        write_atomically(self.batching_file, json.dumps(batching.to_mapping(), indent=2) + "\n")

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_batching(self.spec.batching)
        for plan in self.plans(self.spec):
            self._start_worker(plan)

    def _start_worker(self, plan: WorkerPlan) -> None:
        worker = Worker(plan, self.run_dir / f"{plan.name}.log", self.policy)
        self.workers[plan.index] = worker
        worker.start()

    def ordered(self) -> list[Worker]:
        return [self.workers[index] for index in sorted(self.workers)]

    def endpoints(self) -> list[str]:
        return [w.address for w in self.ordered()]

    def all_ready(self) -> bool:
        return bool(self.workers) and all(w.state == "ready" for w in self.workers.values())

    def failed_at_start(self) -> Worker | None:
        """A worker that keeps failing without ever having been ready (a bad model, a taken
        port): the fleet cannot start as written."""
        for worker in self.ordered():
            if worker.crash_looping and not worker.ever_ready:
                return worker
        return None

    async def apply(self, spec: FleetSpec) -> None:
        """Move to a new spec: batching live through the file; workers started or stopped."""
        if spec.batching != self.spec.batching:
            self.write_batching(spec.batching)
            self.say(
                f"batching {_batching_text(self.spec.batching)} -> {_batching_text(spec.batching)}"
                f": applied live to {len(self.workers)} workers (no restart)"
            )
        desired = {plan.index: plan for plan in self.plans(spec)}
        removed = [
            w for index, w in self.workers.items()
            if index not in desired or not same_process(w.plan, desired[index])
        ]  # fmt: skip
        for worker in removed:
            del self.workers[worker.plan.index]
            self._retiring.add(worker)
        if removed:
            self.say(f"stopping {', '.join(w.plan.name for w in removed)}")
            await asyncio.gather(*(w.stop(self.kill_after_s) for w in removed))
            self._retiring.difference_update(removed)
        added = [plan for index, plan in sorted(desired.items()) if index not in self.workers]
        for plan in added:
            self._start_worker(plan)
        if added:
            self.say(f"starting {', '.join(p.name for p in added)}")
        self.spec = spec

    async def scrape(self) -> None:
        await asyncio.gather(*(w.scrape() for w in self.workers.values()))

    async def stop(self) -> None:
        """Drain every worker (SIGTERM, then SIGKILL after the grace period) and wait for all,
        including those a scale-down was stopping when it was interrupted."""
        every = [*self.workers.values(), *self._retiring]
        await asyncio.gather(*(w.stop(self.kill_after_s) for w in every))


def status_document(fleet: Fleet, stopped: bool = False) -> dict[str, Any]:
    """The fleet's state for programs (`run --status-file`): the batching it applies, and per
    worker its pid, address, state and restarts."""
    return {
        "stopped": stopped,
        "ready": fleet.all_ready() and not stopped,
        "batching": fleet.spec.batching.to_mapping(),
        "workers": [
            {
                "name": worker.plan.name,
                "pid": worker.pid,
                "address": worker.address,
                "state": "stopped" if stopped else worker.state,
                "restarts": worker.restarts,
            }
            for worker in fleet.ordered()
        ],
    }


def _batching_text(batching: BatchSettings) -> str:
    return (
        f"(batch {batching.max_batch_size}, delay {batching.max_queue_delay_us} us, "
        f"queue {batching.max_queue_size})"
    )
