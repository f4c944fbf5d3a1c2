"""One worker process's life: bind, report NOT_SERVING, load and warm the model, serve, watch the
batching file, and on SIGTERM drain in-flight calls within the grace period and return."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import grpc
from fleet_proto import inference_pb2 as pb
from fleet_spec.contract import (
    HEALTH_SERVICE,
    SettingsError,
    WorkerSettings,
    load_batching_file,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from fleet_server import metrics, protocol
from fleet_server.batcher import Batcher
from fleet_server.models import load_model
from fleet_server.runner import ModelRunner, resolve_device, resolve_dtype
from fleet_server.serve import HEALTH_DIR_ENV, WORKERS_ENV
from fleet_server.servicer import InferenceServicer, add_to_server

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICES = ("", HEALTH_SERVICE)
GPU_MEMORY_INTERVAL_S = 5.0
# Start-up warms batch sizes for at most this long, then serves and warms the rest in the
# background: well inside the 300 s the pod's startup probe allows.
WARM_BUDGET_S = 120.0
# After the drain, calls still open (a health Watch) get this long before they are cancelled;
# every inference answer has been handed to gRPC by then and is written meanwhile.
FLUSH_S = 1.0
SIBLING_CHECK_S = 1.0


class SiblingHealth:
    """Processes behind one port (`serve --workers N`): a probe reaches one of them at random,
    so each answers for all: SERVING only while every process says it serves. Each writes its
    own verdict to a file in a shared folder and reads the others'."""

    def __init__(self, folder: Path, index: int, count: int) -> None:
        self.folder, self.index, self.count = folder, index, count

    @classmethod
    def from_environment(cls, index: int) -> SiblingHealth | None:
        folder, count = os.environ.get(HEALTH_DIR_ENV), os.environ.get(WORKERS_ENV)
        if not folder or not count:
            return None
        return cls(Path(folder), index, int(count))

    def publish(self, serving: bool) -> None:
        path = self.folder / str(self.index)
        temporary = self.folder / f".{self.index}.tmp"
        temporary.write_text("SERVING" if serving else "NOT_SERVING")
        os.replace(temporary, path)

    def all_serving(self) -> bool:
        return all(_read(self.folder / str(i)) == "SERVING" for i in range(self.count))


def _version() -> str:
    try:
        return package_version("inferencefleet")
    except PackageNotFoundError:
        return "0"


