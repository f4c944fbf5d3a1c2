"""The worker contract: `inferencefleet serve` settings as one typed object and its argv both ways,
the batching settings with the CRD's bounds, the served model name and the health service name.

The operator's render, the local runner and `serve` itself all go through `WorkerSettings`, so
the command line is written in one place. Torch-free and gRPC-free: every runtime imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The gRPC service the worker reports in grpc.health.v1: NOT_SERVING until the model is warm,
# while draining, and while forward passes keep failing. "" is the whole server (liveness).
HEALTH_SERVICE = "inference.GRPCInferenceService"
BUILTIN_PREFIX = "builtin:"
ANY_HOST = "::"  # every address, IPv6 and IPv4 (dual-stack); 0.0.0.0 where there is no IPv6


def served_model_name(source: str, name: str | None = None) -> str:
    """The model name clients use: `name` if given, else the builtin's name, else the file's
    stem (builtin:tiny -> tiny, /models/detector.pt -> detector)."""
    if name:
        return name
    if source.startswith(BUILTIN_PREFIX):
        return source.removeprefix(BUILTIN_PREFIX)
    return Path(source).stem


class SettingsError(ValueError):
    """Settings that cannot be applied; the message names the key or flag."""


# The InferenceFleet CRD's spec.batching keys: the dataclass field each sets and its bounds.
# A test holds these against crds/inferencefleet.yaml.
BATCHING_KEYS: dict[str, tuple[str, int, int]] = {
    "maxBatchSize": ("max_batch_size", 1, 256),
    "maxQueueDelayMicroseconds": ("max_queue_delay_us", 0, 1_000_000),
    "maxQueueSize": ("max_queue_size", 1, 65_536),
}


@dataclass(frozen=True)
class BatchSettings:
    """How the dynamic batcher forms batches (fleet_server/batcher.py has the exact rule)."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    max_queue_size: int = 64

    def __post_init__(self) -> None:
        for key, (name, low, high) in BATCHING_KEYS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingsError(f"{key}: must be an integer, got {value!r}")
            if not low <= value <= high:
                raise SettingsError(f"{key}: must be between {low} and {high}, got {value}")
        if self.max_queue_size < self.max_batch_size:  # the CRD's CEL rule, enforced here too
            raise SettingsError(
                f"maxQueueSize: must be >= maxBatchSize ({self.max_batch_size}), "
                f"got {self.max_queue_size}"
            )

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    def to_mapping(self) -> dict[str, int]:
        """The CRD's keys: the worker's --batching-config document."""
        return {key: getattr(self, name) for key, (name, _, _) in BATCHING_KEYS.items()}

    @classmethod
    def from_mapping(cls, data: Any, base: BatchSettings | None = None) -> BatchSettings:
        """Settings from a mapping with the CRD's keys; a key it lacks keeps its value from
        `base`. A mapping nested under `batching:` (a spec fragment) is accepted too."""
        base = base if base is not None else cls()
        if isinstance(data, dict) and isinstance(data.get("batching"), dict):
            data = data["batching"]
        if data is None:
            return base
        if not isinstance(data, dict):
            raise SettingsError(f"batching settings: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(BATCHING_KEYS))
        if unknown:
            raise SettingsError(
                f"batching settings: unknown keys {unknown}; known: {sorted(BATCHING_KEYS)}"
            )
        values = {BATCHING_KEYS[key][0]: value for key, value in data.items()}
        return dataclasses.replace(base, **values)


def load_batching_file(path: Path, base: BatchSettings) -> BatchSettings:
    """Read a YAML or JSON batching settings file (JSON is YAML)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: cannot read batching settings: {exc}") from exc
    try:
        return BatchSettings.from_mapping(data, base)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from exc


PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything `inferencefleet serve` takes; `to_argv` and `from_argv` are inverses."""

    model: str
    model_name: str | None = None
    host: str = ANY_HOST
    port: int = 8001
    metrics_port: int = 8002
    workers: int = 1
    device: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    image_size: int = 224
    copy_stream: bool = False
    cuda_graphs: bool = False
    batching: BatchSettings = field(default_factory=BatchSettings)
    batching_config: Path | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    max_concurrent_rpcs: int = 1000
    grace_period_s: float = 30.0
    deregister_delay_s: float = 0.0
    watch_interval_s: float = 1.0
    worker_index: int = 0
    reuse_port: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("--model", bool(self.model), "must not be empty"),
            ("--port", 0 <= self.port <= 65535, "must be 0..65535"),
            ("--metrics-port", 0 <= self.metrics_port <= 65535, "must be 0..65535"),
            ("--workers", self.workers >= 1, "must be >= 1"),
            ("--workers", self.workers == 1 or self.port != 0, "> 1 needs a fixed --port"),
            ("--precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}"),
            ("--threads", self.threads is None or self.threads >= 1, "must be >= 1"),
            ("--image-size", self.image_size >= 8, "must be >= 8"),
            ("--max-message-bytes", self.max_message_bytes >= 1024, "must be >= 1024"),
            ("--max-concurrent-rpcs", self.max_concurrent_rpcs >= 1, "must be >= 1"),
            ("--grace-period-s", self.grace_period_s >= 0, "must be >= 0"),
            ("--deregister-delay-s", self.deregister_delay_s >= 0, "must be >= 0"),
            ("--watch-interval-s", self.watch_interval_s > 0, "must be > 0"),
            ("--worker-index", self.worker_index >= 0, "must be >= 0"),
        ]
        for flag, ok, text in checks:
            if not ok:
                raise SettingsError(f"{flag}: {text}")

    @property
    def served_name(self) -> str:
        return served_model_name(self.model, self.model_name)

    def to_argv(self) -> list[str]:
        """The `serve` arguments: --model, then every setting that differs from its default."""
        argv = ["--model", self.model]
        defaults = WorkerSettings(model=self.model)
        for spec in _FLAGS:
            value = spec.get(self)
            if value == spec.get(defaults):
                continue
            if isinstance(value, bool):
                argv.append(spec.flag)
            else:
                argv += [spec.flag, repr(value) if isinstance(value, float) else str(value)]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str]) -> WorkerSettings:
        """Parse `serve` arguments (exits with a usage error naming the flag, as argparse does)."""
        parser = build_parser()
        args = parser.parse_args(argv)
        values = {spec.name: getattr(args, spec.dest) for spec in _FLAGS}
        batching = {name: values.pop(name) for name in _BATCHING_FIELDS}
        try:
            return cls(model=args.model, batching=BatchSettings(**batching), **values)
        except SettingsError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


