"""`inferencefleet run fleet.yaml`: the fleet as supervised local processes, no Kubernetes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import json
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fleet_client.argtypes import at_least_one
from fleet_spec.spec import FleetSpec, FleetSpecError
from rich.console import Console
from rich.live import Live

from fleet_local.fleet import Fleet, status_document, write_atomically
from fleet_local.host import discover
from fleet_local.manifest import check_model_file, read_fleet, watch_file
from fleet_local.plan import LocalHost, Options, local_capacity, placement, plan_workers
from fleet_local.view import fleet_view, state_line
from fleet_local.worker import Policy, tail


def say(console: Console, text: str) -> None:
    """A message for the user (above the live table when there is one)."""
    console.print(text, highlight=False, soft_wrap=True)


class RefusedError(RuntimeError):
    """The fleet cannot run on this machine as asked (the message has the numbers)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferencefleet run",
        description="Run an InferenceFleet manifest as supervised worker processes on this "
        "machine: one per GPU slot, or on the CPU when there is no GPU.",
    )
    parser.add_argument("fleet", type=Path, help="the InferenceFleet manifest (fleet.yaml)")
    parser.add_argument("--model", help="use this model source instead of spec.model.source")
    parser.add_argument(
        "--image-size", type=at_least_one, help="input height = width of a builtin model"
    )
    parser.add_argument(
        "--threads", type=at_least_one, help="torch threads per worker (default: cores/workers)"
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu"], default="auto", help="cpu: ignore GPUs"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the workers listen on")
    parser.add_argument(
        "--port", type=int, default=8001, help="first gRPC port (then +1 per worker)"
    )
    parser.add_argument("--metrics-port", type=int, default=9001, help="first metrics port")
    parser.add_argument("--grace-period-s", type=float, default=5.0, help="drain time per worker")
    parser.add_argument(
        "--log-dir", type=Path, help="worker logs and batching file (default: a temp dir)"
    )
    parser.add_argument(
        "--ready-file", type=Path, help="write the endpoints here once all are ready"
    )
    parser.add_argument(
        "--status-file",
        type=Path,
        help="keep the fleet's state here as JSON (workers' pid, address, state, restarts; the "
        "batching applied), for scripts",
    )
    parser.add_argument("--no-table", action="store_true", help="log lines instead of a live table")
    parser.add_argument(
        "--start-timeout-s", type=float, default=300.0, help="restart if not ready by then"
    )
    parser.add_argument(
        "--unresponsive-s", type=float, default=10.0, help="restart after failing checks this long"
    )
    parser.add_argument(
        "--backoff-s", type=float, default=1.0, help="first restart delay (doubles)"
    )
    return parser  # fmt: skip


def taken_ports(host: str, ports: list[int]) -> list[int]:
    """Ports something already listens on. Binds without SO_REUSEPORT, so a server that shares
    its port (as gRPC servers do) is found too; SO_REUSEADDR, so that connections of a server
    stopped a moment ago (TIME_WAIT) do not count as taken."""
    taken = []
    for port in ports:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                taken.append(port)
    return taken


def preflight(spec: FleetSpec, host: LocalHost, options: Options) -> None:
    """Refuse, with the numbers, a fleet that does not fit or whose ports are taken."""
    check_model_file(spec)
    where = placement(spec, host, options)
    if where.on_gpu:
        capacity = local_capacity(spec, host)
        if not capacity.fits or capacity.hosts_too_small:
            raise RefusedError(f"the fleet does not fit this machine: {capacity.message()}")
    plans = plan_workers(spec, host, options, Path("batching.json"))
    wanted = [p.port for p in plans] + [p.metrics_port for p in plans if p.metrics_port]
    busy = taken_ports(options.host, wanted)
    if busy:
        raise RefusedError(
            f"port(s) {', '.join(map(str, busy))} on {options.host} already in use; "
            f"pick free ones with --port / --metrics-port"
        )


