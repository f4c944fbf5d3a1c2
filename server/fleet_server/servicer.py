"""The GRPCInferenceService handlers: protocol <-> batcher; every error goes through to_status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from fleet_server import metrics, protocol
from fleet_server.batcher import Batcher
from fleet_server.errors import NotReady, to_status
from fleet_server.proto import inference_pb2 as pb
from fleet_server.proto import inference_pb2_grpc as pb_grpc
from fleet_server.stats import ModelStats

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves one model. `batcher`/`info` are set once the model is warm; until then not ready."""

    def __init__(self, model_name: str, version: str) -> None:
        self.model_name = model_name
        self.version = version
        self.batcher: Batcher | None = None
        self.info: protocol.ModelInfo | None = None
        self.stats = ModelStats()
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._m_inflight = metrics.INFLIGHT.labels(model=model_name)
        self._m_frames = metrics.FRAMES.labels(model=model_name)
        self._m_duration = metrics.REQUEST_DURATION.labels(model=model_name)
        self._m_ok = metrics.REQUESTS.labels(model=model_name, code=grpc.StatusCode.OK.name)

    async def wait_idle(self) -> None:
        """Return once no inference request is in flight."""
        await self._idle.wait()

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining

    def _serving(self) -> tuple[Batcher, protocol.ModelInfo]:
        if self.batcher is None or self.info is None or self.draining:
            raise NotReady("the worker is not ready (warming up or shutting down)")
        return self.batcher, self.info

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        """The one inference path of unary and streaming calls; raises on any failure."""
        started = time.perf_counter()
        self._m_inflight.inc()
        self.inflight += 1
        self._idle.clear()
        try:
            batcher, info = self._serving()
            frames = protocol.frames_from_request(info, request)
            logits = await batcher.infer(frames, deadline)
            response = protocol.infer_response(info, request.id, logits)
        except Exception as exc:
            code, _ = to_status(exc)
            metrics.REQUESTS.labels(model=self.model_name, code=code.name).inc()
            self.stats.record_request(False, time.perf_counter() - started)
            raise
        finally:
            self._m_inflight.dec()
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()
        elapsed = time.perf_counter() - started
        self._m_ok.inc()
        self._m_frames.inc(frames.shape[0])
        self._m_duration.observe(elapsed)
        self.stats.record_request(True, elapsed)
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.perf_counter() + remaining
        try:
            return await self._infer(request, deadline)
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; each response carries its request's id."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.perf_counter() + remaining
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(request, deadline)
            except Exception as exc:
                code, message = _status(exc)
                results.put_nowait(
                    pb.ModelStreamInferResponse(
                        error_message=f"{code.name}: {message}",
                        infer_response=pb.ModelInferResponse(
                            model_name=request.model_name, id=request.id
                        ),
                    )
                )
                return
            results.put_nowait(pb.ModelStreamInferResponse(infer_response=response))

        async def read() -> None:
            running: set[asyncio.Task[None]] = set()
            async for request in request_iterator:
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.wait(running)
            results.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        try:
            protocol.check_model(self._info_or_placeholder(), request.name, request.version)
        except Exception as exc:
            await _abort(context, exc)
        return pb.ModelReadyResponse(ready=self.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return protocol.server_metadata(self.version)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        def answer() -> pb.ModelMetadataResponse:
            _, info = self._serving()
            protocol.check_model(info, request.name, request.version)
            return protocol.model_metadata(info)

        return await _answer(context, answer)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        def answer() -> pb.ModelConfigResponse:
            batcher, info = self._serving()
            protocol.check_model(info, request.name, request.version)
            return protocol.model_config(info, batcher.settings)

        return await _answer(context, answer)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        def answer() -> pb.ModelStatisticsResponse:
            info = self._info_or_placeholder()
            if request.name:
                protocol.check_model(info, request.name, request.version)
            return protocol.model_statistics(info, self.stats)

        return await _answer(context, answer)

    def _info_or_placeholder(self) -> protocol.ModelInfo:
        """Name checks work while warming up: the model's name is known before its shapes."""
        return self.info or protocol.ModelInfo(self.model_name, image_size=0, num_classes=0)


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    code, message = to_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("request failed", exc_info=exc)
    return code, message


async def _abort(context: Context, exc: Exception) -> None:
    code, message = _status(exc)
    await context.abort(code, message)


async def _answer(context: Context, build: Callable[[], T]) -> T:
    """build()'s answer, or the call aborted with the status its exception maps to."""
    try:
        return build()
    except Exception as exc:
        await _abort(context, exc)
        raise  # unreachable: abort raises