_BATCHING_FIELDS = tuple(name for name, _, _ in BATCHING_KEYS.values())


@dataclass(frozen=True)
class _Flag:
    """One `serve` flag: the WorkerSettings field it sets (batching's fields go one deeper)."""

    flag: str
    name: str
    kind: type
    help: str
    hidden: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def get(self, settings: WorkerSettings) -> Any:
        holder = settings.batching if self.name in _BATCHING_FIELDS else settings
        return getattr(holder, self.name)


_FLAGS = (
    _Flag("--model-name", "model_name", str, "the model's name in the protocol (default: derived)"),
    _Flag("--host", "host", str, "address to listen on (default :: = IPv6 and IPv4)"),
    _Flag("--port", "port", int, "gRPC port (default 8001; 0: any)"),
    _Flag("--metrics-port", "metrics_port", int, "Prometheus /metrics port (0 disables)"),
    _Flag("--workers", "workers", int, "processes sharing the gRPC port"),
    _Flag("--device", "device", str, "auto | cpu | cuda | cuda:N (default auto)"),
    _Flag("--precision", "precision", str, "fp32 | fp16 | bf16 on CUDA (the CPU runs fp32)"),
    _Flag("--threads", "threads", int, "torch threads per process (default: CPU quota/workers)"),
    _Flag("--image-size", "image_size", int, "input height = width (default 224)"),
    _Flag("--max-batch-size", "max_batch_size", int, "frames per forward pass at most"),
    _Flag("--max-queue-delay-us", "max_queue_delay_us", int, "longest wait for a fuller batch"),
    _Flag("--max-queue-size", "max_queue_size", int, "frames queued at most (then rejected)"),
    _Flag(
        "--batching-config",
        "batching_config",
        Path,
        "YAML/JSON file with maxBatchSize, maxQueueDelayMicroseconds, maxQueueSize; watched and "
        "applied live",
    ),
    _Flag(
        "--copy-stream",
        "copy_stream",
        bool,
        "CUDA: upload frames on a stream of their own (off by default: not measured faster)",
    ),
    _Flag(
        "--cuda-graphs",
        "cuda_graphs",
        bool,
        "CUDA: replay one CUDA graph per warmed batch size (off by default: not measured)",
    ),
    _Flag("--max-message-bytes", "max_message_bytes", int, "largest gRPC message"),
    _Flag(
        "--max-concurrent-rpcs",
        "max_concurrent_rpcs",
        int,
        "calls and streams served at once; more get RESOURCE_EXHAUSTED",
    ),
    _Flag("--grace-period-s", "grace_period_s", float, "drain time after SIGTERM (default 30)"),
    _Flag(
        "--deregister-delay-s",
        "deregister_delay_s",
        float,
        "after SIGTERM, report NOT_SERVING but go on serving this long before the drain, while "
        "Services stop routing new connections here (default 0; the operator's pods use 5)",
    ),
    _Flag("--watch-interval-s", "watch_interval_s", float, "", hidden=True),
    _Flag("--worker-index", "worker_index", int, "", hidden=True),
    _Flag("--reuse-port", "reuse_port", bool, "", hidden=True),
)


def build_parser() -> argparse.ArgumentParser:
    """The `inferencefleet serve` command line (defaults from WorkerSettings)."""
    parser = argparse.ArgumentParser(
        prog="inferencefleet serve",
        description="Serve a PyTorch vision model over the Open Inference Protocol (gRPC).",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="builtin:tiny, builtin:resnet18, or a TorchScript .pt/.ts or torch.export .pt2 file",
    )
    defaults = WorkerSettings(model="-")
    for spec in _FLAGS:
        text = argparse.SUPPRESS if spec.hidden else spec.help
        if spec.kind is bool:
            parser.add_argument(spec.flag, action="store_true", help=text)
        else:
            parser.add_argument(spec.flag, type=spec.kind, default=spec.get(defaults), help=text)
    return parser
