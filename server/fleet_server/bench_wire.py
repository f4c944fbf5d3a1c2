"""The few Open Inference Protocol messages the load generator needs, encoded by hand on the wire.

The benchmark sends pre-encoded request bytes and decodes only what it reads (a model's input
shape, a stream's error message), so its hot path builds no protobuf objects, and it imports
no generated code: it works against any KServe v2 / Triton gRPC server, and it never clashes
with another set of generated classes for the same proto names in one process.
Field numbers follow the published protocol (grpc_service.proto).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SERVICE = "inference.GRPCInferenceService"
SERVER_READY = f"/{SERVICE}/ServerReady"
MODEL_METADATA = f"/{SERVICE}/ModelMetadata"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
REPOSITORY_INDEX = f"/{SERVICE}/RepositoryIndex"

_VARINT = 0
_FIXED64 = 1
_LENGTH = 2
_FIXED32 = 5

Fields = dict[int, list[int | bytes]]


class WireError(ValueError):
    """A message that is not valid protobuf wire format."""


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LENGTH) + _varint(len(payload)) + payload


def _string_field(field: int, text: str) -> bytes:
    return _bytes_field(field, text.encode()) if text else b""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = 0
    value = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 64 bits")


def decode_fields(data: bytes) -> Fields:
    """Top-level fields of one message: number -> values (int for varints, bytes otherwise)."""
    fields: Fields = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _LENGTH:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise WireError("truncated length-delimited field")
            value, pos = data[pos : pos + size], pos + size
        elif wire_type == _FIXED64:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == _FIXED32:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def _first_text(fields: Fields, number: int) -> str:
    for value in fields.get(number, []):
        if isinstance(value, bytes):
            return value.decode(errors="replace")
    return ""


def _int64s(values: Sequence[int | bytes]) -> list[int]:
    """A repeated int64, packed or not, as signed integers."""
    out: list[int] = []
    for value in values:
        if isinstance(value, int):
            out.append(value)
            continue
        pos = 0
        while pos < len(value):
            item, pos = _read_varint(value, pos)
            out.append(item)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in out]


def encode_infer_request(
    model: str,
    input_name: str,
    datatype: str,
    shape: Sequence[int],
    raw: bytes,
    request_id: str = "",
) -> bytes:
    """A ModelInferRequest with one input whose data travels in raw_input_contents."""
    packed_shape = b"".join(_varint(dim) for dim in shape)
    tensor = (
        _string_field(1, input_name) + _string_field(2, datatype) + _bytes_field(3, packed_shape)
    )
    return (
        _string_field(1, model)
        + _string_field(3, request_id)
        + _bytes_field(5, tensor)
        + _bytes_field(7, raw)
    )


def encode_model_metadata_request(model: str) -> bytes:
    return _string_field(1, model)


def encode_repository_index_request() -> bytes:
    return _key(2, _VARINT) + _varint(1)  # ready = true


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as ModelMetadata describes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def decode_model_metadata(data: bytes) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """(inputs, outputs) of a ModelMetadataResponse."""
    fields = decode_fields(data)

    def tensors(number: int) -> list[TensorInfo]:
        out = []
        for raw in fields.get(number, []):
            if isinstance(raw, bytes):
                sub = decode_fields(raw)
                shape = tuple(_int64s(sub.get(3, [])))
                out.append(TensorInfo(_first_text(sub, 1), _first_text(sub, 2), shape))
        return out

    return tensors(4), tensors(5)


def decode_server_ready(data: bytes) -> bool:
    return any(value == 1 for value in decode_fields(data).get(1, []))


def decode_repository_index(data: bytes) -> list[str]:
    """Model names a RepositoryIndexResponse lists."""
    names = []
    for raw in decode_fields(data).get(1, []):
        if isinstance(raw, bytes):
            names.append(_first_text(decode_fields(raw), 1))
    return names


def stream_error(data: bytes) -> str:
    """The error_message of a ModelStreamInferResponse ("" when it carries a result)."""
    return _first_text(decode_fields(data), 1)
