"""The local fleet's plan (pure): which worker processes to start, on which ports and devices,
with how many threads, and whether the fleet fits this machine."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from fleet_spec.capacity import Capacity, GpuHost, check_capacity, processes_per_gpu
from fleet_spec.contract import WorkerSettings
from fleet_spec.spec import FleetSpec

ACCELERATOR_NAME = "local"


@dataclass(frozen=True)
class LocalGpu:
    index: int
    name: str
    memory_mib: int | None


@dataclass(frozen=True)
class LocalHost:
    """What this machine offers: its GPUs (maybe none) and the CPU cores this process may use."""

    cores: int
    gpus: tuple[LocalGpu, ...] = ()


@dataclass(frozen=True)
class Options:
    """Command-line settings of `inferencefleet run` that are not in the fleet manifest."""

    host: str = "127.0.0.1"
    port: int = 8001  # first worker's gRPC port; the others follow
    metrics_port: int = 9001  # first worker's metrics port; the others follow (0: no metrics)
    device: str = "auto"  # auto: the GPUs when there are any, else the CPU; cpu: always the CPU
    threads: int | None = None  # torch threads per worker; None: sized from the cores
    image_size: int | None = None
    grace_period_s: float = 5.0
    python: str = sys.executable
    watch_interval_s: float | None = None  # how often a worker polls its batching file


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process: everything needed to start it (equal plans mean the same process)."""

    index: int
    replica: int
    device: str  # shown in the table: "cpu" or "cuda:<physical index>"
    settings: WorkerSettings
    python: str = sys.executable
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def name(self) -> str:
        return f"w{self.index}"

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def metrics_port(self) -> int:
        return self.settings.metrics_port

    @property
    def threads(self) -> int:
        assert self.settings.threads is not None
        return self.settings.threads

    @property
    def argv(self) -> tuple[str, ...]:
        return (self.python, "-m", "inferencefleet.cli", "serve", *self.settings.to_argv())


@dataclass(frozen=True)
class Placement:
    """Where the fleet goes on this machine, with a sentence for the user."""

    on_gpu: bool
    workers: int
    threads: int
    notice: str


def worker_count(spec: FleetSpec) -> int:
    return spec.replicas * spec.processes_per_pod


def threads_per_worker(host: LocalHost, workers: int, on_gpu: bool, override: int | None) -> int:
    """Torch threads per process so that all processes together use the cores there are:
    more threads than cores makes every process slower, not faster."""
    if override is not None:
        return override
    if on_gpu:
        return max(1, min(4, host.cores // max(1, workers)))
    return max(1, host.cores // max(1, workers))


def placement(spec: FleetSpec, host: LocalHost, options: Options) -> Placement:
    workers = worker_count(spec)
    on_gpu = bool(host.gpus) and options.device != "cpu"
    threads = threads_per_worker(host, workers, on_gpu, options.threads)
    if on_gpu:
        notice = (
            f"{workers} workers on {len(host.gpus)} GPU(s), {processes_per_gpu(spec)} per GPU at "
            f"most, {threads} CPU thread(s) each"
        )
    else:
        why = "no GPU found" if not host.gpus else "--device cpu"
        notice = (
            f"{why}: running {workers} workers on the CPU ({host.cores} cores, {threads} torch "
            f"thread(s) each; the CPU computes in fp32)"
        )
        if workers * threads > host.cores:
            notice += (
                f"; {workers} workers oversubscribe {host.cores} cores, expect less than "
                f"{workers}x the frames/s of one"
            )
    return Placement(on_gpu, workers, threads, notice)


def local_capacity(spec: FleetSpec, host: LocalHost) -> Capacity:
    """The operator's capacity rule applied to this machine's GPUs."""
    memory = [gpu.memory_mib for gpu in host.gpus if gpu.memory_mib is not None]
    gpu_host = GpuHost(ACCELERATOR_NAME, len(host.gpus), min(memory) if memory else None)
    return check_capacity(spec, [gpu_host])


def worker_settings(
    spec: FleetSpec, options: Options, port: int, metrics_port: int, device: str, threads: int,
    batching_file: Path,
) -> WorkerSettings:  # fmt: skip
    """One local worker's `serve` settings; batching comes from the file `run` rewrites, so
    a batching edit changes no argument and restarts no worker."""
    return WorkerSettings(
        model=spec.model.source,
        model_name=spec.model.served_name,
        host=options.host,
        port=port,
        metrics_port=metrics_port,
        device=device,
        precision=spec.model.precision,
        threads=threads,
        image_size=options.image_size or WorkerSettings.image_size,
        batching_config=batching_file,
        grace_period_s=options.grace_period_s,
        watch_interval_s=options.watch_interval_s or WorkerSettings.watch_interval_s,
    )


def plan_workers(
    spec: FleetSpec, host: LocalHost, options: Options, batching_file: Path
) -> list[WorkerPlan]:
    """replicas x processesPerPod workers on consecutive ports. Every process of a replica
    shares that replica's GPU (one GPU slot, as a pod does); replicas go round the GPUs."""
    where = placement(spec, host, options)
    plans = []
    for index in range(where.workers):
        replica = index // spec.processes_per_pod
        port = options.port + index
        metrics_port = options.metrics_port + index if options.metrics_port else 0
        env = [("OMP_NUM_THREADS", str(where.threads)), ("OMP_WAIT_POLICY", "PASSIVE")]
        if where.on_gpu:
            gpu = host.gpus[replica % len(host.gpus)]
            device, shown = "cuda", f"cuda:{gpu.index}"
            env.append(("CUDA_VISIBLE_DEVICES", str(gpu.index)))
        else:
            device = shown = "cpu"
            env.append(("CUDA_VISIBLE_DEVICES", ""))
        settings = worker_settings(
            spec, options, port, metrics_port, device, where.threads, batching_file
        )
        plans.append(WorkerPlan(index, replica, shown, settings, options.python, tuple(env)))
    return plans


def same_process(a: WorkerPlan, b: WorkerPlan) -> bool:
    """Whether a running worker planned as `a` can stay when the plan becomes `b`: threads are
    sized when a worker starts, so a scale change alone does not restart the workers it keeps."""

    def key(plan: WorkerPlan) -> tuple[object, ...]:
        settings = replace(plan.settings, threads=None)
        env = tuple(item for item in plan.env if item[0] != "OMP_NUM_THREADS")
        return plan.index, plan.device, plan.python, settings, env

    return key(a) == key(b)
