"""The load generator: pre-encoded requests sent by asyncio tasks over gRPC channels that
balance every call across all backends with gRPC's own round_robin policy (no proxy hop).

Cheap on purpose, because on a small machine it competes with the workers for CPU: requests
are encoded once, responses are not decoded (only a stream's error message is looked at),
and one event loop drives every in-flight call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Literal

import grpc
import grpc.aio

from fleet_client import channelz
from fleet_client.messages import (
    MODEL_INFER,
    MODEL_STREAM_INFER,
    SERVER_READY,
    decode_server_ready,
    stream_error,
)
from fleet_client.results import StepResult
from fleet_client.targets import TargetError, Targets

Mode = Literal["unary", "stream"]
_Unary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
_Stream = grpc.aio.StreamStreamMultiCallable[bytes, bytes]
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_ERROR_PAUSE_S = 0.01  # after a failed call: a dead backend must not turn the loop into a spin


class _StreamClosed(Exception):
    """The server ended a stream that the load generator still meant to use."""


def retry_service_config(attempts: int) -> str:
    """gRPC's retry policy for the inference service: a call that ends UNAVAILABLE (a worker
    draining or gone, a connection refused) or that a stopping server cancelled before any
    handler took it (grpc's server.stop() does that to calls still queued) is tried again, on
    whichever worker the balancer picks, up to `attempts` times in all. Inference calls are
    idempotent; a call the client itself cancels is never retried."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": "inference.GRPCInferenceService"}],
                    "retryPolicy": {
                        "maxAttempts": attempts,
                        "initialBackoff": "0.5s",
                        "maxBackoff": "4s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                    },
                }
            ]
        }
    )