class Runner:
    """The supervising loop: table, edits to the manifest, signals, shutdown."""

    def __init__(self, args: argparse.Namespace, fleet: Fleet, console: Console) -> None:
        self.args = args
        self.fleet = fleet
        self.console = console
        self.table = not args.no_table and console.is_terminal
        self._announced: list[str] = []
        self._states: dict[str, str] = {}
        self._status = ""

    def write_status(self, stopped: bool = False) -> None:
        """Rewrite --status-file when the fleet's state changed."""
        if self.args.status_file is None:
            return
        text = json.dumps(status_document(self.fleet, stopped), indent=2) + "\n"
        if text != self._status:
            write_atomically(self.args.status_file, text)
            self._status = text

    def say(self, text: str) -> None:
        say(self.console, text)

    async def on_edit(self) -> None:
        try:
            spec = read_fleet(self.args.fleet, self.args.model)
            check_model_file(spec)
            where = placement(spec, self.fleet.host, self.fleet.options)
            if where.on_gpu and not local_capacity(spec, self.fleet.host).fits:
                raise RefusedError(local_capacity(spec, self.fleet.host).message())
        except (FleetSpecError, RefusedError) as exc:
            self.say(f"{self.args.fleet}: not applied, the fleet keeps running as it was: {exc}")
            return
        self.say(f"{self.args.fleet} changed")
        await self.fleet.apply(spec)

    def _announce(self) -> None:
        endpoints = self.fleet.endpoints()
        if not self.fleet.all_ready() or endpoints == self._announced:
            return
        self._announced = endpoints
        joined = ",".join(endpoints)
        self.say(f"ready: {len(endpoints)} workers; gRPC endpoints {joined}")
        self.say(
            f"  try: inferencefleet bench {joined} --model {self.fleet.spec.model.served_name}"
        )
        if self.args.ready_file is not None:
            write_atomically(self.args.ready_file, joined + "\n")

    def _log_states(self) -> None:
        for worker in self.fleet.ordered():
            line = state_line(worker)
            if self._states.get(worker.plan.name) != line:
                self._states[worker.plan.name] = line
                self.say(line)

    async def supervise(self, stop: asyncio.Event) -> int:
        """Until a signal: refresh the view, scrape metrics. 1 if the fleet cannot start."""
        tick = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            tick += 1
            if tick % 2 == 0:
                await self.fleet.scrape()
            if not self.table:
                self._log_states()
            self.write_status()
            self._announce()
            failed = self.fleet.failed_at_start()
            if failed is not None and not self._announced:
                self.say(
                    f"{failed.plan.name} failed {failed.failures} times without becoming ready; "
                    f"stopping the fleet. Last lines of {failed.log_path}:"
                )
                self.say("\n".join(tail(failed.log_path, 20)))
                return 1
        return 0


@contextlib.contextmanager
def _display(runner: Runner) -> Iterator[None]:
    if not runner.table:
        yield
        return
    with Live(
        fleet_view(runner.fleet),
        console=runner.console,
        refresh_per_second=1,
        get_renderable=lambda: fleet_view(runner.fleet),
    ):
        yield


async def _run(args: argparse.Namespace, spec: FleetSpec, host: LocalHost, options: Options) -> int:
    console = Console()
    run_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"inferencefleet-{spec.name}-"))
    policy = Policy(
        start_timeout_s=args.start_timeout_s,
        unresponsive_s=args.unresponsive_s,
        backoff_s=args.backoff_s,
    )
    fleet = Fleet(spec, host, options, run_dir, policy, functools.partial(say, console))
    runner = Runner(args, fleet, console)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner.say(placement(spec, host, options).notice)
    runner.say(f"worker logs: {run_dir}")
    fleet.start()
    watcher = asyncio.create_task(watch_file(args.fleet, runner.on_edit))
    try:
        with _display(runner):
            code = await runner.supervise(stop)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        runner.say(f"stopping {len(fleet.workers)} workers (draining)")
        await fleet.stop()
    runner.write_status(stopped=True)
    runner.say("stopped: no worker left running")
    return code


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = Options(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        device=args.device,
        threads=args.threads,
        image_size=args.image_size,
        grace_period_s=args.grace_period_s,
    )
    try:
        spec = read_fleet(args.fleet, args.model)
        host = discover()
        preflight(spec, host, options)
    except FleetSpecError as exc:
        print(f"inferencefleet run: {args.fleet}: {exc}", file=sys.stderr)
        return 2
    except RefusedError as exc:
        print(f"inferencefleet run: refused: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_run(args, spec, host, options))
