"""One supervised worker process: start, health-check over grpc.health.v1, restart with
backoff when it exits or stops answering, and stop by draining."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from fleet_spec.contract import HEALTH_SERVICE
from grpc_health.v1 import health_pb2

from fleet_local.plan import WorkerPlan
from fleet_local.scrape import Rates, fetch_metrics, parse_metrics

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HealthCheck = grpc.aio.UnaryUnaryMultiCallable[
    health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
]
_PR_SET_PDEATHSIG = 1
# a worker binds its port seconds after it starts: retry connecting often, not with gRPC's
# default backoff that grows to two minutes
_HEALTH_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class Policy:
    """How a worker is watched and restarted."""

    check_period_s: float = 1.0
    check_timeout_s: float = 1.0
    unresponsive_s: float = 10.0  # a ready worker that fails checks this long is restarted
    start_timeout_s: float = 300.0  # a worker not ready by then is restarted
    backoff_s: float = 1.0  # first restart delay; doubles per consecutive failure
    max_backoff_s: float = 30.0
    stable_s: float = 30.0  # ready this long: the failure count starts again from zero
    crash_loop_after: int = 3  # consecutive failures that make a worker "crash-looping"


def _die_with_parent() -> None:
    """In the child: get SIGTERM if `inferencefleet run` itself dies, so no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def dial_host(host: str) -> str:
    """Where to reach a worker that listens on `host`: the address itself, or IPv4 loopback for
    a wildcard (0.0.0.0; :: is dual-stack, or 0.0.0.0 on a machine without IPv6)."""
    host = host.strip("[]")
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def dial_address(host: str, port: int) -> str:
    """host:port to dial, with an IPv6 literal in brackets."""
    host = dial_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tail(path: Path, lines: int = 12) -> list[str]:
    """The last lines of a log file (empty if there is none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


class Worker:
    """A worker process and its state as the table shows it."""

    def __init__(self, plan: WorkerPlan, log_path: Path, policy: Policy) -> None:
        self.plan = plan
        self.log_path = log_path
        self.policy = policy
        self.state = "pending"
        self.restarts = 0
        self.failures = 0  # consecutive
        self.ever_ready = False
        self.last_exit: int | None = None
        self.last_reason = ""
        self.rates = Rates()
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def crash_looping(self) -> bool:
        return self.failures >= self.policy.crash_loop_after

    @property
    def address(self) -> str:
        return dial_address(self.plan.settings.host, self.plan.port)

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"worker {self.plan.name}")

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **dict(self.plan.env), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            log.write(
                f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.plan.argv)}\n".encode()
            )
            log.flush()
            return await asyncio.create_subprocess_exec(
                *self.plan.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches `run`, which drains the workers in order
                preexec_fn=_die_with_parent,
            )

    async def _supervise(self) -> None:
        while not self._stopping:
            self.state = "crash-looping" if self.crash_looping else "starting"
            self.rates.reset()
            self._process = await self._spawn()
            outcome = await self._watch(self._process)
            if self._stopping:
                break
            await self._kill(self._process)
            self.last_exit = self._process.returncode
            self.failures += 1
            self.restarts += 1
            self.last_reason = outcome
            self.state = "crash-looping" if self.crash_looping else "restarting"
            delay = min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** (self.failures - 1))
            self._note(f"{outcome} (exit code {self.last_exit}); restart in {delay:g} s")
            await self._sleep_unless_stopping(delay)

    def _note(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {text}\n")

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _watch(self, process: asyncio.subprocess.Process) -> str:
        """Health-check until the process exits or must be restarted; returns why."""
        exited = asyncio.create_task(process.wait())
        async with grpc.aio.insecure_channel(self.address, options=_HEALTH_OPTIONS) as channel:
            check: _HealthCheck = channel.unary_unary(
                _HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                return await self._health_loop(exited, check)
            finally:
                exited.cancel()

    async def _health_loop(self, exited: asyncio.Task[int], check: _HealthCheck) -> str:
        started = time.monotonic()
        ready_since: float | None = None
        failing_since: float | None = None
        while True:
            done, _ = await asyncio.wait([exited], timeout=self.policy.check_period_s)
            if done or self._stopping:
                return "exited"
            now = time.monotonic()
            serving = await self._check(check)
            if serving:
                failing_since = None
                if ready_since is None:
                    ready_since = now
                    self.ever_ready = True
                self.state = "ready"
                if now - ready_since >= self.policy.stable_s:
                    self.failures = 0
                continue
            if ready_since is None:
                if now - started > self.policy.start_timeout_s:
                    return "start timeout"
                continue
            failing_since = failing_since or now
            self.state = "unresponsive"
            if now - failing_since >= self.policy.unresponsive_s:
                return "unresponsive"

    async def _check(self, check: _HealthCheck) -> bool:
        request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
        try:
            reply = await check(request, timeout=self.policy.check_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def scrape(self) -> None:
        """Add a metrics sample (nothing when the worker does not answer)."""
        if self.state != "ready" or not self.plan.metrics_port:
            return
        try:
            text = await fetch_metrics(dial_host(self.plan.settings.host), self.plan.metrics_port)
        except (OSError, TimeoutError, ValueError):
            return
        with contextlib.suppress(ValueError):
            self.rates.add(parse_metrics(text, time.monotonic()))

    async def _kill(self, process: asyncio.subprocess.Process, grace_s: float = 0.0) -> None:
        """SIGTERM (the worker drains), then SIGKILL after `grace_s`; waits until it is gone."""
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
            try:
                await asyncio.wait_for(process.wait(), grace_s if grace_s > 0 else None)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    async def stop(self, grace_s: float) -> None:
        """Drain and end the worker; no restart follows."""
        self._stopping = True
        self._stop_requested.set()
        self.state = "stopping"
        if self._process is not None:
            await self._kill(self._process, grace_s)
        if self._task is not None:
            await self._task
        if self._process is not None:  # one the task started before it saw the stop
            await self._kill(self._process, grace_s)
        self.state = "stopped"
