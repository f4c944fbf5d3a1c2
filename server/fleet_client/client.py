"""The Python client (grpc.aio) for one worker or several: inference, streaming, readiness,
metadata and grpc.health; several targets are balanced round-robin per call.

Usage:
    async with InferenceClient(["127.0.0.1:8001", "127.0.0.1:8011"]) as client:
        await client.wait_ready(within_s=60)
        logits = await client.infer("resnet18", frames)  # frames: uint8 [N, H, W, 3]

`deadline_s` is the call's gRPC deadline (the worker drops a request still queued when it
passes). Failed calls raise grpc.aio.AioRpcError (its .code() is the gRPC status). A stream
reports a failed request as StreamResult.error ("CODE: message") and carries on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from fleet_proto import inference_pb2 as pb
from fleet_proto import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet_client.targets import parse_targets

INPUT_NAME = "frames"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Logits = npt.NDArray[np.float32]


def infer_request(
    model: str, frames: npt.NDArray[np.uint8], request_id: str = ""
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying uint8 frames [N, H, W, 3] as raw bytes."""
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=INPUT_NAME, datatype="UINT8", shape=frames.shape
    )
    return pb.ModelInferRequest(
        model_name=model, id=request_id, inputs=[tensor], raw_input_contents=[frames.tobytes()]
    )


def logits_from_response(response: pb.ModelInferResponse) -> Logits:
    """The FP32 logits [N, classes] of a ModelInferResponse."""
    shape = tuple(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(shape)


@dataclass(frozen=True)
class StreamResult:
    """One answer on a stream: logits, or an error message ("CODE: message")."""

    request_id: str
    logits: Logits | None
    error: str = ""


class InferenceClient:
    """An async client for one or several workers (round-robin per call).

    `channels` > 1 opens that many independent connections (each balanced over the targets):
    `serve --workers N` shares one port via SO_REUSEPORT, which spreads connections, not calls.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        channels: int = 1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        target_list = [targets] if isinstance(targets, str) else list(targets)
        target = parse_targets(target_list).grpc_target
        options: list[tuple[str, str | int]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if channels > 1:
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._channels = [
            grpc.aio.insecure_channel(target, options=options) for _ in range(channels)
        ]
        self._stubs = [
            pb_grpc.GRPCInferenceServiceStub(c)  # type: ignore[no-untyped-call]
            for c in self._channels
        ]
        # The health stubs declare no methods on HealthStub, hence Any.
        self._health: list[Any] = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._next = itertools.cycle(range(channels))

    @property
    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        """The raw generated stub of the next channel (for calls this class does not wrap)."""
        return self._stubs[next(self._next)]

    async def __aenter__(self) -> InferenceClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def infer(
        self,
        model: str,
        frames: npt.NDArray[np.uint8],
        *,
        deadline_s: float | None = None,
        request_id: str = "",
    ) -> Logits:
        """Logits [N, classes] for uint8 frames [N, H, W, 3]."""
        response = await self.stub.ModelInfer(
            infer_request(model, frames, request_id), timeout=deadline_s
        )
        return logits_from_response(response)

    async def infer_raw(
        self, request: pb.ModelInferRequest, *, deadline_s: float | None = None
    ) -> pb.ModelInferResponse:
        """Send a prepared request (e.g. one built once and reused by a load generator)."""
        response: pb.ModelInferResponse = await self.stub.ModelInfer(request, timeout=deadline_s)
        return response

    async def stream(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        *,
        deadline_s: float | None = None,
    ) -> AsyncIterator[StreamResult]:
        """ModelStreamInfer: send `requests`, yield answers as they come (in completion order)."""
        call = self.stub.ModelStreamInfer(requests, timeout=deadline_s)
        async for answer in call:
            response = answer.infer_response
            if answer.error_message:
                yield StreamResult(response.id, None, answer.error_message)
            else:
                yield StreamResult(response.id, logits_from_response(response))

    async def server_live(self, deadline_s: float | None = None) -> bool:
        response = await self.stub.ServerLive(pb.ServerLiveRequest(), timeout=deadline_s)
        return bool(response.live)

    async def server_ready(self, deadline_s: float | None = None) -> bool:
        response = await self.stub.ServerReady(pb.ServerReadyRequest(), timeout=deadline_s)
        return bool(response.ready)

    async def model_ready(self, model: str, deadline_s: float | None = None) -> bool:
        response = await self.stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=deadline_s)
        return bool(response.ready)

    async def server_metadata(self, deadline_s: float | None = None) -> pb.ServerMetadataResponse:
        response: pb.ServerMetadataResponse = await self.stub.ServerMetadata(
            pb.ServerMetadataRequest(), timeout=deadline_s
        )
        return response

    async def model_metadata(
        self, model: str, deadline_s: float | None = None
    ) -> pb.ModelMetadataResponse:
        response: pb.ModelMetadataResponse = await self.stub.ModelMetadata(
            pb.ModelMetadataRequest(name=model), timeout=deadline_s
        )
        return response

    async def model_config(self, model: str, deadline_s: float | None = None) -> pb.ModelConfig:
        response: pb.ModelConfigResponse = await self.stub.ModelConfig(
            pb.ModelConfigRequest(name=model), timeout=deadline_s
        )
        return response.config

    async def repository_index(
        self, ready: bool = False, deadline_s: float | None = None
    ) -> list[tuple[str, str]]:
        """(name, state) of each model the server lists."""
        response: pb.RepositoryIndexResponse = await self.stub.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=ready), timeout=deadline_s
        )
        return [(m.name, m.state) for m in response.models]

    async def model_statistics(
        self, model: str = "", deadline_s: float | None = None
    ) -> pb.ModelStatisticsResponse:
        response: pb.ModelStatisticsResponse = await self.stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=deadline_s
        )
        return response

    async def health(self, service: str = "", deadline_s: float | None = None) -> str:
        """grpc.health.v1 status name: SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        stub = self._health[next(self._next)]
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=deadline_s
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def wait_ready(self, within_s: float = 60.0, service: str = "") -> None:
        """Poll grpc.health until SERVING; TimeoutError with the last answer after `within_s`."""
        deadline = time.monotonic() + within_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = await self.health(service, deadline_s=max(0.1, deadline - time.monotonic()))
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if last == "SERVING":
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"worker not SERVING after {within_s}s (last: {last})")