def _build_runner(config: WorkerSettings) -> ModelRunner:
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

    def __init__(self, config: WorkerSettings) -> None:
        self.config = config
        self.servicer = InferenceServicer(
            config.served_name, _version(), max_concurrent_rpcs=config.max_concurrent_rpcs
        )
        self.health = health_aio.HealthServicer()
        self.port = 0
        self._stop = asyncio.Event()
        self._gpu_memory: asyncio.Task[None] | None = None
        self._serving = False
        self._health_updates: set[asyncio.Task[None]] = set()
        self._own_health = False
        self._siblings = SiblingHealth.from_environment(config.worker_index)

    def _on_model_health(self, healthy: bool) -> None:
        """The batcher's verdict changed: forward passes keep failing, or work again."""
        if not self._serving or self._stop.is_set():
            return
        task = asyncio.get_running_loop().create_task(self._set_health(healthy))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_health(self, serving: bool) -> None:
        """This process's verdict; what the probes hear also counts its siblings'."""
        self._own_health = serving
        if self._siblings is not None:
            self._siblings.publish(serving)
        await self._report_health()

    async def _report_health(self) -> None:
        serving = self._own_health and (self._siblings is None or self._siblings.all_serving())
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)

    async def _watch_siblings(self) -> None:
        while True:
            await asyncio.sleep(SIBLING_CHECK_S)
            await self._report_health()

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
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = grpc_address(config.host, config.port)
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ValueError(f"cannot listen on {address}: {exc}") from exc
        await self._set_health(False)
        await server.start()
        log.info(
            "listening on %s (NOT_SERVING until the model is warm)",
            grpc_address(config.host, self.port),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

        batcher = await self._load(config)
        watcher = None
        if config.batching_config is not None:
            watcher = asyncio.create_task(self._watch_batching(batcher))
        siblings = None
        if self._siblings is not None:
            siblings = asyncio.create_task(self._watch_siblings())
        # The model and everything built so far live for the whole process: move them out of
        # the cyclic collector's way, so its passes stay short while serving.
        gc.collect()
        gc.freeze()
        if not self._stop.is_set():
            self._serving = True
            await self._set_health(batcher.healthy)
            log.info("SERVING model %r on port %d", config.served_name, self.port)
        await self._stop.wait()

        if config.deregister_delay_s > 0:
            # A pod being deleted leaves its Services' endpoints at once, but each node's proxy
            # takes a moment to stop routing new connections here. Until then, answer them:
            # a refused connection would fail every call queued on a client's channel.
            await self._set_health(False)
            log.info(
                "shutting down: NOT_SERVING, still serving for %.1fs while endpoints update",
                config.deregister_delay_s,
            )
            await asyncio.sleep(config.deregister_delay_s)
        log.info("shutting down: NOT_SERVING, draining for up to %.1fs", config.grace_period_s)
        self.servicer.begin_drain()
        if self._siblings is not None:
            self._siblings.publish(False)
        await self.health.enter_graceful_shutdown()
        for task in (watcher, siblings, self._gpu_memory):
            if task is not None:
                task.cancel()
        # stop() with the whole grace period at once: gRPC tells every client (GOAWAY) to send
        # its next calls elsewhere, and a client behind a Service reconnects to another pod
        # instead of retrying on this connection. A call that raced the GOAWAY comes back
        # UNAVAILABLE (from the servicer) or CANCELLED (by gRPC, never handed to a handler):
        # both safe to retry. Open calls finish and open streams answer what they admitted,
        # then end; once every handler has returned, what is left (a health Watch) gets FLUSH_S.
        started = time.perf_counter()
        stopping = asyncio.create_task(server.stop(config.grace_period_s))
        try:
            async with asyncio.timeout(config.grace_period_s):
                await self.servicer.wait_idle()
        except TimeoutError:
            log.warning("grace period over with %d calls open: cancelling them", self.servicer.rpcs)
        left = max(0.0, config.grace_period_s - (time.perf_counter() - started))
        await server.stop(min(FLUSH_S, left))
        await stopping
        await batcher.close()
        log.info("stopped")

    async def _load(self, config: WorkerSettings) -> Batcher:
        started = time.perf_counter()
        settings = config.batching
        if config.batching_config is not None and config.batching_config.exists():
            settings = load_batching_file(config.batching_config, settings)
        runner = await asyncio.to_thread(_build_runner, config)
        batcher = Batcher(
            runner,
            settings,
            model=config.served_name,
            stats=self.servicer.stats,
            on_health=self._on_model_health,
        )
        await batcher.start(WARM_BUDGET_S)
        loaded = time.perf_counter() - started
        metrics.MODEL_LOAD_SECONDS.labels(model=config.served_name).set(loaded)
        metrics.MAX_BATCH_SIZE.labels(model=config.served_name).set(settings.max_batch_size)
        if runner.device.type == "cuda":
            self._gpu_memory = asyncio.create_task(self._report_gpu_memory(runner))
        self.servicer.info = protocol.ModelInfo(
            config.served_name, config.image_size, runner.num_classes, runner.device.type == "cuda"
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
            model=self.config.served_name, device=str(runner.device)
        )
        while True:
            gauge.set(runner.gpu_memory_allocated() or 0)
            await asyncio.sleep(GPU_MEMORY_INTERVAL_S)

    async def _watch_batching(self, batcher: Batcher) -> None:
        """Poll the batching file (a ConfigMap mount swaps a symlink) and apply changes live."""
        path = self.config.batching_config
        assert path is not None
        last = _read(path)
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            text = _read(path)
            if text == last:
                continue
            last = text
            try:
                settings = load_batching_file(path, batcher.settings)
                batcher.apply(settings)
            except SettingsError as exc:
                log.error("keeping the current batching settings: %s", exc)
                continue
            except Exception:  # never let one edit end the watching of every later one
                log.exception("applying batching settings from %s failed", path)
                continue
            metrics.MAX_BATCH_SIZE.labels(model=self.config.served_name).set(
                settings.max_batch_size
            )
            log.info("batching settings applied: %s", settings)


def grpc_address(host: str, port: int) -> str:
    """host:port for gRPC, with an IPv6 literal in brackets ([::]:8001)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def run_worker(config: WorkerSettings) -> int:
    """Run one worker in this process until SIGTERM; 0 after a clean drain."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s worker[{config.worker_index}:{os.getpid()}] %(levelname)s %(message)s",
    )
    asyncio.run(Worker(config).run())
    return 0
