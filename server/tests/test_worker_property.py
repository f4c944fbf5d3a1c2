"""Random requests never crash the worker or leak a trace; it answers a good request afterwards."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from fleet_client.client import infer_request
from fleet_proto import inference_pb2 as pb
from fleet_proto import inference_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

tensors = st.builds(
    pb.ModelInferRequest.InferInputTensor,
    name=st.sampled_from(["frames", "FRAMES", "", "input0"]),
    datatype=st.sampled_from(["UINT8", "FP32", "INT64", "BYTES", "", "uint8"]),
    shape=st.lists(st.integers(-3, 40), max_size=5),
)
requests = st.builds(
    pb.ModelInferRequest,
    model_name=st.sampled_from(["tiny", "", "resnet18", "tiny "]),
    model_version=st.sampled_from(["", "1", "2", "latest"]),
    id=st.text(max_size=8),
    inputs=st.lists(tensors, max_size=3),
    outputs=st.lists(
        st.builds(
            pb.ModelInferRequest.InferRequestedOutputTensor,
            name=st.sampled_from(["logits", "probs"]),
        ),
        max_size=2,
    ),
    raw_input_contents=st.lists(
        st.one_of(st.binary(max_size=64), st.just(bytes(3 * 32 * 32 * 3))), max_size=3
    ),
)


def test_random_requests_get_clear_statuses_and_the_worker_serves_on(tiny_worker: Any) -> None:
    with grpc.insecure_channel(tiny_worker.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(request=requests)
        def answers_clearly(request: pb.ModelInferRequest) -> None:
            code, details = grpc.StatusCode.OK, "ok"
            try:
                stub.ModelInfer(request, timeout=30)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            assert code in ALLOWED, (code, details)
            assert details, "every error names its problem"
            assert "Traceback" not in details
            assert 'File "' not in details

        answers_clearly()
        good = infer_request("tiny", np.zeros((2, 32, 32, 3), np.uint8))
        reply = stub.ModelInfer(good, timeout=30)
    assert list(reply.outputs[0].shape) == [2, 1000]
