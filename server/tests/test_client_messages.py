"""The benchmark's pre-encoded protocol messages, read back as the worker reads them."""

from __future__ import annotations

import pytest
from fleet_client.messages import (
    MessageError,
    decode_batching,
    decode_model_metadata,
    decode_repository_index,
    decode_server_ready,
    encode_infer_request,
    encode_model_config_request,
    encode_model_metadata_request,
    stream_error,
)
from fleet_proto import inference_pb2 as pb


def test_infer_request_decodes_as_model_infer_request() -> None:
    raw = bytes(range(256)) * 3
    data = encode_infer_request("tiny", "frames", "UINT8", [1, 16, 16, 3], raw, request_id="r7")
    message = pb.ModelInferRequest.FromString(data)
    assert message.model_name == "tiny"
    assert message.id == "r7"
    assert [(t.name, t.datatype, list(t.shape)) for t in message.inputs] == [
        ("frames", "UINT8", [1, 16, 16, 3])
    ]
    assert list(message.raw_input_contents) == [raw]


def test_model_metadata_request_and_response() -> None:
    assert pb.ModelMetadataRequest.FromString(encode_model_metadata_request("resnet18")).name == (
        "resnet18"
    )
    reply = pb.ModelMetadataResponse(name="tiny", versions=["1"], platform="pytorch")
    reply.inputs.add(name="frames", datatype="UINT8", shape=[-1, 64, 64, 3])
    reply.outputs.add(name="logits", datatype="FP32", shape=[-1, 10])
    inputs, outputs = decode_model_metadata(reply.SerializeToString())
    assert [(t.name, t.datatype, t.shape) for t in inputs] == [("frames", "UINT8", (-1, 64, 64, 3))]
    assert [(t.name, t.shape) for t in outputs] == [("logits", (-1, 10))]


def test_server_ready_and_stream_error() -> None:
    assert decode_server_ready(pb.ServerReadyResponse(ready=True).SerializeToString())
    assert not decode_server_ready(pb.ServerReadyResponse(ready=False).SerializeToString())
    failed = pb.ModelStreamInferResponse(error_message="queue full")
    assert stream_error(failed.SerializeToString()) == "queue full"
    ok = pb.ModelStreamInferResponse()
    ok.infer_response.model_name = "tiny"
    assert stream_error(ok.SerializeToString()) == ""


def test_repository_index_names() -> None:
    # RepositoryIndexResponse { repeated ModelIndex models = 1 { string name = 1; ... } }
    data = b"\x0a\x06\x0a\x04tiny" + b"\x0a\x0a\x0a\x08resnet18"
    assert decode_repository_index(data) == ["tiny", "resnet18"]


def test_truncated_message_is_an_error() -> None:
    data = encode_infer_request("tiny", "frames", "UINT8", [1, 2, 2, 3], b"x" * 12)
    with pytest.raises(MessageError):
        decode_model_metadata(data[:-3])


def test_batching_is_read_back_from_a_model_config_response() -> None:
    config = pb.ModelConfig(
        name="tiny",
        max_batch_size=16,
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=750),
    )
    reply = pb.ModelConfigResponse(config=config).SerializeToString()
    assert decode_batching(reply) == (16, 750)
    assert pb.ModelConfigRequest.FromString(encode_model_config_request("tiny")).name == "tiny"
    with pytest.raises(MessageError):
        decode_batching(b"\xff\xff")
