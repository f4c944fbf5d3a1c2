"""The few Open Inference Protocol messages the load generator sends and reads, as bytes.

The benchmark encodes its requests once, up front, and sends bytes, so its hot path builds no
protobuf objects; it reads back only what it needs (a model's input shape, a stream's error
message). Encoding and decoding use the generated classes of our own inference.proto.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from fleet_proto import inference_pb2 as pb
from google.protobuf.message import DecodeError, Message

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_READY = f"/{SERVICE}/ServerReady"
MODEL_METADATA = f"/{SERVICE}/ModelMetadata"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
REPOSITORY_INDEX = f"/{SERVICE}/RepositoryIndex"
MODEL_CONFIG = f"/{SERVICE}/ModelConfig"

M = TypeVar("M", bound=Message)


class MessageError(ValueError):
    """A message that is not a valid protobuf message."""


def _parse(kind: type[M], data: bytes) -> M:
    try:
        return kind.FromString(data)
    except DecodeError as exc:
        raise MessageError(f"not a valid {kind.__name__}: {exc}") from exc


def encode_infer_request(
    model: str,
    input_name: str,
    datatype: str,
    shape: Sequence[int],
    raw: bytes,
    request_id: str = "",
) -> bytes:
    """A ModelInferRequest with one input whose data travels in raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model, id=request_id, raw_input_contents=[raw])
    request.inputs.add(name=input_name, datatype=datatype, shape=list(shape))
    return request.SerializeToString()


def encode_model_metadata_request(model: str) -> bytes:
    return pb.ModelMetadataRequest(name=model).SerializeToString()


def encode_model_config_request(model: str) -> bytes:
    return pb.ModelConfigRequest(name=model).SerializeToString()


def encode_repository_index_request() -> bytes:
    return pb.RepositoryIndexRequest(ready=True).SerializeToString()


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as ModelMetadata describes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def decode_model_metadata(data: bytes) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """(inputs, outputs) of a ModelMetadataResponse."""
    reply = _parse(pb.ModelMetadataResponse, data)

    def tensors(items: Sequence[pb.ModelMetadataResponse.TensorMetadata]) -> list[TensorInfo]:
        return [TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in items]

    return tensors(reply.inputs), tensors(reply.outputs)


def decode_server_ready(data: bytes) -> bool:
    return _parse(pb.ServerReadyResponse, data).ready


def decode_batching(data: bytes) -> tuple[int, int]:
    """(max_batch_size, max_queue_delay_microseconds) a ModelConfigResponse reports."""
    config = _parse(pb.ModelConfigResponse, data).config
    return config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds


def decode_repository_index(data: bytes) -> list[str]:
    """Model names a RepositoryIndexResponse lists."""
    return [m.name for m in _parse(pb.RepositoryIndexResponse, data).models]


def decode_raw_inputs(data: bytes) -> list[bytes]:
    """The raw_input_contents of an encoded ModelInferRequest."""
    return list(_parse(pb.ModelInferRequest, data).raw_input_contents)


def stream_error(data: bytes) -> str:
    """The error_message of a ModelStreamInferResponse ("" when it carries a result)."""
    return _parse(pb.ModelStreamInferResponse, data).error_message
