"""Protocol mapping: request validation messages, responses, config, and the error->code map."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from fleet_client.client import infer_request, logits_from_response
from fleet_proto import inference_pb2 as pb
from fleet_server import protocol
from fleet_server.errors import (
    INTERNAL_MESSAGE,
    DeadlineExpired,
    InvalidInput,
    ModelNotFound,
    NotReady,
    QueueFull,
    TooLarge,
    to_status,
)
from fleet_spec.contract import HEALTH_SERVICE, BatchSettings

INFO = protocol.ModelInfo("tiny", image_size=4, num_classes=10)


def good(count: int = 2) -> pb.ModelInferRequest:
    return infer_request("tiny", np.arange(count * 48, dtype=np.uint8).reshape(count, 4, 4, 3))


def test_good_request_gives_a_view_of_its_frames() -> None:
    frames = protocol.frames_from_request(INFO, good())
    assert frames.shape == (2, 4, 4, 3)
    assert frames.dtype == np.uint8
    assert frames[1, 0, 0, 0] == 48


def test_contents_instead_of_raw_bytes_are_accepted() -> None:
    request = good(1)
    values = list(request.raw_input_contents[0])
    del request.raw_input_contents[:]
    request.inputs[0].contents.uint_contents.extend(values)
    assert protocol.frames_from_request(INFO, request).reshape(-1).tolist() == values


def _mutated(change: str) -> pb.ModelInferRequest:
    request = good()
    tensor = request.inputs[0]
    if change == "datatype":
        tensor.datatype = "FP32"
    elif change == "shape":
        tensor.shape[:] = [2, 4, 5, 3]
    elif change == "rank":
        tensor.shape[:] = [2, 48]
    elif change == "bytes":
        request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    elif change == "empty":
        tensor.shape[0] = 0
        request.raw_input_contents[0] = b""
    elif change == "missing":
        del request.inputs[:]
    elif change == "extra":
        request.inputs.add(name="other", datatype="UINT8", shape=[1])
    elif change == "name":
        tensor.name = "images"
    elif change == "output":
        request.outputs.add(name="probabilities")
    elif change == "two_raw":
        request.raw_input_contents.append(b"x")
    return request


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("datatype", "datatype 'FP32' is not supported; expected UINT8"),
        ("shape", "shape [2, 4, 5, 3] does not match [-1, 4, 4, 3]"),
        ("rank", "shape [2, 48] does not match"),
        ("bytes", "95 bytes do not match shape [2, 4, 4, 3] (96 bytes of UINT8)"),
        ("empty", "empty batch"),
        ("missing", "expected exactly one input 'frames', got 0"),
        ("extra", "got 2: ['frames', 'other']"),
        ("name", "unknown input 'images'"),
        ("output", "unknown output 'probabilities'"),
        ("two_raw", "raw_input_contents has 2 entries for 1 input"),
    ],
)
def test_bad_requests_name_the_problem(change: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        protocol.frames_from_request(INFO, _mutated(change))
    assert message in str(caught.value)
    assert to_status(caught.value)[0] is grpc.StatusCode.INVALID_ARGUMENT


def test_requests_that_can_never_be_served_are_invalid_before_decoding() -> None:
    request = good()
    request.inputs[0].shape[0] = 9
    with pytest.raises(TooLarge, match="9 frames can never fit the queue of maxQueueSize 8"):
        protocol.frames_from_request(INFO, request, max_frames=8)
    typed = good()
    del typed.raw_input_contents[:]
    frames = protocol.MAX_TYPED_VALUES // INFO.frame_bytes + 1
    typed.inputs[0].shape[0] = frames
    typed.inputs[0].contents.uint_contents.extend([0] * 16)  # the count alone refuses it
    with pytest.raises(TooLarge, match="too many for typed contents") as caught:
        protocol.frames_from_request(INFO, typed)
    assert to_status(caught.value)[0] is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("name", "version"), [("resnet50", ""), ("tiny", "2")])
def test_unknown_model_or_version_is_not_found(name: str, version: str) -> None:
    request = good()
    request.model_name, request.model_version = name, version
    with pytest.raises(ModelNotFound, match="unknown"):
        protocol.frames_from_request(INFO, request)


def test_every_error_maps_to_its_code_and_internal_errors_leak_nothing() -> None:
    assert to_status(InvalidInput("x"))[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(ModelNotFound("x"))[0] is grpc.StatusCode.NOT_FOUND
    assert to_status(QueueFull("x"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert to_status(NotReady("x"))[0] is grpc.StatusCode.UNAVAILABLE
    assert to_status(DeadlineExpired("x"))[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    code, message = to_status(RuntimeError("secret path /etc/passwd"))
    assert code is grpc.StatusCode.INTERNAL
    assert message == INTERNAL_MESSAGE
    assert "passwd" not in message


def test_response_round_trips_through_the_client() -> None:
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    response = protocol.infer_response(INFO, "req-7", logits)
    assert response.id == "req-7"
    assert response.outputs[0].name == "logits"
    assert response.outputs[0].datatype == "FP32"
    np.testing.assert_array_equal(logits_from_response(response), logits)


def test_model_config_is_what_perf_analyzer_parses() -> None:
    config = protocol.model_config(INFO, BatchSettings(max_batch_size=6)).config
    assert config.max_batch_size == 6
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("frames", pb.TYPE_UINT8, [4, 4, 3])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", pb.TYPE_FP32, [10])
    ]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64


def test_field_numbers_follow_the_published_protocol() -> None:
    fields = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert {name: fields[name].number for name in fields} == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    assert pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number == 6
    assert pb.ModelConfig.DESCRIPTOR.fields_by_name["max_batch_size"].number == 4
    assert pb.ModelConfig.DESCRIPTOR.fields_by_name["dynamic_batching"].number == 11
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService" == HEALTH_SERVICE
    assert service.methods_by_name["ModelStreamInfer"].output_type.name == (
        "ModelStreamInferResponse"
    )
