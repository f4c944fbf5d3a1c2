"""What one benchmark step measured, and the summary figures derived from it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (as perf_analyzer reports): the smallest value that at
    least `fraction` of the samples do not exceed. NaN for no samples."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class StepResult:
    """One concurrency step of a sweep: counts inside the measurement window."""

    concurrency: int
    window_s: float
    frames_per_request: int
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    per_target: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def frames(self) -> int:
        return self.requests * self.frames_per_request

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.window_s if self.window_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    @property
    def client_cpu_percent(self) -> float:
        """Client CPU time over the window, in % of one core."""
        return 100.0 * self.client_cpu_s / self.window_s if self.window_s > 0 else 0.0

    def latency_ms(self, fraction: float) -> float:
        return 1000.0 * percentile(sorted(self.latencies_s), fraction)

    def mean_ms(self) -> float:
        if not self.latencies_s:
            return math.nan
        return 1000.0 * sum(self.latencies_s) / len(self.latencies_s)

    def shares(self) -> dict[str, float]:
        """Fraction of the work each target served (by calls, or by frames for streams)."""
        total = sum(self.per_target.values())
        if total == 0:
            return {}
        return {target: count / total for target, count in sorted(self.per_target.items())}

    def to_json(self) -> dict[str, Any]:
        def num(value: float) -> float | None:
            return None if math.isnan(value) else round(value, 3)

        ordered = sorted(self.latencies_s)
        return {
            "concurrency": self.concurrency,
            "window_s": round(self.window_s, 3),
            "requests": self.requests,
            "frames": self.frames,
            "frames_per_s": round(self.frames_per_s, 2),
            "requests_per_s": round(self.requests_per_s, 2),
            "latency_ms": {
                "mean": num(self.mean_ms()),
                "p50": num(1000.0 * percentile(ordered, 0.50)),
                "p90": num(1000.0 * percentile(ordered, 0.90)),
                "p99": num(1000.0 * percentile(ordered, 0.99)),
            },
            "errors": dict(sorted(self.errors.items())),
            "share": {target: round(share, 4) for target, share in self.shares().items()},
            "client_cpu_percent": round(self.client_cpu_percent, 1),
        }
