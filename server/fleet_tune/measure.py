"""Measuring one configuration for real: the fleet's workers started as `inferencefleet run`
starts them (fleet_local), batching applied live through their batching file, and a window of
closed-loop load from the benchmark's load generator. No torch in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from fleet_client.bench import model_input
from fleet_client.frames import build_requests
from fleet_client.loadgen import LoadGenerator, channel_options
from fleet_client.messages import MODEL_CONFIG, decode_batching, encode_model_config_request
from fleet_client.targets import parse_targets
from fleet_local.fleet import Fleet
from fleet_local.plan import LocalHost, Options, threads_per_worker
from fleet_local.worker import Policy, tail
from fleet_spec.contract import BatchSettings
from fleet_spec.spec import FleetSpec

from fleet_tune.search import Config, Measurement

Say = Callable[[str], None]
_POLL_S = 0.05
_APPLY_TIMEOUT_S = 20.0
_CONNECT_TIMEOUT_S = 20.0


class TuneError(RuntimeError):
    """The tuner cannot go on (a worker that does not start, a setting it does not take)."""


def spec_for_workers(spec: FleetSpec, workers: int, batching: BatchSettings) -> FleetSpec:
    """The fleet as the tuner runs it: `workers` processes on one GPU (or the CPU), one per
    replica; GPU sharing on when there is more than one (time-slicing unless the manifest chose
    MPS)."""
    sharing = "none" if workers == 1 else (spec.gpu.sharing if spec.gpu.shared else "timeSlicing")
    gpu = dataclasses.replace(spec.gpu, sharing=sharing, workers_per_gpu=workers)
    return dataclasses.replace(
        spec, replicas=workers, processes_per_pod=1, batching=batching, gpu=gpu
    )


@dataclass(frozen=True)
class Setup:
    """What is tuned and how it is loaded (everything but the configuration searched)."""

    spec: FleetSpec
    host: LocalHost  # at most one GPU: the tuner answers "per GPU"
    options: Options
    largest_batch: int  # workers start warmed up to it, so no window pays a first-shape cost
    concurrency: int | None = None  # requests in flight; None: 2 x workers x maxBatchSize
    warmup_s: float = 0.5
    start_timeout_s: float = 300.0

    def in_flight(self, config: Config) -> int:
        if self.concurrency is not None:
            return self.concurrency
        return 2 * config.workers * config.max_batch_size

    def queue_size(self) -> int:
        """Per worker: room for every request in flight, so overload never counts as errors."""
        wanted = self.concurrency if self.concurrency is not None else 4 * self.largest_batch
        return max(64, wanted, self.largest_batch)


@dataclass
class _Pool:
    """One fleet of workers that all run with the same torch threads; a configuration of W
    workers loads the first W of them (the others sit idle)."""

    fleet: Fleet
    threads: int
    applied: tuple[int, int] | None = None
    generators: dict[int, LoadGenerator] = field(default_factory=dict)


def thread_groups(setup: Setup, worker_counts: Sequence[int]) -> dict[int, int]:
    """torch threads per worker -> the most workers that run with that many (as `run` sizes
    threads: cores / workers)."""
    on_gpu = bool(setup.host.gpus) and setup.options.device != "cpu"
    groups: dict[int, int] = {}
    for workers in worker_counts:
        threads = threads_per_worker(setup.host, workers, on_gpu, setup.options.threads)
        groups[threads] = max(groups.get(threads, 0), workers)
    return groups


class FleetBench:
    """Starts the workers every configuration needs once, up front (in parallel), then measures
    configurations on them: batching changes live, the worker count picks how many are loaded.

    Workers are grouped by their torch threads (cores / workers, as `inferencefleet run` sizes
    them), so 1 worker with 2 threads and 2 or 4 workers with 1 thread each are two fleets on a
    2-core machine; the fleet not being measured is idle.
    """

    def __init__(self, setup: Setup, worker_counts: Sequence[int], run_dir: Path, say: Say) -> None:
        self.setup = setup
        self.run_dir = run_dir
        self.say = say
        self.start_s = 0.0  # spent starting workers
        self.worker_processes = 0
        self._groups = thread_groups(setup, worker_counts)
        self._pools: dict[int, _Pool] = {}
        self._model = setup.spec.model.served_name

    def _threads(self, workers: int) -> int:
        on_gpu = bool(self.setup.host.gpus) and self.setup.options.device != "cpu"
        return threads_per_worker(self.setup.host, workers, on_gpu, self.setup.options.threads)

    async def start(self) -> None:
        """Start every fleet and wait until all their workers are ready."""
        began = time.monotonic()
        setup = self.setup
        batching = BatchSettings(setup.largest_batch, 0, setup.queue_size())
        policy = Policy(
            check_period_s=0.25, crash_loop_after=2, start_timeout_s=setup.start_timeout_s
        )
        port = setup.options.port
        for threads, workers in sorted(self._groups.items()):
            spec = spec_for_workers(setup.spec, workers, batching)
            options = dataclasses.replace(setup.options, port=port, threads=threads)
            folder = self.run_dir / f"{workers}-workers-{threads}-threads"
            fleet = Fleet(spec, setup.host, options, folder, policy, self.say)
            self._pools[threads] = _Pool(fleet, threads)
            fleet.start()
            port += workers
            self.worker_processes += workers
        await asyncio.gather(*(self._ready(pool.fleet) for pool in self._pools.values()))
        self.start_s = time.monotonic() - began

    async def _ready(self, fleet: Fleet) -> None:
        deadline = time.monotonic() + self.setup.start_timeout_s
        while not fleet.all_ready():
            failed = fleet.failed_at_start()
            if failed is not None or time.monotonic() > deadline:
                worker = failed or fleet.ordered()[0]
                lines = "\n".join(tail(worker.log_path, 20))
                raise TuneError(
                    f"worker {worker.plan.name} did not become ready; last lines of "
                    f"{worker.log_path}:\n{lines}"
                )
            await asyncio.sleep(0.1)

    async def measure(self, config: Config, window_s: float) -> Measurement:
        pool = self._pools[self._threads(config.workers)]
        endpoints = pool.fleet.endpoints()[: config.workers]
        await self._apply(pool, config)
        generator = pool.generators.get(config.workers)
        if generator is None:
            generator = await self._generator(endpoints)
            pool.generators[config.workers] = generator
        step = await generator.step(self.setup.in_flight(config), self.setup.warmup_s, window_s)
        return Measurement(
            step.frames_per_s, step.latency_ms(0.99), sum(step.errors.values()), window_s
        )

    async def _generator(self, endpoints: list[str]) -> LoadGenerator:
        targets = parse_targets(endpoints)
        model, tensor = await model_input(targets, self._model, _CONNECT_TIMEOUT_S)
        requests = build_requests(model, tensor, 1, image_size=self.setup.options.image_size)
        generator = LoadGenerator(targets, requests, 1, connections=1)
        await generator.connect(_CONNECT_TIMEOUT_S)
        return generator

    async def close(self) -> None:
        for pool in self._pools.values():
            for generator in pool.generators.values():
                await generator.close()
            pool.generators.clear()
        await asyncio.gather(*(pool.fleet.stop() for pool in self._pools.values()))
        self._pools.clear()

    async def _apply(self, pool: _Pool, config: Config) -> None:
        """Write the fleet's batching file and wait until every worker reports the settings."""
        wanted = (config.max_batch_size, config.max_queue_delay_us)
        if wanted == pool.applied:
            return
        pool.fleet.write_batching(BatchSettings(*wanted, self.setup.queue_size()))
        pool.applied = None
        request = encode_model_config_request(self._model)
        deadline = time.monotonic() + _APPLY_TIMEOUT_S
        for endpoint in pool.fleet.endpoints():
            async with grpc.aio.insecure_channel(endpoint, options=channel_options(True)) as ch:
                call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(MODEL_CONFIG)
                while decode_batching(await call(request, timeout=5.0)) != wanted:
                    if time.monotonic() > deadline:
                        raise TuneError(
                            f"{endpoint} did not apply batching {wanted} within "
                            f"{_APPLY_TIMEOUT_S:g} s"
                        )
                    await asyncio.sleep(_POLL_S)
        pool.applied = wanted