def channel_options(local_pool: bool, retries: int = 0) -> list[tuple[str, int | str]]:
    """Channel options of the load generator; `retries` > 0 retries UNAVAILABLE calls that
    many more times (gRPC caps attempts at 5)."""
    retry: list[tuple[str, int | str]] = []
    if retries > 0:
        retry = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(1 + retries)),
        ]
    return [
        *retry,
        ("grpc.lb_policy_name", "round_robin"),
        # every channel gets connections of its own (several channels = several connections)
        ("grpc.use_local_subchannel_pool", 1 if local_pool else 0),
        # a restarted backend rejoins the rotation within seconds, not after gRPC's default
        # reconnect backoff (up to two minutes)
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


async def check_ready(target: str, timeout_s: float) -> None:
    """Fail fast, with the reason, when `target` does not answer ServerReady in time."""
    shown = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    async with grpc.aio.insecure_channel(target, options=channel_options(True)) as channel:
        call: _Unary = channel.unary_unary(SERVER_READY)
        try:
            # no wait_for_ready: a refused connection fails at once, a silent host at the deadline
            reply = await call(b"", timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"no answer within {timeout_s:g} s"
            else:
                reason = f"{exc.code().name}: {exc.details()}"
            raise TargetError(f"{shown} does not answer ({reason})") from exc
    if not decode_server_ready(reply):
        raise TargetError(f"{shown} answers but says it is not ready")


class LoadGenerator:
    """Runs measured steps of closed-loop load (each task keeps one request in flight)."""

    def __init__(
        self,
        targets: Targets,
        requests: Sequence[bytes],
        frames_per_request: int,
        *,
        mode: Mode = "unary",
        connections: int = 1,
        timeout_s: float = 30.0,
        retries: int = 0,
    ) -> None:
        if not requests:
            raise ValueError("no requests to send")
        self.targets = targets
        self.mode = mode
        self.completed = 0  # successful calls since start (warm-up included), for progress bars
        self._requests = list(requests)
        self._frames = frames_per_request
        self._timeout = timeout_s
        self._channels = [
            grpc.aio.insecure_channel(targets.grpc_target, options=channel_options(True, retries))
            for _ in range(max(1, connections))
        ]
        self._open_lock = asyncio.Lock()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def connect(self, timeout_s: float) -> None:
        """Wait until every channel has a ready connection."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(ch.channel_ready() for ch in self._channels)), timeout_s
            )
        except TimeoutError as exc:
            raise TargetError(
                f"{self.targets.grpc_target}: no connection within {timeout_s:g} s"
            ) from exc

    async def step(self, concurrency: int, warmup_s: float, duration_s: float) -> StepResult:
        """Warm up for `warmup_s`, then count what completes in the next `duration_s`."""
        result = StepResult(concurrency, duration_s, self._frames)
        start_at = time.perf_counter() + warmup_s
        end_at = start_at + duration_s
        worker = self._unary_task if self.mode == "unary" else self._stream_task
        tasks = [
            asyncio.create_task(worker(i, result, start_at, end_at)) for i in range(concurrency)
        ]
        await self._measure(result, start_at, end_at)
        await asyncio.gather(*tasks)
        return result

    async def _measure(self, result: StepResult, start_at: float, end_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        cpu0 = time.process_time()
        calls0 = channelz.subchannel_calls(self.targets.grpc_target)
        await asyncio.sleep(max(0.0, end_at - time.perf_counter()))
        result.client_cpu_s = time.process_time() - cpu0
        if self.mode == "unary":
            calls1 = channelz.subchannel_calls(self.targets.grpc_target)
            per_call = channelz.calls_delta(calls0, calls1, succeeded=True)
            result.per_target = {address: n * self._frames for address, n in per_call.items()}

    @staticmethod
    def _count_error(result: StepResult, code: str, now: float, start: float, end: float) -> None:
        if start <= now <= end:
            result.errors[code] = result.errors.get(code, 0) + 1

    async def _unary_task(self, index: int, result: StepResult, start: float, end: float) -> None:
        call: _Unary = self._channels[index % len(self._channels)].unary_unary(MODEL_INFER)
        requests, latencies, timeout = self._requests, result.latencies_s, self._timeout
        clock = time.perf_counter
        i = index
        while (t0 := clock()) < end:
            try:
                await call(requests[i % len(requests)], timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                self._count_error(result, exc.code().name, clock(), start, end)
                await asyncio.sleep(_ERROR_PAUSE_S)
                continue
            t1 = clock()
            self.completed += 1
            if start <= t1 <= end:
                latencies.append(t1 - t0)
            i += 1

    async def _open_stream(
        self, channel: grpc.aio.Channel
    ) -> tuple[grpc.aio.StreamStreamCall[bytes, bytes], str]:
        """A new stream and the backend it went to (found from channelz, one opening at a time)."""
        async with self._open_lock:
            before = channelz.subchannel_calls(self.targets.grpc_target)
            opener: _Stream = channel.stream_stream(MODEL_STREAM_INFER)
            call = opener()
            await call.write(self._requests[0])
            reply = await call.read()
            after = channelz.subchannel_calls(self.targets.grpc_target)
        if reply is grpc.aio.EOF:
            raise _StreamClosed
        opened = channelz.calls_delta(before, after, succeeded=False)
        return call, (next(iter(opened)) if len(opened) == 1 else "?")

    async def _stream_task(self, index: int, result: StepResult, start: float, end: float) -> None:
        channel = self._channels[index % len(self._channels)]
        requests, latencies, frames = self._requests, result.latencies_s, self._frames
        clock = time.perf_counter
        i = index
        call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None
        address = "?"
        try:
            while (t0 := clock()) < end:
                try:
                    if call is None:
                        call, address = await self._open_stream(channel)
                        t0 = clock()
                    await call.write(requests[i % len(requests)])
                    reply = await call.read()
                except (grpc.aio.AioRpcError, _StreamClosed) as exc:
                    code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "CLOSED"
                    self._count_error(result, code, clock(), start, end)
                    call = None
                    await asyncio.sleep(_ERROR_PAUSE_S)
                    continue
                t1 = clock()
                if not isinstance(reply, bytes):  # grpc.aio.EOF: the server ended the stream
                    self._count_error(result, "CLOSED", t1, start, end)
                    call = None
                    continue
                i += 1
                if reply[:1] == b"\n":  # field 1, error_message, comes first when set
                    self._count_error(result, f"STREAM:{stream_error(reply)[:40]}", t1, start, end)
                    continue
                self.completed += 1
                if start <= t1 <= end:
                    latencies.append(t1 - t0)
                    result.per_target[address] = result.per_target.get(address, 0) + frames
        finally:
            if call is not None:
                await _finish(call)


async def _finish(call: grpc.aio.StreamStreamCall[bytes, bytes]) -> None:
    """Half-close a stream and let the server end it (a broken one is just dropped)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.done_writing()
        await call.read()
