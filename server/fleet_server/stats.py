"""Per-model counters behind the ModelStatistics call (Triton's statistics extension)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """How many times something happened and the nanoseconds it took in total."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class BatchDurations:
    """Compute time of the forward passes of one batch size."""

    compute_infer: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Cumulative counts since start; updated from the event loop, read by ModelStatistics."""

    inference_count: int = 0  # frames inferred
    execution_count: int = 0  # forward passes
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_batch(self, frames: int, requests: int, compute_s: float) -> None:
        with self.lock:
            self.inference_count += frames
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            # Triton counts a batch's compute time once for every request in it
            self.compute_infer.add(compute_s * requests, requests)
            self.batches.setdefault(frames, BatchDurations()).compute_infer.add(compute_s)

    def record_queue(self, seconds: float) -> None:
        with self.lock:
            self.queue.add(seconds)

    def record_request(self, ok: bool, seconds: float) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(seconds)
