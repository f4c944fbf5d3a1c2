"""Benchmark payloads: random frames and image files, resized to the model input, encoded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fleet_client.frames import FramesError, build_requests, request_shape
from fleet_client.messages import TensorInfo, decode_raw_inputs
from PIL import Image

FRAMES = TensorInfo("frames", "UINT8", (-1, 32, 48, 3))


def _raw(request: bytes) -> bytes:
    (raw,) = decode_raw_inputs(request)
    return raw


def test_random_frames_fill_the_input_shape() -> None:
    requests = build_requests("tiny", FRAMES, batch=2, distinct=3)
    assert len(requests) == 3
    assert {len(_raw(r)) for r in requests} == {2 * 32 * 48 * 3}
    assert len({_raw(r) for r in requests}) == 3  # different data per request


def test_image_files_are_resized_to_the_input(tmp_path: Path) -> None:
    red = tmp_path / "red.png"
    Image.new("RGB", (100, 60), (255, 0, 0)).save(red)
    gray = tmp_path / "gray.jpg"
    Image.new("L", (20, 20), 128).save(gray)
    requests = build_requests("tiny", FRAMES, batch=1, images=[red, gray])
    assert len(requests) == 2
    first = np.frombuffer(_raw(requests[0]), np.uint8).reshape(32, 48, 3)
    assert (first == [255, 0, 0]).all()
    second = np.frombuffer(_raw(requests[1]), np.uint8).reshape(32, 48, 3)
    assert abs(int(second.mean()) - 128) <= 2


def test_dynamic_dimensions_need_an_image_size(tmp_path: Path) -> None:
    dynamic = TensorInfo("frames", "UINT8", (-1, -1, -1, 3))
    assert request_shape(dynamic, 4, 64) == (4, 64, 64, 3)
    with pytest.raises(FramesError, match="--image-size"):
        request_shape(dynamic, 1, None)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(FramesError, match="cannot read image"):
        build_requests("tiny", FRAMES, batch=1, images=[broken])
