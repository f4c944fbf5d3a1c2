"""The built-in models (ResNet-18-style and tiny, seeded random weights) and loading model files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from fleet_spec.contract import BUILTIN_PREFIX, served_model_name
from torch import nn

SEED = 0
NUM_CLASSES = 1000


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.down(x))
        return result


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2015): 7x7 stem, four stages of two BasicBlocks, 1000 logits."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
        return logits


class TinyNet(nn.Module):
    """Four strided 3x3 convs and a linear head: about 0.37 GFLOP a 224x224 frame."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (32, 64, 128, 256):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(self.features(x)), 1))
        return logits


BUILTINS: dict[str, type[nn.Module]] = {"resnet18": ResNet18, "tiny": TinyNet}


class ModelLoadError(ValueError):
    """The model source cannot be loaded; the message says why."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the runner: `module` maps float NCHW frames to logits [N, classes]."""

    name: str
    module: nn.Module | torch.jit.ScriptModule
    traceable: bool  # a plain nn.Module the runner may jit.trace + freeze


def load_model(source: str) -> LoadedModel:
    """Build a builtin (seeded random weights) or load a TorchScript (.pt/.ts) or .pt2 file."""
    name = served_model_name(source)
    if source.startswith(BUILTIN_PREFIX):
        if name not in BUILTINS:
            raise ModelLoadError(f"unknown builtin model {source!r}; known: {sorted(BUILTINS)}")
        torch.manual_seed(SEED)
        return LoadedModel(name, BUILTINS[name]().eval(), traceable=True)
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"model file {source!r} does not exist")
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"{source}: not a torch.export program: {exc}") from exc
        return LoadedModel(name, program.module(), traceable=False)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream, but it is what many users have to ship.
            warnings.filterwarnings("ignore", "`torch.jit.load` is", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{source}: not a TorchScript file: {exc}") from exc
    return LoadedModel(name, scripted.eval(), traceable=False)
