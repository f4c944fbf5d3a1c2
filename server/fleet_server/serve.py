"""`inferencefleet serve`: command-line flags, per-process thread sizing, and `--workers N`
(N processes on one port via SO_REUSEPORT, supervised here, metrics summed on one port)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from fleet_server.models import BUILTIN_PREFIX, ModelLoadError, default_name
from fleet_server.settings import BatchSettings, SettingsError

log = logging.getLogger("fleet_server.serve")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inferencefleet serve",
        description="Serve a PyTorch vision model over the Open Inference Protocol (gRPC).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="builtin:tiny, builtin:resnet18, or a TorchScript .pt/.ts or torch.export .pt2 file",
    )
    p.add_argument("--model-name", help="the model's name in the protocol (default: derived)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001; 0: any)")
    p.add_argument(
        "--metrics-port", type=int, default=8002, help="Prometheus /metrics port (0 disables)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes sharing the gRPC port")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="compute precision on CUDA (the CPU always runs fp32)",
    )
    p.add_argument(
        "--threads", type=int, help="torch intra-op threads per process (default: cores/workers)"
    )
    p.add_argument("--image-size", type=int, default=224, help="input height = width (default 224)")
    defaults = BatchSettings()
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us)
    p.add_argument("--max-queue-size", type=int, default=defaults.max_queue_size)
    p.add_argument(
        "--batching-config",
        type=Path,
        help="YAML/JSON file with maxBatchSize, maxQueueDelayMicroseconds, maxQueueSize; "
        "watched and applied live",
    )
    p.add_argument(
        "--copy-stream",
        action="store_true",
        help="CUDA: upload frames on a stream of their own (off by default: not measured faster)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="CUDA: replay one CUDA graph per warmed batch size (off by default: not measured)",
    )
    p.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument(
        "--grace-period-s", type=float, default=30.0, help="drain time after SIGTERM (default 30)"
    )
    p.add_argument("--watch-interval-s", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BatchSettings:
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.workers > 1 and args.port == 0:
        parser.error("--workers > 1 needs a fixed --port (the processes share it)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.image_size < 8:
        parser.error("--image-size must be >= 8")
    if not args.model.startswith(BUILTIN_PREFIX) and not Path(args.model).is_file():
        parser.error(f"--model {args.model!r}: no such file")
    try:
        return BatchSettings(args.max_batch_size, args.max_queue_delay_us, args.max_queue_size)
    except SettingsError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = _check(args, parser)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    if args.workers > 1:
        return _supervise(args, threads)
    return _serve_one(args, settings, threads)


def _die_with_parent() -> None:
    """A supervised worker gets SIGTERM (and drains) if its supervisor dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the supervisor (no prctl)")


def _serve_one(args: argparse.Namespace, settings: BatchSettings, threads: int) -> int:
    # Idle OpenMP threads sleep instead of spinning: the gRPC and event-loop threads share the
    # cores with torch. Must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from fleet_server import metrics
    from fleet_server.worker import WorkerConfig, run_worker

    if args.reuse_port:  # started by _supervise
        _die_with_parent()
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if args.metrics_port:
        metrics.serve_metrics(args.host, args.metrics_port)
    config = WorkerConfig(
        model=args.model,
        model_name=args.model_name or default_name(args.model),
        host=args.host,
        port=args.port,
        device=args.device,
        precision=args.precision,
        image_size=args.image_size,
        copy_stream=args.copy_stream,
        cuda_graphs=args.cuda_graphs,
        batching=settings,
        batching_file=args.batching_config,
        watch_interval_s=args.watch_interval_s,
        max_message_bytes=args.max_message_bytes,
        grace_period_s=args.grace_period_s,
        worker_index=args.worker_index,
        reuse_port=args.reuse_port,
    )
    try:
        return run_worker(config)
    except (ModelLoadError, SettingsError, ValueError) as exc:
        print(f"inferencefleet serve: {exc}", file=sys.stderr)
        return 2


def _child_argv(args: argparse.Namespace, index: int, threads: int) -> list[str]:
    argv = [sys.executable, "-m", "fleet_server.serve", "--model", args.model]
    argv += ["--model-name", args.model_name or default_name(args.model)]
    argv += ["--host", args.host, "--port", str(args.port), "--metrics-port", "0"]
    argv += ["--device", args.device, "--precision", args.precision, "--threads", str(threads)]
    argv += ["--image-size", str(args.image_size), "--max-batch-size", str(args.max_batch_size)]
    argv += ["--max-queue-delay-us", str(args.max_queue_delay_us)]
    argv += ["--max-queue-size", str(args.max_queue_size)]
    if args.batching_config is not None:
        argv += ["--batching-config", str(args.batching_config)]
    argv += ["--copy-stream"] if args.copy_stream else []
    argv += ["--cuda-graphs"] if args.cuda_graphs else []
    argv += ["--max-message-bytes", str(args.max_message_bytes)]
    argv += ["--grace-period-s", str(args.grace_period_s)]
    argv += ["--watch-interval-s", str(args.watch_interval_s)]
    return [*argv, "--worker-index", str(index), "--reuse-port"]


def _supervise(args: argparse.Namespace, threads: int) -> int:
    """Start N worker processes on one port; forward SIGTERM; exit 0 if all drained cleanly."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s")
    metrics_dir = tempfile.mkdtemp(prefix="inferencefleet-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from fleet_server import metrics  # after PROMETHEUS_MULTIPROC_DIR: multiprocess mode

    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        if args.metrics_port:
            metrics.serve_metrics(args.host, args.metrics_port)
        for index in range(args.workers):
            child = subprocess.Popen(_child_argv(args, index, threads))
            children[child.pid] = child
        log.info("%d workers on port %d, %d torch threads each", args.workers, args.port, threads)
        failed = False
        while any(child.poll() is None for child in children.values()):
            pid, status = os.wait()
            if pid not in children:
                continue
            code = os.waitstatus_to_exitcode(status)
            children[pid].returncode = code
            metrics.mark_process_dead(pid)
            if code != 0 or not stopping:
                log.error("worker pid %d exited with %d; stopping the others", pid, code)
                failed = True
                forward(signal.SIGTERM, None)
        return 1 if failed else 0
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
