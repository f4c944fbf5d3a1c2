"""One worker process's life: bind, report NOT_SERVING, load and warm the model, serve, watch the
batching file, and on SIGTERM drain in-flight calls within the grace period and return."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import grpc
from fleet_proto import inference_pb2 as pb
from fleet_proto import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from fleet_server import metrics, protocol
from fleet_server.batcher import Batcher
from fleet_server.models import load_model
from fleet_server.runner import ModelRunner, resolve_device, resolve_dtype
from fleet_server.servicer import InferenceServicer
from fleet_server.settings import BatchSettings, SettingsError, load_settings_file

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
GPU_MEMORY_INTERVAL_S = 5.0


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs (serve.py builds it from the command line)."""

    model: str
    model_name: str
    host: str = "0.0.0.0"
    port: int = 8001
    device: str = "auto"
    precision: str = "fp32"
    image_size: int = 224
    copy_stream: bool = False
    cuda_graphs: bool = False
    batching: BatchSettings = field(default_factory=BatchSettings)
    batching_file: Path | None = None
    watch_interval_s: float = 1.0
    max_message_bytes: int = 64 * 1024 * 1024
    grace_period_s: float = 30.0
    worker_index: int = 0
    reuse_port: bool = False


def _version() -> str:
    try:
        return package_version("inferencefleet")
    except PackageNotFoundError:
        return "0"


def _build_runner(config: WorkerConfig) -> ModelRunner:
    device = resolve_device(config.device, config.worker_index)
    dtype = resolve_dtype(config.precision, device)
    runner = ModelRunner(
        load_model(config.model),
        device=device,
        dtype=dtype,
        image_size=config.image_size,
        copy_stream=config.copy_stream,
        cuda_graphs=config.cuda_graphs,
    )
    log.info("model %s on %s as %s", config.model, device, str(dtype).removeprefix("torch."))
    return runner


class Worker:
    """A gRPC server for one model; `run` returns when the server stopped after SIGTERM/stop()."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.servicer = InferenceServicer(config.model_name, _version())
        self.health = health_aio.HealthServicer()
        self.port = 0
        self._stop = asyncio.Event()
        self._gpu_memory: asyncio.Task[None] | None = None

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)

    def stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    async def run(self) -> None:
        config = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{config.host}:{config.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ValueError(f"cannot listen on {address}: {exc}") from exc
        await self._set_health(False)
        await server.start()
        log.info("listening on %s:%d (NOT_SERVING until the model is warm)", config.host, self.port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

        batcher = await self._load(config)
        watcher = None
        if config.batching_file is not None:
            watcher = asyncio.create_task(self._watch_batching(batcher))
        # The model and everything built so far live for the whole process: move them out of
        # the cyclic collector's way, so its passes stay short while serving.
        gc.collect()
        gc.freeze()
        if not self._stop.is_set():
            await self._set_health(True)
            log.info("SERVING model %r on port %d", config.model_name, self.port)
        await self._stop.wait()

        log.info("shutting down: NOT_SERVING, draining for up to %.1fs", config.grace_period_s)
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        for task in (watcher, self._gpu_memory):
            if task is not None:
                task.cancel()
        # stop() refuses new calls at once and gives running ones the grace period; once no
        # inference is in flight, a second stop(0) ends what is left (e.g. health Watch streams).
        stopping = asyncio.create_task(server.stop(config.grace_period_s))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(config.grace_period_s):
                await self.servicer.wait_idle()
        await server.stop(0)
        await stopping
        await batcher.close()
        log.info("stopped")

    async def _load(self, config: WorkerConfig) -> Batcher:
        started = time.perf_counter()
        settings = config.batching
        if config.batching_file is not None and config.batching_file.exists():
            settings = load_settings_file(config.batching_file, settings)
        runner = await asyncio.to_thread(_build_runner, config)
        batcher = Batcher(runner, settings, model=config.model_name, stats=self.servicer.stats)
        await batcher.start()
        loaded = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.labels(model=config.model_name).set(loaded)
        if runner.device.type == "cuda":
            self._gpu_memory = asyncio.create_task(self._report_gpu_memory(runner))
        self.servicer.info = protocol.ModelInfo(
            config.model_name, config.image_size, runner.num_classes, runner.device.type == "cuda"
        )
        self.servicer.batcher = batcher
        log.info(
            "model warm in %.1fs: batch sizes 1..%d, %d classes",
            loaded,
            runner.warmed_batch_size,
            runner.num_classes,
        )
        return batcher

    async def _report_gpu_memory(self, runner: ModelRunner) -> None:
        gauge = metrics.GPU_MEMORY_ALLOCATED.labels(
            model=self.config.model_name, device=str(runner.device)
        )
        while True:
            gauge.set(runner.gpu_memory_allocated() or 0)
            await asyncio.sleep(GPU_MEMORY_INTERVAL_S)

    async def _watch_batching(self, batcher: Batcher) -> None:
        """Poll the batching file (a ConfigMap mount swaps a symlink) and apply changes live."""
        path = self.config.batching_file
        assert path is not None
        last = _read(path)
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            text = _read(path)
            if text == last:
                continue
            last = text
            try:
                settings = load_settings_file(path, batcher.settings)
            except SettingsError as exc:
                log.error("keeping the current batching settings: %s", exc)
                continue
            await batcher.apply(settings)
            log.info("batching settings applied: %s", settings)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def run_worker(config: WorkerConfig) -> int:
    """Run one worker in this process until SIGTERM; 0 after a clean drain."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s worker[{config.worker_index}:{os.getpid()}] %(levelname)s %(message)s",
    )
    asyncio.run(Worker(config).run())
    return 0
