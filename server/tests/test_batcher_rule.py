"""The batcher's rules, step by step, with a model the test opens and closes: dispatch at once
when idle, gather while busy, a full batch leaves at once, a partial one waits for more but never
past maxQueueDelay; a larger maxBatchSize is warmed in the background while batches stay within
the warm sizes; forward passes that keep failing make it unhealthy. No clock is read: the test
counts event-loop turns and batches."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import numpy as np
import pytest
from fleet_proto.tensors import Frames, Logits
from fleet_server.batcher import FAILURES_UNHEALTHY, Batcher
from fleet_spec.contract import BatchSettings

GATE_TIMEOUT_S = 60.0  # only a broken batcher ever waits this long


class GatedModel:
    """A model whose every forward pass waits until the test opens the gate once for it.
    Its logits are each frame's first pixel, so every caller can check it got its own rows."""

    def __init__(self, warmed: int = 256, failing_warm_up: bool = False) -> None:
        self.warmed_batch_size = warmed
        self.entered: queue.Queue[int] = queue.Queue()  # batch sizes; -N: warm-up of size N
        self.failing = False
        self._failing_warm_up = failing_warm_up
        self._gate = threading.Semaphore(0)

    def _pass(self, size: int) -> None:
        self.entered.put(size)
        if not self._gate.acquire(timeout=GATE_TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")

    def infer(self, parts: Sequence[Frames]) -> Logits:
        frames = np.concatenate(list(parts))
        self._pass(len(frames))
        if self.failing:
            raise RuntimeError("device error")
        return frames[:, 0, 0, :1].astype(np.float32)

    def warm_up(self, max_batch_size: int) -> None:
        size = self.warmed_batch_size + 1
        self._pass(-size)
        if self._failing_warm_up:
            raise RuntimeError(f"out of memory warming batch size {size}")
        self.warmed_batch_size = size

    def open(self) -> None:
        """Let one forward pass finish."""
        self._gate.release()

    async def next_batch(self) -> int:
        """The size of the next batch that reaches the model (waits for it)."""
        return await asyncio.to_thread(self.entered.get, timeout=GATE_TIMEOUT_S)


def frame(value: int, count: int = 1) -> Frames:
    return np.full((count, 2, 2, 3), value, dtype=np.uint8)


async def settle() -> None:
    """Let every task that is ready run (a few event-loop turns; no time passes on purpose)."""
    for _ in range(10):
        await asyncio.sleep(0)


def run(
    settings: BatchSettings,
    body: Callable[[Batcher, GatedModel], Awaitable[None]],
    model: GatedModel | None = None,
) -> list[bool]:
    """Run `body` against a started batcher; returns the health changes it reported."""
    changes: list[bool] = []

    async def go(model: GatedModel) -> None:
        batcher = Batcher(model, settings, model="gated", on_health=changes.append)
        await batcher.start()
        try:
            await body(batcher, model)
        finally:
            for _ in range(8):  # never leave the forward thread waiting at the gate
                model.open()
            await batcher.close()

    asyncio.run(go(model or GatedModel()))
    return changes


def rows(logits: Logits) -> list[int]:
    return [int(v) for v in logits[:, 0]]


SLOW = BatchSettings(max_batch_size=3, max_queue_delay_us=1_000_000, max_queue_size=64)
SMALL = BatchSettings(max_batch_size=2, max_queue_delay_us=0, max_queue_size=64)


def test_idle_model_takes_a_lone_request_at_once() -> None:
    async def body(batcher: Batcher, model: GatedModel) -> None:
        first = batcher.submit(frame(1))
        await settle()
        assert batcher.queued_frames == 0  # taken although the batch is not full
        assert await model.next_batch() == 1
        model.open()
        assert rows(await first) == [1]

    run(SLOW, body)


def test_requests_gather_while_busy_and_a_full_batch_leaves_at_once() -> None:
    async def body(batcher: Batcher, model: GatedModel) -> None:
        first = batcher.submit(frame(1))
        assert await model.next_batch() == 1
        later = [batcher.submit(frame(v)) for v in (2, 3, 4)]
        await settle()
        assert batcher.queued_frames == 3  # the model is busy: they wait together
        model.open()
        assert rows(await first) == [1]
        await settle()
        assert batcher.queued_frames == 0  # a full batch does not wait for the delay
        assert await model.next_batch() == 3
        model.open()
        assert [rows(await f) for f in later] == [[2], [3], [4]]

    run(SLOW, body)


def test_a_partial_batch_waits_for_more() -> None:
    async def body(batcher: Batcher, model: GatedModel) -> None:
        first = batcher.submit(frame(1))
        assert await model.next_batch() == 1
        busy = [batcher.submit(frame(9)), batcher.submit(frame(9, count=2))]  # demand: 3 frames
        model.open()
        await first
        assert await model.next_batch() == 3
        second = batcher.submit(frame(2))
        model.open()
        await asyncio.gather(*busy)
        await settle()
        assert batcher.queued_frames == 1  # gathering: 1 of 3 frames, the delay not yet over
        third = batcher.submit(frame(3, count=2))  # fills the batch
        await settle()
        assert batcher.queued_frames == 0
        assert await model.next_batch() == 3
        model.open()
        assert (rows(await second), rows(await third)) == ([2], [3, 3])

    run(SLOW, body)


def test_a_partial_batch_never_waits_past_the_delay() -> None:
    async def body(batcher: Batcher, model: GatedModel) -> None:
        first = batcher.submit(frame(1))
        assert await model.next_batch() == 1
        second = batcher.submit(frame(2))
        model.open()
        await first
        await settle()
        assert batcher.queued_frames == 0  # maxQueueDelay 0: it leaves alone, at once
        assert await model.next_batch() == 1
        model.open()
        assert rows(await second) == [2]

    run(BatchSettings(max_batch_size=3, max_queue_delay_us=0, max_queue_size=64), body)


def test_a_partial_batch_leaves_when_its_delay_is_over() -> None:
    async def body(batcher: Batcher, model: GatedModel) -> None:
        first = batcher.submit(frame(1))
        assert await model.next_batch() == 1
        second = batcher.submit(frame(2))
        model.open()
        await first
        assert await model.next_batch() == 1  # nobody else came: it went alone after 20 ms
        model.open()
        assert rows(await second) == [2]

    run(BatchSettings(max_batch_size=3, max_queue_delay_us=20_000, max_queue_size=64), body)


def test_a_larger_batch_size_applies_at_once_and_warms_between_batches() -> None:
    model = GatedModel(warmed=2)

    async def body(batcher: Batcher, model: GatedModel) -> None:
        batcher.apply(replace(SMALL, max_batch_size=4))  # returns at once: nothing warmed yet
        assert batcher.settings.max_batch_size == 4
        assert await model.next_batch() == -3  # size 3 warms on the forward thread
        request = batcher.submit(frame(7, count=4))
        await settle()
        model.open()  # size 3 is warm; the request went in batches of the warm size 2
        assert await model.next_batch() == 2
        model.open()
        assert await model.next_batch() in (-4, 2)  # warming 4 and the rest of the request
        model.open()
        assert await model.next_batch() in (-4, 2)
        model.open()
        assert rows(await request) == [7, 7, 7, 7]
        await batcher.wait_warm()
        assert (model.warmed_batch_size, batcher.batch_limit) == (4, 4)
        whole = batcher.submit(frame(8, count=4))
        assert await model.next_batch() == 4
        model.open()
        assert rows(await whole) == [8] * 4

    run(replace(SMALL, max_batch_size=2), body, model)


def test_a_warm_up_that_fails_keeps_the_warm_sizes_and_later_edits_apply() -> None:
    model = GatedModel(warmed=2, failing_warm_up=True)

    async def body(batcher: Batcher, model: GatedModel) -> None:
        batcher.apply(replace(SMALL, max_batch_size=4))
        assert await model.next_batch() == -3
        model.open()
        await batcher.wait_warm()  # failed and logged, not raised
        assert batcher.batch_limit == 2
        request = batcher.submit(frame(5, count=3))
        assert await model.next_batch() == 2
        model.open()
        assert await model.next_batch() == 1
        model.open()
        assert rows(await request) == [5, 5, 5]
        batcher.apply(replace(SMALL, max_batch_size=1, max_queue_delay_us=0))
        assert batcher.batch_limit == 1  # a later edit still applies

    run(replace(SMALL, max_batch_size=2), body, model)


def test_forward_passes_failing_in_a_row_make_it_unhealthy_until_one_works() -> None:
    async def body(batcher: Batcher, model: GatedModel) -> None:
        model.failing = True
        for attempt in range(FAILURES_UNHEALTHY):
            assert batcher.healthy, attempt
            failed = batcher.submit(frame(1))
            assert await model.next_batch() == 1
            model.open()
            with pytest.raises(RuntimeError, match="device error"):
                await failed
        assert not batcher.healthy
        model.failing = False
        works = batcher.submit(frame(2))
        assert await model.next_batch() == 1
        model.open()
        assert rows(await works) == [2]
        assert batcher.healthy

    assert run(SMALL, body) == [False, True]
