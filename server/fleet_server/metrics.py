"""Prometheus metrics of the worker (module-level constants) and the /metrics HTTP endpoint.

With `serve --workers N` every worker process writes its samples to PROMETHEUS_MULTIPROC_DIR
and the supervising process serves the sum; gauges say how they combine (multiprocess_mode).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

REQUESTS = Counter(
    "inferencefleet_requests",
    "Inference requests finished, by gRPC status code",
    ["model", "code"],
)
FRAMES = Counter("inferencefleet_frames", "Frames inferred successfully", ["model"])
REQUEST_DURATION = Histogram(
    "inferencefleet_request_duration_seconds",
    "End-to-end time of an inference request inside the worker",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "inferencefleet_queue_duration_seconds",
    "Time a request waited in the batcher's queue before its forward pass began",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    "inferencefleet_compute_duration_seconds",
    "Time of one forward pass (pre-processing, model, copy-out) for a batch",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "inferencefleet_batch_size",
    "Frames per forward pass",
    ["model"],
    buckets=_BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "inferencefleet_queue_depth",
    "Frames waiting in the batcher's queue",
    ["model"],
    multiprocess_mode="livesum",
)
INFLIGHT = Gauge(
    "inferencefleet_inflight_requests",
    "Inference requests being handled",
    ["model"],
    multiprocess_mode="livesum",
)
MODEL_LOAD_SECONDS = Gauge(
    "inferencefleet_model_load_seconds",
    "Seconds spent loading and warming up the model",
    ["model"],
    multiprocess_mode="max",
)
MAX_BATCH_SIZE = Gauge(
    "inferencefleet_max_batch_size",
    "The batching setting in force: most frames per forward pass (follows live edits)",
    ["model"],
    multiprocess_mode="livemax",
)
GPU_MEMORY_ALLOCATED = Gauge(
    "inferencefleet_gpu_memory_allocated_bytes",
    "CUDA memory allocated by the model runner (CUDA only)",
    ["model", "device"],
    multiprocess_mode="livesum",
)


def serve_metrics(host: str, port: int) -> int:
    """Serve /metrics on host:port in a daemon thread; returns the bound port."""
    registry: CollectorRegistry | None = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = (
        start_http_server(port, addr=host)
        if registry is None
        else start_http_server(port, addr=host, registry=registry)
    )
    return int(server.server_address[1])


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges from the multiprocess directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
