"""The model runner: device and precision, uint8 frames -> normalised tensor on the device,
the forward pass under inference_mode, and warm-up of every batch size. Knows no asyncio."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from fleet_proto.tensors import Frames, Logits

from fleet_server.models import LoadedModel

log = logging.getLogger(__name__)

# ImageNet statistics: normalised = (pixel / 255 - mean) / std = pixel * scale + shift.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP_RUNS = 3  # TorchScript's profiling executor specialises after its first runs of a shape


def resolve_device(spec: str, worker_index: int = 0) -> torch.device:
    """`auto` -> CUDA when present (worker i takes GPU i mod count), else CPU; or as given."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", worker_index % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype: the requested one on CUDA; always fp32 on CPU."""
    if precision not in _DTYPES:
        raise ValueError(f"--precision {precision!r}: choose one of {sorted(_DTYPES)}")
    if device.type != "cuda":
        if precision != "fp32":
            log.info("precision %s requested; the CPU runs fp32", precision)
        return torch.float32
    return _DTYPES[precision]


class ModelRunner:
    """Runs one model on one device; `infer` must be called from one thread at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: torch.device,
        dtype: torch.dtype,
        image_size: int,
        optimize: bool = True,
    ) -> None:
        self.name = loaded.name
        self.device = device
        self.dtype = dtype
        self.image_size = image_size
        self.num_classes = 0  # known after warm_up
        self.warmed_batch_size = 0
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # warm-up picks the kernels for each batch size
        module = loaded.module.to(device=device)
        if loaded.traceable:
            module = module.to(dtype=dtype).to(memory_format=torch.channels_last)
        elif dtype != torch.float32:
            module = module.to(dtype=dtype)
        self._forward: Callable[[torch.Tensor], torch.Tensor] = module
        if loaded.traceable and optimize:
            self._forward = self._trace_and_freeze(module)
        # Per-channel constants repeated along a row: a row of W*3 interleaved RGB values is then
        # normalised with long vectorised loops (a 3-wide broadcast is several times slower).
        row = image_size
        scale = torch.tensor([1 / (255 * s) for s in _STD], device=device).repeat(row)
        shift = torch.tensor([-m / s for m, s in zip(_MEAN, _STD, strict=True)], device=device)
        self._scale_row = scale.view(1, 1, row * 3)
        self._shift_row = shift.repeat(row).view(1, 1, row * 3)
        self._staging: torch.Tensor | None = None

    def _trace_and_freeze(self, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        example = torch.zeros(2, 3, self.image_size, self.image_size, device=self.device)
        example = example.to(dtype=self.dtype, memory_format=torch.channels_last)
        with warnings.catch_warnings(), torch.no_grad():
            # torch.jit is deprecated in favour of torch.compile/export, but trace + freeze is
            # the fastest CPU variant measured here (compile recompiles per batch size).
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
            frozen: Callable[[torch.Tensor], torch.Tensor] = torch.jit.freeze(traced.eval())
        return frozen

    def _stage(self, parts: Sequence[Frames], frames: int) -> torch.Tensor:
        """One copy of the request bytes into a reusable (pinned, on CUDA) uint8 buffer."""
        shape = (frames, self.image_size, self.image_size, 3)
        if self._staging is None or self._staging.shape[0] < frames:
            pin = self.device.type == "cuda"
            self._staging = torch.empty(
                (max(frames, 8), *shape[1:]), dtype=torch.uint8, pin_memory=pin
            )
        staging = self._staging[:frames]
        out = staging.numpy()
        start = 0
        for part in parts:
            out[start : start + part.shape[0]] = part
            start += part.shape[0]
        return staging

    def infer(self, parts: Sequence[Frames]) -> Logits:
        """uint8 frames [n_i, H, W, 3] (one array per request part) -> logits [sum n_i, classes]."""
        frames = sum(part.shape[0] for part in parts)
        staged = self._stage(parts, frames)
        size = self.image_size
        with torch.inference_mode():
            rows = staged.to(self.device, non_blocking=True).view(frames, size, size * 3).float()
            rows = rows.mul_(self._scale_row).add_(self._shift_row)
            # NHWC memory seen as NCHW: exactly the channels_last layout the model was traced in
            x = rows.view(frames, size, size, 3).permute(0, 3, 1, 2).to(self.dtype)
            logits = self._forward(x)
            result: Logits = logits.float().cpu().numpy()
        return result

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size up to max_batch_size so no request pays a first-shape cost."""
        size = self.image_size
        for batch in range(self.warmed_batch_size + 1, max_batch_size + 1):
            frames = np.zeros((batch, size, size, 3), dtype=np.uint8)
            for _ in range(WARMUP_RUNS):
                out = self.infer([frames])
            if out.ndim != 2 or out.shape[0] != batch:
                raise ValueError(
                    f"model {self.name!r} returned shape {list(out.shape)} for {batch} frames; "
                    "expected [batch, classes]"
                )
            self.num_classes = int(out.shape[1])
            self.warmed_batch_size = batch

    def gpu_memory_allocated(self) -> int | None:
        """Bytes of CUDA memory allocated on this runner's device, or None on CPU."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))
