"""The GRPCInferenceService handlers: protocol <-> batcher; every error goes through to_status."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from fleet_proto import inference_pb2 as pb
from fleet_proto import inference_pb2_grpc as pb_grpc
from fleet_proto.tensors import Logits
from google.protobuf.message import DecodeError

from fleet_server import metrics, protocol
from fleet_server.batcher import Batcher
from fleet_server.errors import InvalidInput, NotReady, TooManyCalls, to_status
from fleet_server.stats import ModelStats

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")
# Requests one stream may have admitted but not yet answered on the wire. Past it the servicer
# stops reading that stream, so HTTP/2 flow control holds the client back: a client that sends
# and never reads cannot grow the worker's memory.
STREAM_WINDOW = 64
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# What an inference request whose bytes do not parse becomes (compared by identity).
UNDECODABLE = pb.ModelInferRequest()


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return UNDECODABLE

    return parse_or_mark


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated code does, except that inference requests whose
    bytes do not parse get INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""

    class Capture:
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, _: Any) -> None:
            pass

        def add_registered_method_handlers(self, _: str, handlers: dict[str, Any]) -> None:
            self.handlers = handlers

    capture = Capture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)  # type: ignore[no-untyped-call]
    handlers = {
        name: handler._replace(request_deserializer=_lenient(handler.request_deserializer))
        if name in ("ModelInfer", "ModelStreamInfer")
        else handler
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves one model. `batcher`/`info` are set once the model is warm; until then not ready."""

    def __init__(self, model_name: str, version: str, max_concurrent_rpcs: int = 1000) -> None:
        self.model_name = model_name
        self.version = version
        self.batcher: Batcher | None = None
        self.info: protocol.ModelInfo | None = None
        self.stats = ModelStats()
        self.draining = False
        self.inflight = 0  # requests admitted and not yet finished
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.rpcs = 0  # inference calls and streams whose handler has not returned
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain = asyncio.Event()
        self._m_inflight = metrics.INFLIGHT.labels(model=model_name)
        self._m_frames = metrics.FRAMES.labels(model=model_name)
        self._m_duration = metrics.REQUEST_DURATION.labels(model=model_name)
        self._m_ok = metrics.REQUESTS.labels(model=model_name, code=grpc.StatusCode.OK.name)

    async def wait_idle(self) -> None:
        """Return once no inference call or stream is open: every answer has been handed to
        gRPC (a stream's handler returns only after its last response was written)."""
        await self._idle.wait()

    def begin_drain(self) -> None:
        """Refuse new requests; open streams answer what they admitted and then end."""
        self.draining = True
        self._drain.set()

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.draining and self.batcher.healthy

    async def _admit(self, context: Context) -> None:
        """RESOURCE_EXHAUSTED when max_concurrent_rpcs calls and streams are open already."""
        if self.rpcs >= self.max_concurrent_rpcs:
            metrics.REQUESTS.labels(model=self.model_name, code="RESOURCE_EXHAUSTED").inc()
            await _abort(
                context,
                TooManyCalls(
                    f"{self.rpcs} calls and streams are open, the most this worker serves at "
                    f"once (--max-concurrent-rpcs {self.max_concurrent_rpcs}); retry later"
                ),
            )

    @contextlib.contextmanager
    def _rpc(self) -> Iterator[None]:
        """Count an inference call or stream from its start until its handler returns."""
        self.rpcs += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.rpcs -= 1
            if not self.rpcs:
                self._idle.set()

    def _serving(self) -> tuple[Batcher, protocol.ModelInfo]:
        if self.batcher is None or self.info is None or self.draining:
            raise NotReady("the worker is not ready (warming up or shutting down)")
        return self.batcher, self.info

    def _begin(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> asyncio.Future[Logits]:
        """Admit a request: count it in flight, check it, queue its frames. Returns the future
        of its logits, already failed if the request was refused; `_finish` must follow."""
        self._m_inflight.inc()
        self.inflight += 1
        try:
            if request is UNDECODABLE:
                raise InvalidInput("the request's bytes are not a valid ModelInferRequest")
            batcher, info = self._serving()
            frames = protocol.frames_from_request(info, request, batcher.settings.max_queue_size)
            return batcher.submit(frames, deadline)
        except Exception as exc:
            refused: asyncio.Future[Logits] = asyncio.get_running_loop().create_future()
            refused.set_exception(exc)
            return refused

    def _finish(
        self, request: pb.ModelInferRequest, started: float, future: asyncio.Future[Logits]
    ) -> pb.ModelInferResponse:
        """Book a finished request (in flight, metrics, statistics) and return its response;
        raises its error (CancelledError if the caller went away)."""
        self._m_inflight.dec()
        self.inflight -= 1
        elapsed = time.perf_counter() - started
        if future.cancelled():
            metrics.REQUESTS.labels(model=self.model_name, code="CANCELLED").inc()
            self.stats.record_request(False, elapsed)
            raise asyncio.CancelledError
        error = future.exception()
        if error is not None:
            code, _ = to_status(error)
            metrics.REQUESTS.labels(model=self.model_name, code=code.name).inc()
            self.stats.record_request(False, elapsed)
            raise error
        logits = future.result()
        self._m_ok.inc()
        self._m_frames.inc(logits.shape[0])
        self._m_duration.observe(elapsed)
        self.stats.record_request(True, elapsed)
        assert self.info is not None
        return protocol.infer_response(self.info, request.id, logits)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        await self._admit(context)
        with self._rpc():
            return await self._infer(request, context)

    async def _infer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        remaining = context.time_remaining()
        deadline = None if remaining is None else started + remaining
        future = self._begin(request, deadline)
        try:
            await future
        except asyncio.CancelledError:  # the call ended (deadline, client gone): future cancelled
            with contextlib.suppress(asyncio.CancelledError):
                self._finish(request, started, future)
            raise
        except Exception:
            pass  # _finish raises it again, after the bookkeeping
        try:
            return self._finish(request, started, future)
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; each response carries its request's id,
        in the order they finish. At most STREAM_WINDOW requests are admitted and unanswered;
        on drain the stream answers what it admitted and ends."""
        await self._admit(context)
        with self._rpc():
            async for item in self._stream(request_iterator, context):
                yield item

    async def _stream(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """No task per request: a callback queues each answer."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.perf_counter() + remaining
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        pending: set[asyncio.Future[Logits]] = set()
        reading = True

        def answer(
            request: pb.ModelInferRequest, started: float, future: asyncio.Future[Logits]
        ) -> None:
            pending.discard(future)
            try:
                response = self._finish(request, started, future)
                results.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except asyncio.CancelledError:
                pass  # the stream is gone
            except Exception as exc:
                code, message = _status(exc)
                failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                error = f"{code.name}: {message}"
                results.put_nowait(
                    pb.ModelStreamInferResponse(error_message=error, infer_response=failed)
                )
            if not reading and not pending:
                results.put_nowait(None)

        async def read() -> None:
            nonlocal reading
            try:
                requests = aiter(request_iterator)
                while True:
                    await window.acquire()  # room for one more unanswered request
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        break
                    started = time.perf_counter()
                    future = self._begin(request, deadline)
                    pending.add(future)
                    future.add_done_callback(functools.partial(answer, request, started))
            except asyncio.CancelledError:
                if not self._drain.is_set():
                    raise  # the stream is gone; draining only stops the reading
            finally:
                reading = False
                if not pending:
                    results.put_nowait(None)

        reader = asyncio.create_task(read())
        drain = asyncio.create_task(self._drain.wait())
        drain.add_done_callback(lambda _: reader.cancel())
        try:
            while (item := await results.get()) is not None:
                yield item  # resumes once gRPC has taken the message
                window.release()
            await reader  # surfaces a failure of the request stream itself
        finally:
            drain.cancel()
            reader.cancel()
            for future in list(pending):
                future.cancel()

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

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        """The one model this worker serves, so a client can find its name (`ready` filters)."""
        if request.ready and not self.ready:
            return pb.RepositoryIndexResponse()
        state = "READY" if self.ready else ("UNAVAILABLE" if self.draining else "LOADING")
        entry = pb.RepositoryIndexResponse.ModelIndex(
            name=self.model_name, version=self.version, state=state
        )
        return pb.RepositoryIndexResponse(models=[entry])

    def _info_or_placeholder(self) -> protocol.ModelInfo:
        """Name checks work while warming up: the model's name is known before its shapes."""
        return self.info or protocol.ModelInfo(self.model_name, image_size=0, num_classes=0)


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    code, message = to_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("request failed", exc_info=exc)
    return code, message


async def _abort(context: Context, exc: Exception) -> NoReturn:
    code, message = _status(exc)
    await context.abort(code, message)


async def _answer(context: Context, build: Callable[[], T]) -> T:
    """build()'s answer, or the call aborted with the status its exception maps to."""
    try:
        return build()
    except Exception as exc:
        await _abort(context, exc)
        raise  # unreachable: abort raises
