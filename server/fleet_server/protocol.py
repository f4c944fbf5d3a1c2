"""Translation between Open Inference Protocol messages and numpy frames/logits: request
validation, responses, metadata, model config and statistics. Pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fleet_proto import inference_pb2 as pb
from fleet_proto.tensors import Frames, Logits
from fleet_spec.contract import BatchSettings

from fleet_server.errors import InvalidInput, ModelNotFound, TooLarge
from fleet_server.stats import Duration, ModelStats

INPUT_NAME = "frames"
OUTPUT_NAME = "logits"
VERSION = "1"
PLATFORM = "pytorch_libtorch"
SERVER_NAME = "inferencefleet"
EXTENSIONS = ("model_configuration", "statistics")
# Typed `uint_contents` are decoded value by value on the event loop: past this many values
# (about 28 frames of 224x224) a request must send raw_input_contents, which costs no decoding.
MAX_TYPED_VALUES = 1 << 22


@dataclass(frozen=True)
class ModelInfo:
    """What the protocol says about the served model."""

    name: str
    image_size: int
    num_classes: int
    on_gpu: bool = False

    @property
    def frame_bytes(self) -> int:
        return self.image_size * self.image_size * 3


def check_model(info: ModelInfo, name: str, version: str) -> None:
    """NOT_FOUND unless the request names this worker's model (and version 1 or none)."""
    if name != info.name:
        raise ModelNotFound(f"unknown model {name!r}; this worker serves {info.name!r}")
    if version not in ("", VERSION):
        raise ModelNotFound(
            f"unknown version {version!r} of model {info.name!r}; it has version {VERSION!r}"
        )


def frames_from_request(
    info: ModelInfo, request: pb.ModelInferRequest, max_frames: int | None = None
) -> Frames:
    """The request's uint8 frames [N, H, W, 3] (a view of its bytes), or InvalidInput/NotFound.
    More than `max_frames` (the queue's size: such a request can never queue) is TooLarge."""
    check_model(info, request.model_name, request.model_version)
    inputs = request.inputs
    if len(inputs) != 1:
        names = [tensor.name for tensor in inputs]
        raise InvalidInput(f"expected exactly one input {INPUT_NAME!r}, got {len(inputs)}: {names}")
    tensor = inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidInput(f"unknown input {tensor.name!r}; the model's input is {INPUT_NAME!r}")
    if tensor.datatype != "UINT8":
        raise InvalidInput(
            f"input {INPUT_NAME!r}: datatype {tensor.datatype!r} is not supported; expected UINT8"
        )
    shape = list(tensor.shape)
    size = info.image_size
    if len(shape) != 4 or shape[1:] != [size, size, 3]:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: shape {shape} does not match [-1, {size}, {size}, 3]"
        )
    count = shape[0]
    if count < 1:
        raise InvalidInput(f"input {INPUT_NAME!r}: empty batch (shape {shape})")
    if max_frames is not None and count > max_frames:
        raise TooLarge(
            f"input {INPUT_NAME!r}: {count} frames can never fit the queue of maxQueueSize "
            f"{max_frames} frames; send at most {max_frames} per request"
        )
    for wanted in request.outputs:
        if wanted.name != OUTPUT_NAME:
            raise InvalidInput(
                f"unknown output {wanted.name!r}; the model's output is {OUTPUT_NAME!r}"
            )
    expected = count * info.frame_bytes
    raw = request.raw_input_contents
    if len(raw) > 1:
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for 1 input")
    if raw:
        data = raw[0]
        if len(data) != expected:
            raise InvalidInput(
                f"input {INPUT_NAME!r}: {len(data)} bytes do not match shape {shape} "
                f"({expected} bytes of UINT8)"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(count, size, size, 3)
    if expected > MAX_TYPED_VALUES:
        raise TooLarge(
            f"input {INPUT_NAME!r}: {expected} values are too many for typed contents (at most "
            f"{MAX_TYPED_VALUES}); send the bytes in raw_input_contents"
        )
    values = tensor.contents.uint_contents
    if len(values) != expected:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: {len(values)} values in contents do not match shape {shape} "
            f"({expected} values); send the bytes in raw_input_contents"
        )
    array = np.fromiter(values, dtype=np.uint32, count=expected)
    if int(array.max(initial=0)) > 255:
        raise InvalidInput(f"input {INPUT_NAME!r}: UINT8 values must be 0..255")
    return array.astype(np.uint8).reshape(count, size, size, 3)


def infer_response(info: ModelInfo, request_id: str, logits: Logits) -> pb.ModelInferResponse:
    """Logits [N, classes] as one FP32 output in raw_output_contents."""
    output = pb.ModelInferResponse.InferOutputTensor(
        name=OUTPUT_NAME, datatype="FP32", shape=logits.shape
    )
    return pb.ModelInferResponse(
        model_name=info.name,
        model_version=VERSION,
        id=request_id,
        outputs=[output],
        raw_output_contents=[logits.tobytes()],
    )


def server_metadata(version: str) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=EXTENSIONS)


def model_metadata(info: ModelInfo) -> pb.ModelMetadataResponse:
    size = info.image_size
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=info.name,
        versions=[VERSION],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT_NAME, datatype="UINT8", shape=[-1, size, size, 3])],
        outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, info.num_classes])],
    )


def model_config(info: ModelInfo, settings: BatchSettings) -> pb.ModelConfigResponse:
    """Triton's ModelConfig: dims exclude the batch dimension because max_batch_size > 0."""
    size = info.image_size
    kind = pb.ModelInstanceGroup.KIND_GPU if info.on_gpu else pb.ModelInstanceGroup.KIND_CPU
    config = pb.ModelConfig(
        name=info.name,
        platform=PLATFORM,
        backend="pytorch",
        max_batch_size=settings.max_batch_size,
        input=[
            pb.ModelInput(
                name=INPUT_NAME,
                data_type=pb.TYPE_UINT8,
                format=pb.ModelInput.FORMAT_NHWC,
                dims=[size, size, 3],
            )
        ],
        output=[pb.ModelOutput(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[info.num_classes])],
        dynamic_batching=pb.ModelDynamicBatching(
            max_queue_delay_microseconds=settings.max_queue_delay_us,
            default_queue_policy=pb.ModelQueuePolicy(max_queue_size=settings.max_queue_size),
        ),
        instance_group=[pb.ModelInstanceGroup(count=1, kind=kind)],
    )
    return pb.ModelConfigResponse(config=config)


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(info: ModelInfo, stats: ModelStats) -> pb.ModelStatisticsResponse:
    with stats.lock:
        inference = pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=pb.StatisticDuration(count=stats.compute_infer.count, ns=0),
            compute_infer=_duration(stats.compute_infer),
            compute_output=pb.StatisticDuration(count=stats.compute_infer.count, ns=0),
        )
        batches = [
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=pb.StatisticDuration(count=b.compute_infer.count, ns=0),
                compute_infer=_duration(b.compute_infer),
                compute_output=pb.StatisticDuration(count=b.compute_infer.count, ns=0),
            )
            for size, b in sorted(stats.batches.items())
        ]
        model = pb.ModelStatistics(
            name=info.name,
            version=VERSION,
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
            inference_stats=inference,
            batch_stats=batches,
        )
    return pb.ModelStatisticsResponse(model_stats=[model])
