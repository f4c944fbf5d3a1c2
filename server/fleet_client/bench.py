"""`inferencefleet bench`: a concurrency sweep against one or more workers, with a table, JSON
and a plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from fleet_client.argtypes import (
    at_least_one,
    int_list,
    non_negative_seconds,
    positive_seconds,
)
from fleet_client.frames import FramesError, build_requests
from fleet_client.loadgen import LoadGenerator, channel_options, check_ready
from fleet_client.messages import (
    MODEL_METADATA,
    REPOSITORY_INDEX,
    TensorInfo,
    decode_model_metadata,
    decode_repository_index,
    encode_model_metadata_request,
    encode_repository_index_request,
)
from fleet_client.report import best_step, plot_sweep, result_table, sweep_json
from fleet_client.results import StepResult
from fleet_client.targets import TargetError, Targets, parse_targets

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}


class BenchError(RuntimeError):
    """The benchmark cannot run (the message says why)."""


def _concurrency_list(text: str) -> list[int]:
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferencefleet bench",
        description="Sweep concurrency against Open Inference Protocol gRPC workers, balanced "
        "round-robin across every target by gRPC itself.",
    )
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="TARGET",
        help="host:port (several, or comma-separated), or one DNS name:port (a headless Service)",
    )
    parser.add_argument("--model", help="model name (default: the only one the server lists)")
    parser.add_argument(
        "-c", "--concurrency", type=_concurrency_list, default=[1, 4, 16, 64],
        help="requests in flight per step, comma-separated (default 1,4,16,64)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=positive_seconds, default=10.0, help="measured seconds per step"
    )
    parser.add_argument(
        "--warmup", type=non_negative_seconds, default=3.0, help="unmeasured seconds per step"
    )
    parser.add_argument(
        "--mode", choices=["unary", "stream"], default="unary",
        help="ModelInfer calls, or ModelStreamInfer streams (one request in flight per stream)",
    )  # fmt: skip
    parser.add_argument(
        "--batch", type=at_least_one, default=1, help="frames per request (default 1)"
    )
    parser.add_argument(
        "--images", type=Path, action="append", default=[],
        help="an image file or a folder of them to send instead of random frames (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--image-size", type=int, help="H = W for a model input with dynamic height and width"
    )
    parser.add_argument(
        "--connections", type=at_least_one, default=1,
        help="gRPC channels, each with its own connection to every target (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=positive_seconds, default=30.0, help="deadline of one request (s)"
    )
    parser.add_argument(
        "--retries", type=int, choices=range(0, 5), default=0, metavar="{0..4}",
        help="retry a call that ends UNAVAILABLE (a worker draining or gone) or that a stopping "
        "server cancelled, up to this many times, as gRPC's retry policy does (default 0: count "
        "it as failed)",
    )  # fmt: skip
    parser.add_argument(
        "--connect-timeout", type=positive_seconds, default=5.0,
        help="fail when a target does not answer within this many seconds (default 5)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--json-file", type=Path, help="also write the results as JSON to a file")
    parser.add_argument("--plot", type=Path, help="write throughput vs p99 per step to this PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _image_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise BenchError(f"--images {path}: no such file or folder")
    if paths and not files:
        raise BenchError(f"--images: no image files in {', '.join(map(str, paths))}")
    return files


async def _unary(target: str, method: str, request: bytes, timeout_s: float) -> bytes:
    async with grpc.aio.insecure_channel(target, options=channel_options(True)) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        reply: bytes = await call(request, timeout=timeout_s)
        return reply


async def model_input(
    targets: Targets, model: str | None, timeout_s: float
) -> tuple[str, TensorInfo]:
    """The model to load (the only one listed, when not named) and its one input."""
    if model is None:
        try:
            reply = await _unary(
                targets.grpc_target, REPOSITORY_INDEX, encode_repository_index_request(), timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise BenchError(
                f"the server does not list its models ({exc.code().name}): pass --model"
            ) from exc
        names = decode_repository_index(reply)
        if len(names) != 1:
            raise BenchError(f"the server has models {names}: pass --model")
        model = names[0]
    try:
        reply = await _unary(
            targets.grpc_target, MODEL_METADATA, encode_model_metadata_request(model), timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"model {model!r}: {exc.code().name}: {exc.details()}") from exc
    inputs, _ = decode_model_metadata(reply)
    if len(inputs) != 1:
        raise BenchError(f"model {model!r} has {len(inputs)} inputs; bench sends exactly one")
    return model, inputs[0]


async def _sweep(
    generator: LoadGenerator, args: argparse.Namespace, console: Console
) -> list[StepResult]:
    steps: list[StepResult] = []
    per_step = args.warmup + args.duration
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        disable=args.quiet,
        transient=True,
    ) as progress:
        bar = progress.add_task("bench", total=per_step * len(args.concurrency), rate="")
        for index, concurrency in enumerate(args.concurrency):
            began, done0 = time.perf_counter(), generator.completed
            run = asyncio.create_task(generator.step(concurrency, args.warmup, args.duration))
            while not run.done():
                await asyncio.wait([run], timeout=0.25)
                elapsed = time.perf_counter() - began
                phase = "warm-up" if elapsed < args.warmup else "measuring"
                rate = (generator.completed - done0) * args.batch / max(elapsed, 1e-3)
                progress.update(
                    bar,
                    completed=index * per_step + min(elapsed, per_step),
                    description=f"concurrency {concurrency:>3} {phase}",
                    rate=f"{rate:7.1f} frames/s",
                )
            steps.append(run.result())
    return steps


async def _run(
    args: argparse.Namespace, console: Console
) -> tuple[dict[str, Any], list[StepResult]]:
    targets = parse_targets(args.targets)
    to_check = [f"ipv4:{a}" if not a.startswith("[") else f"ipv6:{a}" for a in targets.addresses]
    await asyncio.gather(
        *(check_ready(t, args.connect_timeout) for t in to_check or [targets.grpc_target])
    )
    model, tensor = await model_input(targets, args.model, args.connect_timeout)
    requests = build_requests(
        model, tensor, args.batch, image_size=args.image_size, images=_image_files(args.images)
    )
    generator = LoadGenerator(
        targets,
        requests,
        args.batch,
        mode=args.mode,
        connections=args.connections,
        timeout_s=args.timeout,
        retries=args.retries,
    )
    try:
        await generator.connect(args.connect_timeout)
        steps = await _sweep(generator, args, console)
    finally:
        await generator.close()
    meta = {
        "targets": list(targets.addresses) or [targets.grpc_target],
        "model": model,
        "mode": args.mode,
        "batch": args.batch,
        "connections": args.connections,
        "input": {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)},
        "warmup_s": args.warmup,
        "duration_s": args.duration,
    }
    return meta, steps


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        meta, steps = asyncio.run(_run(args, console))
    except (BenchError, TargetError, FramesError) as exc:
        console.print(f"[red]bench: {exc}[/red]", highlight=False)
        return 1
    title = (
        f"{meta['model']} · {meta['mode']} · batch {meta['batch']} · "
        f"{len(meta['targets'])} target(s)"
    )
    document = json.dumps(sweep_json(meta, steps), indent=2)
    if args.json_file is not None:
        args.json_file.parent.mkdir(parents=True, exist_ok=True)
        args.json_file.write_text(document + "\n", encoding="utf-8")
    if args.json:
        print(document)
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=160)
        out.print(result_table(steps, title))
        best = best_step(steps)
        if best is not None:
            out.print(
                f"best: {best.frames_per_s:.1f} frames/s at concurrency {best.concurrency} "
                f"(p99 {best.latency_ms(0.99):.1f} ms)"
            )
    if args.plot is not None:
        plot_sweep(steps, args.plot, title)
        console.print(f"plot: {args.plot}")
    if not any(step.requests for step in steps):
        console.print("[red]bench: every request failed[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
