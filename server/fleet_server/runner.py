"""The model runner: device and precision, uint8 frames -> normalised tensor on the device,
the forward pass under inference_mode, and warm-up of every batch size. Knows no asyncio."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class _Graph:
    """A captured forward: copy frames into `frames`, replay, read `logits`."""

    graph: torch.cuda.CUDAGraph
    frames: torch.Tensor
    logits: torch.Tensor


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
        copy_stream: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        if (copy_stream or cuda_graphs) and device.type != "cuda":
            raise ValueError("--copy-stream and --cuda-graphs need a CUDA device")
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
        # CUDA only, both off unless asked for (not measured faster on every GPU and model):
        # the upload on a stream of its own, so that it overlaps work already queued on the
        # compute stream (another worker's on a shared GPU, or a pipelined caller's); and one
        # CUDA graph per warmed batch size, replayed instead of launching every kernel from Python.
        self._copy_stream = torch.cuda.Stream(device) if copy_stream else None  # type: ignore[no-untyped-call]
        self._graphs: dict[int, _Graph] | None = {} if cuda_graphs else None
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None  # one pool for all

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

    def _compute(self, uploaded: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, 3] on the device -> logits [n, classes] on the device."""
        frames, size = uploaded.shape[0], self.image_size
        rows = uploaded.view(frames, size, size * 3).float()
        rows = rows.mul_(self._scale_row).add_(self._shift_row)
        # NHWC memory seen as NCHW: exactly the channels_last layout the model was traced in
        x = rows.view(frames, size, size, 3).permute(0, 3, 1, 2).to(self.dtype)
        return self._forward(x)

    def _upload(self, staged: torch.Tensor) -> torch.Tensor:
        if self._copy_stream is None:
            return staged.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            uploaded = staged.to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)
        uploaded.record_stream(compute)  # its memory is not reused before the forward used it
        return uploaded

    def infer(self, parts: Sequence[Frames]) -> Logits:
        """uint8 frames [n_i, H, W, 3] (one array per request part) -> logits [sum n_i, classes]."""
        frames = sum(part.shape[0] for part in parts)
        staged = self._stage(parts, frames)
        with torch.inference_mode():
            graph = self._graphs.get(frames) if self._graphs is not None else None
            if graph is not None:
                graph.frames.copy_(staged, non_blocking=True)
                graph.graph.replay()
                logits = graph.logits
            else:
                logits = self._compute(self._upload(staged))
            result: Logits = logits.float().cpu().numpy()
        return result

    def _capture(self, batch: int) -> None:
        """Record the forward of `batch` frames as a CUDA graph (after warm-up picked kernels);
        a batch size that cannot be captured keeps running eagerly."""
        assert self._graphs is not None
        size = self.image_size
        frames = torch.zeros((batch, size, size, 3), dtype=torch.uint8, device=self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # as torch's docs ask: a warm-up off the default
                    self._compute(frames)
                torch.cuda.current_stream(self.device).wait_stream(side)
                with torch.cuda.graph(graph, pool=self._pool):
                    logits = self._compute(frames)
        except RuntimeError as exc:
            log.warning("batch size %d: no CUDA graph (%s); it runs eagerly", batch, exc)
            return
        self._graphs[batch] = _Graph(graph, frames, logits)

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
            if self._graphs is not None:
                self._capture(batch)
            self.warmed_batch_size = batch

    @property
    def graph_batch_sizes(self) -> list[int]:
        """Batch sizes replayed from a CUDA graph (none unless cuda_graphs was asked for)."""
        return sorted(self._graphs or {})

    def gpu_memory_allocated(self) -> int | None:
        """Bytes of CUDA memory allocated on this runner's device, or None on CPU."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))
