"""Request payloads for the benchmark: random frames or image files, encoded once up front."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fleet_client.messages import TensorInfo, encode_infer_request

_NUMPY_TYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16, "INT8": np.int8}


class FramesError(ValueError):
    """Frames cannot be made for this model input (the message says why)."""


def request_shape(tensor: TensorInfo, batch: int, image_size: int | None) -> tuple[int, ...]:
    """The concrete shape of one request: the batch dimension set to `batch`, dynamic image
    dimensions set to `image_size`."""
    if not tensor.shape or tensor.shape[0] not in (-1, batch):
        raise FramesError(f"input {tensor.name!r} has no batch dimension: shape {tensor.shape}")
    rest = []
    for dim in tensor.shape[1:]:
        if dim >= 0:
            rest.append(dim)
        elif image_size is not None:
            rest.append(image_size)
        else:
            raise FramesError(
                f"input {tensor.name!r} has dynamic shape {list(tensor.shape)}: pass --image-size"
            )
    return (batch, *rest)


def random_frames(tensor: TensorInfo, shape: Sequence[int], seed: int) -> bytes:
    dtype = _NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise FramesError(f"input {tensor.name!r}: datatype {tensor.datatype} is not supported")
    rng = np.random.default_rng(seed)
    if dtype is np.uint8:
        return rng.integers(0, 256, size=tuple(shape), dtype=np.uint8).tobytes()
    return rng.standard_normal(size=tuple(shape)).astype(dtype).tobytes()


def image_frames(paths: Sequence[Path], shape: Sequence[int]) -> list[bytes]:
    """Each file decoded to RGB and resized to the input's height and width (uint8 HWC)."""
    from PIL import Image  # imported here: only image benchmarks need it

    if len(shape) != 4 or shape[3] != 3:
        raise FramesError(f"image files need an input of shape [N, H, W, 3], not {list(shape)}")
    height, width = shape[1], shape[2]
    frames = []
    for path in paths:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
                frames.append(np.asarray(rgb, dtype=np.uint8).tobytes())
        except OSError as exc:
            raise FramesError(f"cannot read image {path}: {exc}") from exc
    if not frames:
        raise FramesError("no image files given")
    return frames


def build_requests(
    model: str,
    tensor: TensorInfo,
    batch: int,
    *,
    image_size: int | None = None,
    images: Sequence[Path] = (),
    distinct: int = 8,
) -> list[bytes]:
    """Pre-encoded ModelInferRequest messages, cycled through by the load generator."""
    shape = request_shape(tensor, batch, image_size)
    if images:
        if tensor.datatype != "UINT8":
            raise FramesError(
                f"image files need a UINT8 input, {tensor.name!r} is {tensor.datatype}"
            )
        frames = image_frames(images, shape)
        count = max(1, len(frames) // batch)
        payloads = [
            b"".join(frames[(i * batch + j) % len(frames)] for j in range(batch))
            for i in range(count)
        ]
    else:
        payloads = [random_frames(tensor, shape, seed) for seed in range(distinct)]
    return [
        encode_infer_request(model, tensor.name, tensor.datatype, shape, payload)
        for payload in payloads
    ]
