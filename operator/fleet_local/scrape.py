"""A worker's live figures for the table: frames/s and p99 latency from its Prometheus metrics."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

FRAMES = "inferencefleet_frames"
DURATION = "inferencefleet_request_duration_seconds"


@dataclass(frozen=True)
class Sample:
    """Cumulative counters at one moment."""

    at: float
    frames: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), sorted


def parse_metrics(text: str, at: float) -> Sample:
    """Frames and the request-duration histogram, summed over every model label."""
    frames = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == FRAMES:
            frames += sum(s.value for s in family.samples if s.name == f"{FRAMES}_total")
        elif family.name == DURATION:
            for s in family.samples:
                if s.name == f"{DURATION}_bucket":
                    bound = float(s.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + s.value
    return Sample(at, frames, tuple(sorted(buckets.items())))


def histogram_quantile(fraction: float, buckets: tuple[tuple[float, float], ...]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets (linear within a bucket);
    NaN without observations. In the +Inf bucket it answers the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = fraction * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _minus(
    now: tuple[tuple[float, float], ...], then: tuple[tuple[float, float], ...]
) -> tuple[tuple[float, float], ...]:
    before = dict(then)
    return tuple((bound, max(0.0, count - before.get(bound, 0.0))) for bound, count in now)


class Rates:
    """frames/s and p99 over the last `window_s` seconds of samples of one worker."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._samples: deque[Sample] = deque()

    def reset(self) -> None:
        """Forget the samples (a restarted worker's counters start again from zero)."""
        self._samples.clear()

    def add(self, sample: Sample) -> None:
        if self._samples and sample.frames < self._samples[-1].frames:
            self._samples.clear()  # counters went back: the worker restarted
        self._samples.append(sample)
        while len(self._samples) > 2 and sample.at - self._samples[1].at >= self.window_s:
            self._samples.popleft()

    def frames_per_s(self) -> float:
        if len(self._samples) < 2:
            return math.nan
        first, last = self._samples[0], self._samples[-1]
        span = last.at - first.at
        return (last.frames - first.frames) / span if span > 0 else math.nan

    def p99_s(self) -> float:
        if len(self._samples) < 2:
            return math.nan
        return histogram_quantile(0.99, _minus(self._samples[-1].buckets, self._samples[0].buckets))


async def fetch_metrics(host: str, port: int, timeout_s: float = 1.0) -> str:
    """GET /metrics over plain HTTP/1.0 (the body as text)."""

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()

    raw = await asyncio.wait_for(get(), timeout_s)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise OSError(f"metrics endpoint {host}:{port} answered {head[:40]!r}")
    return body.decode(errors="replace")
