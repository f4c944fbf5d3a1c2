"""The load generator's retry policy, against a real gRPC server that fails calls on purpose."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from fleet_client.loadgen import channel_options

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def _calls(failures: list[grpc.StatusCode], retries: int) -> tuple[str, int]:
    """One ModelInfer call through a channel with `retries`; the server fails the first calls
    with `failures` in turn, then answers. Returns the outcome and the calls the server saw."""
    seen = 0

    async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        nonlocal seen
        seen += 1
        if seen <= len(failures):
            await context.abort(failures[seen - 1], "on purpose")
        return b"ok"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService",
                {"ModelInfer": grpc.unary_unary_rpc_method_handler(handler)},
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target, options=channel_options(True, retries)) as ch:
            call = ch.unary_unary(METHOD)
            try:
                reply = await call(b"", timeout=20)
            except grpc.aio.AioRpcError as error:
                return error.code().name, seen
            return reply.decode(), seen
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("failures", "retries", "expected"),
    [
        ([grpc.StatusCode.UNAVAILABLE], 0, ("UNAVAILABLE", 1)),
        ([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED], 2, ("ok", 3)),
        ([grpc.StatusCode.UNAVAILABLE] * 3, 2, ("UNAVAILABLE", 3)),
        ([grpc.StatusCode.RESOURCE_EXHAUSTED], 4, ("RESOURCE_EXHAUSTED", 1)),
        ([grpc.StatusCode.INVALID_ARGUMENT], 4, ("INVALID_ARGUMENT", 1)),
    ],
)
def test_retries_cover_unavailable_and_server_cancels_only(
    failures: list[grpc.StatusCode], retries: int, expected: tuple[str, int]
) -> None:
    assert asyncio.run(_calls(failures, retries)) == expected
