"""The tuner's search against made-up landscapes and a fake clock: it finds the best within the
p99 budget, spends less than a sweep, keeps to its time budget; and the fleet.yaml fragment."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random

import pytest
from fleet_local.plan import LocalGpu, LocalHost, Options
from fleet_spec.contract import BatchSettings
from fleet_spec.spec import API_VERSION, KIND, parse_fleet
from fleet_tune.measure import Setup, spec_for_workers, thread_groups
from fleet_tune.report import fragment, outcome_json
from fleet_tune.search import (
    Config,
    Grid,
    Measurement,
    Schedule,
    Search,
    SearchError,
    order_for_restarts,
    score,
    sweep,
)

GRID = Grid.of([1, 2, 4], [1, 2, 4, 8, 16, 32], [0, 250, 1000, 4000])


def landscape(config: Config) -> Measurement:
    """A CPU-like surface: 2 workers best, batching helps up to 8, a little delay helps; latency
    grows with batch size, delay and oversubscription."""
    workers_gain = {1: 1.0, 2: 1.3, 4: 0.8}[config.workers]
    b = math.log2(config.max_batch_size)
    batch_gain = 1.0 + 0.5 * b - 0.08 * b * b
    delay_gain = {0: 1.0, 250: 1.04, 1000: 1.06, 4000: 0.97}[config.max_queue_delay_us]
    fps = 300.0 * workers_gain * batch_gain * delay_gain
    p99 = 4.0 + 3.0 * config.max_batch_size * config.workers + config.max_queue_delay_us / 500
    return Measurement(fps, p99)


class FakeRun:
    """A measure function over `landscape`, with a clock the measurements advance."""

    def __init__(self, noise: float = 0.0, seed: int = 0, overhead_s: float = 0.8) -> None:
        self.now = 0.0
        self.calls: list[tuple[Config, float]] = []
        self.restarts = 0
        self._running: int | None = None
        self._noise = noise
        self._rng = random.Random(seed)
        self._overhead = overhead_s

    def clock(self) -> float:
        return self.now

    async def measure(self, config: Config, window_s: float) -> Measurement:
        if config.workers != self._running:
            self.restarts += 1
            self._running = config.workers
        self.calls.append((config, window_s))
        self.now += window_s + self._overhead
        true = landscape(config)
        jitter = 1.0 + self._rng.uniform(-self._noise, self._noise)
        return Measurement(true.frames_per_s * jitter, true.p99_ms * jitter, 0, window_s)


def true_best(p99_budget_ms: float) -> Config:
    within = [c for c in GRID.configs() if landscape(c).within(p99_budget_ms)]
    return max(within, key=lambda c: landscape(c).frames_per_s)


def run_search(fake: FakeRun, schedule: Schedule) -> Search:
    search = Search(GRID, schedule, fake.measure, fake.clock)
    asyncio.run(search.run())
    return search


def test_grid_rejects_bad_axes_by_name() -> None:
    with pytest.raises(SearchError, match="workers"):
        Grid.of([0, 1], [1], [0])
    with pytest.raises(SearchError, match="batch sizes"):
        Grid.of([1], [], [0])
    with pytest.raises(SearchError, match="queue delays"):
        Grid.of([1], [1], [-5])


def test_coarse_lattice_and_neighbours() -> None:
    assert GRID.coarse() == [Config(w, b, 1000) for w in (1, 2, 4) for b in (1, 4, 16, 32)]
    assert sorted(GRID.neighbours(Config(2, 1, 0))) == [
        Config(1, 1, 0), Config(2, 1, 250), Config(2, 2, 0), Config(4, 1, 0)
    ]  # fmt: skip
    assert len(GRID.neighbours(Config(2, 4, 250))) == 6


def test_score_ranks_within_budget_above_everything_else() -> None:
    assert score(Measurement(100.0, 9.0), 10.0) == 100.0
    over_a_little, over_a_lot = (
        score(Measurement(900.0, 11.0), 10.0),
        score(Measurement(900.0, 30.0), 10.0),
    )
    assert over_a_lot < over_a_little < 0 < score(Measurement(1.0, 10.0), 10.0)
    assert score(Measurement(500.0, 5.0, errors=3), 10.0) == -math.inf
    assert score(Measurement(0.0, math.nan), 10.0) == -math.inf


def test_order_for_restarts_keeps_the_running_count_first() -> None:
    configs = [Config(1, 8, 0), Config(4, 1, 0), Config(2, 2, 0), Config(1, 1, 0)]
    ordered = order_for_restarts(configs, running_workers=2)
    assert [c.workers for c in ordered] == [2, 1, 1, 4]


@pytest.mark.parametrize("p99_budget_ms", [30.0, 60.0, 1000.0])
def test_search_finds_the_best_within_budget_for_a_fraction_of_a_sweep(
    p99_budget_ms: float,
) -> None:
    fake = FakeRun()
    schedule = Schedule(budget_s=120.0, p99_budget_ms=p99_budget_ms)
    search = run_search(fake, schedule)
    outcome = search.outcome
    assert outcome.winner == true_best(p99_budget_ms)
    assert outcome.confirmed is not None
    assert outcome.confirmed.within(p99_budget_ms)
    assert outcome.trials[-1].phase == "confirm"
    assert outcome.trials[-1].measurement.window_s == schedule.final_window_s
    sweep_time = len(GRID) * (schedule.final_window_s + 0.8)
    assert fake.now <= 0.25 * sweep_time, (fake.now, sweep_time)
    assert len({c for c, _ in fake.calls}) < len(GRID) / 2


def test_search_with_noise_still_lands_near_the_best() -> None:
    worst = 1.0
    for seed in range(20):
        fake = FakeRun(noise=0.05, seed=seed)
        outcome = run_search(fake, Schedule(budget_s=120.0, p99_budget_ms=60.0)).outcome
        assert outcome.winner is not None
        found = landscape(outcome.winner)
        assert found.within(60.0)
        worst = min(worst, found.frames_per_s / landscape(true_best(60.0)).frames_per_s)
    assert worst >= 0.9


@pytest.mark.parametrize("budget_s", [6.0, 12.0, 25.0])
def test_search_keeps_to_its_time_budget_and_always_confirms(budget_s: float) -> None:
    fake = FakeRun()
    outcome = run_search(fake, Schedule(budget_s=budget_s, overhead_s=0.8)).outcome
    assert fake.now <= budget_s
    assert outcome.winner is not None
    assert outcome.trials[-1].phase == "confirm"
    assert outcome.elapsed_s == fake.now


def test_schedule_refuses_a_budget_shorter_than_the_final_window() -> None:
    with pytest.raises(SearchError, match="--budget-s 3"):
        Schedule(budget_s=3.0, final_window_s=4.0)


def test_sweep_measures_every_point_once_and_picks_the_best_within_budget() -> None:
    fake = FakeRun()
    best, results = asyncio.run(sweep(GRID, 2.0, fake.measure, 30.0))
    assert len(fake.calls) == len(GRID) == len(results)
    assert fake.restarts == len(GRID.workers)
    assert best == true_best(30.0)


def test_no_point_within_budget_climbs_towards_the_lowest_latency() -> None:
    fake = FakeRun()
    outcome = run_search(fake, Schedule(budget_s=120.0, p99_budget_ms=1.0)).outcome
    assert outcome.winner == Config(1, 1, 0)
    assert outcome.confirmed is not None
    assert not outcome.confirmed.within(1.0)
    assert outcome_json(outcome, 1.0)["confirmed"]["within_budget"] is False


def test_fragment_names_workers_per_gpu_or_replicas_on_the_cpu() -> None:
    spec = parse_fleet({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "x"},
                        "spec": {"model": {"source": "builtin:tiny"}}})  # fmt: skip
    on_gpu = fragment(spec, Config(4, 16, 500), on_gpu=True)["spec"]
    assert on_gpu["gpu"] == {"sharing": "timeSlicing", "workersPerGPU": 4}
    assert on_gpu["batching"]["maxBatchSize"] == 16
    assert on_gpu["batching"]["maxQueueDelayMicroseconds"] == 500
    assert on_gpu["batching"]["maxQueueSize"] >= 16
    alone = fragment(spec, Config(1, 2, 0), on_gpu=True)["spec"]["gpu"]
    assert alone == {"sharing": "none", "workersPerGPU": 1}
    on_cpu = fragment(spec, Config(2, 8, 250), on_gpu=False)["spec"]
    assert on_cpu["replicas"] == 2
    assert "gpu" not in on_cpu
    # the fragment merged into the manifest is a valid fleet
    merged = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "x"},
              "spec": {"model": {"source": "builtin:tiny"}, **on_gpu}}  # fmt: skip
    assert parse_fleet(merged).gpu.workers_per_gpu == 4


def _setup(cores: int, gpus: int) -> Setup:
    spec = parse_fleet({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "x"},
                        "spec": {"model": {"source": "builtin:tiny"}}})  # fmt: skip
    host = LocalHost(cores, tuple(LocalGpu(i, "GPU", 49140) for i in range(gpus)))
    return Setup(spec, host, Options(), largest_batch=16)


def test_workers_are_pooled_by_their_torch_threads() -> None:
    # 2 cores: 1 worker gets 2 threads; 2 and 4 workers get 1 each and share one pool of 4
    assert thread_groups(_setup(2, 0), [1, 2, 4]) == {2: 1, 1: 4}
    # a GPU with 16 cores: at most 4 threads each, so all three counts share one pool
    assert thread_groups(_setup(16, 1), [1, 2, 4]) == {4: 4}


def test_the_tuned_fleet_shares_a_gpu_by_time_slicing_unless_it_asked_for_mps() -> None:
    setup = _setup(2, 1)
    batching = BatchSettings(8, 500, 64)
    two = spec_for_workers(setup.spec, 2, batching)
    assert (two.replicas, two.processes_per_pod, two.gpu.workers_per_gpu) == (2, 1, 2)
    assert two.gpu.sharing == "timeSlicing"
    assert two.batching == batching
    assert spec_for_workers(setup.spec, 1, batching).gpu.sharing == "none"
    mps = dataclasses.replace(setup.spec, gpu=dataclasses.replace(setup.spec.gpu, sharing="mps"))
    assert spec_for_workers(mps, 4, batching).gpu.sharing == "mps"
    assert setup.in_flight(Config(2, 8, 0)) == 32
    assert setup.queue_size() >= 64
