"""The model runner: builtins, TorchScript and torch.export files via one path, pre-processing."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from fleet_server.models import ModelLoadError, ResNet18, TinyNet, load_model
from fleet_server.runner import ModelRunner, resolve_device, resolve_dtype
from fleet_spec.contract import served_model_name

Frames = Callable[..., npt.NDArray[np.uint8]]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def reference(module: torch.nn.Module, x: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """What a user expects: ImageNet-normalised float NCHW into the eager module."""
    tensor = torch.from_numpy(x.copy()).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out: npt.NDArray[np.float32] = module((tensor - MEAN) / STD).numpy()
    return out


def cpu_runner(source: str, size: int = 32) -> ModelRunner:
    torch.set_num_threads(1)
    return ModelRunner(
        load_model(source), device=torch.device("cpu"), dtype=torch.float32, image_size=size
    )


def seeded(cls: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def test_tiny_matches_the_eager_model_after_trace_and_freeze(frames: Frames) -> None:
    runner = cpu_runner("builtin:tiny")
    runner.warm_up(3)
    x = frames(3, seed=5)
    np.testing.assert_allclose(runner.infer([x]), reference(seeded(TinyNet), x), atol=1e-4)
    assert (runner.num_classes, runner.warmed_batch_size) == (1000, 3)


def test_resnet18_has_1000_outputs_and_fixed_weights(frames: Frames) -> None:
    x = frames(2, seed=1)
    first = cpu_runner("builtin:resnet18").infer([x])
    second = cpu_runner("builtin:resnet18").infer([x])
    assert first.shape == (2, 1000)
    assert first.dtype == np.float32
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, reference(seeded(ResNet18), x), rtol=1e-3, atol=1e-3)


def test_parts_are_concatenated_in_order(frames: Frames) -> None:
    runner = cpu_runner("builtin:tiny")
    a, b = frames(2, seed=1), frames(1, seed=2)
    together = runner.infer([np.concatenate([a, b])])
    np.testing.assert_allclose(runner.infer([a, b]), together, atol=1e-6)


def _torchscript_file(tmp_path: Path) -> Path:
    path = tmp_path / "scripted_tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; users still ship it
        torch.jit.save(torch.jit.script(seeded(TinyNet)), str(path))
    return path


def _export_file(tmp_path: Path) -> Path:
    path = tmp_path / "exported_tiny.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        seeded(TinyNet), (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("make", [_torchscript_file, _export_file])
def test_model_files_load_through_the_same_path(
    tmp_path: Path, frames: Frames, make: Callable[[Path], Path]
) -> None:
    path = make(tmp_path)
    runner = cpu_runner(str(path))
    runner.warm_up(4)
    x = frames(4, seed=9)
    np.testing.assert_allclose(runner.infer([x]), reference(seeded(TinyNet), x), atol=1e-4)
    assert runner.name == path.stem == served_model_name(str(path))
    assert runner.num_classes == 1000


def test_unloadable_sources_say_why(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown builtin model 'builtin:vgg'"):
        load_model("builtin:vgg")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a TorchScript file"):
        load_model(str(junk))


def test_cpu_runs_fp32_whatever_was_asked() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("fp16", cpu) is torch.float32
    assert resolve_dtype("bf16", cpu) is torch.float32
    with pytest.raises(ValueError, match="choose one of"):
        resolve_dtype("int8", cpu)
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto", worker_index=3).type == expected


@pytest.mark.parametrize("flag", ["copy_stream", "cuda_graphs"])
def test_cuda_only_options_are_refused_on_the_cpu(flag: str) -> None:
    with pytest.raises(ValueError, match="--copy-stream and --cuda-graphs need a CUDA device"):
        ModelRunner(
            load_model("builtin:tiny"),
            device=torch.device("cpu"),
            dtype=torch.float32,
            image_size=32,
            **{flag: True},
        )
