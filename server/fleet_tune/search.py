"""The tuner's search (pure): a grid of fleet configurations, how a measurement is scored against
the p99 budget, and successive halving that spends most of its time near the best.

The search never starts a process: it is handed `measure(config, window_s)` and a clock, so a
unit test drives it with a made-up landscape and a fake clock.

How it spends the budget:
1. explore: a coarse lattice of the grid (every worker count, every other batch size, the middle
   delay) in short windows, then the untried grid neighbours of the two best, again and again,
   until the best two have no untried neighbour (a hill climb over the whole grid);
2. halve: the best `keep` so far are measured again with twice the window, the better half
   stays, until one is left;
3. confirm: the winner is measured once more with the full window (the figure it reports).
Every step checks the time left and stops exploring or halving early so that the confirmation
always fits.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field


class SearchError(ValueError):
    """A grid or schedule that cannot be searched (the message names the setting)."""


@dataclass(frozen=True, order=True)
class Config:
    """One point of the grid: worker processes per GPU (or per machine) and batching."""

    workers: int
    max_batch_size: int
    max_queue_delay_us: int

    def label(self) -> str:
        return f"{self.workers}w b{self.max_batch_size} d{self.max_queue_delay_us}us"


def _axis(name: str, values: Iterable[int], low: int) -> tuple[int, ...]:
    ordered = tuple(sorted(set(values)))
    if not ordered:
        raise SearchError(f"{name}: needs at least one value")
    if ordered[0] < low:
        raise SearchError(f"{name}: values must be >= {low}, got {ordered[0]}")
    return ordered


@dataclass(frozen=True)
class Grid:
    """The values each axis may take; a configuration is one value of each."""

    workers: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    delays_us: tuple[int, ...]

    @classmethod
    def of(
        cls, workers: Iterable[int], batch_sizes: Iterable[int], delays_us: Iterable[int]
    ) -> Grid:
        return cls(
            _axis("workers", workers, 1),
            _axis("batch sizes", batch_sizes, 1),
            _axis("queue delays", delays_us, 0),
        )

    def configs(self) -> list[Config]:
        return [
            Config(w, b, d) for w in self.workers for b in self.batch_sizes for d in self.delays_us
        ]

    def __len__(self) -> int:
        return len(self.workers) * len(self.batch_sizes) * len(self.delays_us)

    def coarse(self) -> list[Config]:
        """Every worker count x every other batch size (the largest too) x the middle delay."""
        batches = list(self.batch_sizes[::2])
        if self.batch_sizes[-1] not in batches:
            batches.append(self.batch_sizes[-1])
        delay = self.delays_us[len(self.delays_us) // 2]
        return [Config(w, b, delay) for w in self.workers for b in batches]

    def neighbours(self, config: Config) -> list[Config]:
        """The configurations one step away along one axis."""
        out = []
        axes = (self.workers, self.batch_sizes, self.delays_us)
        point = (config.workers, config.max_batch_size, config.max_queue_delay_us)
        for axis_index, axis in enumerate(axes):
            at = axis.index(point[axis_index])
            for step in (-1, 1):
                if 0 <= at + step < len(axis):
                    moved = list(point)
                    moved[axis_index] = axis[at + step]
                    out.append(Config(*moved))
        return out


@dataclass(frozen=True)
class Measurement:
    """What one window of load against one configuration gave."""

    frames_per_s: float
    p99_ms: float
    errors: int = 0
    window_s: float = 0.0

    def within(self, p99_budget_ms: float) -> bool:
        return self.errors == 0 and not math.isnan(self.p99_ms) and self.p99_ms <= p99_budget_ms


def score(measurement: Measurement, p99_budget_ms: float) -> float:
    """Higher is better. Within the budget: frames/s. Outside: negative, less over comes first
    (so that a search whose every point misses the budget still climbs towards it)."""
    if measurement.within(p99_budget_ms):
        return measurement.frames_per_s
    if measurement.errors or math.isnan(measurement.p99_ms) or measurement.frames_per_s <= 0:
        return -math.inf
    return -measurement.p99_ms / p99_budget_ms


@dataclass(frozen=True)
class Schedule:
    """Window lengths and the time budget of one search."""

    budget_s: float
    first_window_s: float = 1.0
    final_window_s: float = 4.0
    overhead_s: float = 1.0  # per measurement beyond its window: warm-up, applying the settings
    keep: int = 4  # how many the halving phase starts from
    p99_budget_ms: float = math.inf

    def __post_init__(self) -> None:
        if self.first_window_s <= 0 or self.final_window_s < self.first_window_s:
            raise SearchError("windows: need 0 < first window <= final window")
        if self.keep < 1:
            raise SearchError("keep: must be >= 1")
        if self.budget_s < self.final_window_s + self.overhead_s:
            raise SearchError(
                f"--budget-s {self.budget_s:g}: too short for even the final measurement "
                f"({self.final_window_s + self.overhead_s:g} s)"
            )


@dataclass(frozen=True)
class Trial:
    """One measurement the search made, in order."""

    phase: str  # explore | halve | confirm
    config: Config
    measurement: Measurement
    started_s: float  # on the search's clock, from its start


@dataclass
class Outcome:
    """Everything the search measured and what it chose."""

    trials: list[Trial] = field(default_factory=list)
    winner: Config | None = None
    confirmed: Measurement | None = None
    elapsed_s: float = 0.0

    def best_by_config(self, p99_budget_ms: float) -> dict[Config, Measurement]:
        """Per configuration, its measurement with the longest window (the latest on a tie)."""
        chosen: dict[Config, Measurement] = {}
        for trial in self.trials:
            held = chosen.get(trial.config)
            if held is None or trial.measurement.window_s >= held.window_s:
                chosen[trial.config] = trial.measurement
        return chosen


Measure = Callable[[Config, float], Awaitable[Measurement]]
Clock = Callable[[], float]


def order_for_restarts(configs: Sequence[Config], running_workers: int | None) -> list[Config]:
    """Group by worker count (a new count restarts the fleet), the running count first."""
    return sorted(configs, key=lambda c: (c.workers != running_workers, c.workers, c))


class Search:
    """One run of the search; `run()` returns the outcome."""

    def __init__(self, grid: Grid, schedule: Schedule, measure: Measure, clock: Clock) -> None:
        self.grid = grid
        self.schedule = schedule
        self._measure = measure
        self._clock = clock
        self._start = 0.0
        self._running_workers: int | None = None
        self.outcome = Outcome()

    def _left_s(self) -> float:
        return self.schedule.budget_s - (self._clock() - self._start)

    def _cost(self, window_s: float) -> float:
        return window_s + self.schedule.overhead_s

    def _reserve(self) -> float:
        return self._cost(self.schedule.final_window_s)

    def _affordable(self, window_s: float) -> bool:
        return self._left_s() - self._cost(window_s) >= self._reserve()

    async def _try(self, phase: str, config: Config, window_s: float) -> Measurement:
        started = self._clock() - self._start
        measurement = await self._measure(config, window_s)
        self._running_workers = config.workers
        self.outcome.trials.append(Trial(phase, config, measurement, started))
        return measurement

    def _rank(self, scores: dict[Config, float]) -> list[Config]:
        return sorted(scores, key=lambda c: (-scores[c], c))

    async def _explore(self) -> dict[Config, float]:
        budget = self.schedule.p99_budget_ms
        window = self.schedule.first_window_s
        scores: dict[Config, float] = {}
        todo = self.grid.coarse()
        while todo:
            for config in order_for_restarts(todo, self._running_workers):
                if not self._affordable(window):
                    return scores
                scores[config] = score(await self._try("explore", config, window), budget)
            leaders = self._rank(scores)[:2]
            todo = sorted({n for c in leaders for n in self.grid.neighbours(c) if n not in scores})
        return scores

    async def _halve(self, scores: dict[Config, float]) -> Config | None:
        ranked = self._rank(scores)
        alive = ranked[: self.schedule.keep]
        window = self.schedule.first_window_s
        budget = self.schedule.p99_budget_ms
        while len(alive) > 1:
            window = min(2 * window, self.schedule.final_window_s)
            fresh: dict[Config, float] = {}
            for config in order_for_restarts(alive, self._running_workers):
                if not self._affordable(window):
                    break
                fresh[config] = score(await self._try("halve", config, window), budget)
            if len(fresh) < len(alive):  # out of time: the measured ones compete, else the ranks
                return self._rank(fresh)[0] if fresh else alive[0]
            alive = self._rank(fresh)[: math.ceil(len(alive) / 2)]
        return alive[0] if alive else None

    async def run(self) -> Outcome:
        self._start = self._clock()
        scores = await self._explore()
        winner = await self._halve(scores)
        if winner is None:  # the budget did not allow one exploring step: measure one point
            winner = self.grid.coarse()[0]
        self.outcome.winner = winner
        self.outcome.confirmed = await self._try("confirm", winner, self.schedule.final_window_s)
        self.outcome.elapsed_s = self._clock() - self._start
        return self.outcome


async def sweep(
    grid: Grid, window_s: float, measure: Measure, p99_budget_ms: float
) -> tuple[Config | None, dict[Config, Measurement]]:
    """Every configuration of the grid once, with the same window; the best within budget."""
    results: dict[Config, Measurement] = {}
    running: int | None = None
    for config in order_for_restarts(grid.configs(), running):
        results[config] = await measure(config, window_s)
        running = config.workers
    within = [c for c, m in results.items() if m.within(p99_budget_ms)]
    best = max(within, key=lambda c: (results[c].frames_per_s, c)) if within else None
    return best, results
