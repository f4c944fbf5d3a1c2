"""The dynamic batcher with the real tiny model: batching, splitting, queue limits, deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from fleet_server.batcher import Batcher
from fleet_server.errors import DeadlineExpired, NotReady, QueueFull, TooLarge, to_status
from fleet_server.runner import ModelRunner
from fleet_spec.contract import BatchSettings

Frames = Callable[..., npt.NDArray[np.uint8]]


async def started(runner: ModelRunner, **settings: int) -> Batcher:
    batcher = Batcher(runner, BatchSettings(**settings), model="tiny")
    await batcher.start()
    return batcher


def test_many_concurrent_requests_each_get_their_own_logits(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    inputs = [frames(1 + i % 3, seed=i) for i in range(24)]
    expected = [tiny_reference.infer([x]) for x in inputs]

    async def go() -> list[np.ndarray]:
        batcher = await started(tiny_reference, max_batch_size=4, max_queue_size=256)
        try:
            return list(await asyncio.gather(*(batcher.infer(x) for x in inputs)))
        finally:
            await batcher.close()

    results = asyncio.run(go())
    for got, want in zip(results, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert len({r.tobytes() for r in results}) == len(results)  # responses really differ


def test_request_larger_than_a_batch_is_split_and_merged(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    x = frames(7, seed=3)
    want = tiny_reference.infer([x])

    async def go() -> tuple[np.ndarray, dict[int, int]]:
        batcher = await started(tiny_reference, max_batch_size=3)
        try:
            got = await batcher.infer(x)
            sizes = {size: b.compute_infer.count for size, b in batcher.stats.batches.items()}
            return got, sizes
        finally:
            await batcher.close()

    got, sizes = asyncio.run(go())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert max(sizes) <= 3
    assert sum(size * count for size, count in sizes.items()) == 7


def test_requests_queued_while_busy_leave_together(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    async def go() -> dict[int, int]:
        batcher = await started(tiny_reference, max_batch_size=8, max_queue_delay_us=0)
        try:
            # all eight are queued before the dispatcher first runs, so they leave together
            await asyncio.gather(*(batcher.infer(frames(1, seed=i)) for i in range(8)))
            return {size: b.compute_infer.count for size, b in batcher.stats.batches.items()}
        finally:
            await batcher.close()

    assert asyncio.run(go()) == {8: 1}


def test_a_convoy_stays_one_batch_and_a_lone_request_is_not_held(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    """4 requests in flight, answered together, come back one by one: they leave as one batch
    of 4 (not 1 + 3, not after waiting for 8); once one request is alone, none waits."""

    async def go() -> tuple[dict[int, int], list[int]]:
        batcher = await started(tiny_reference, max_batch_size=8, max_queue_delay_us=500_000)
        demands = []
        try:
            await asyncio.gather(*(batcher.infer(frames(1, seed=i)) for i in range(4)))
            demands.append(batcher.demand)

            async def later(i: int) -> object:
                await asyncio.sleep(0.01 * i)  # arrivals spread over 30 ms, well inside the delay
                return await batcher.infer(frames(1, seed=i))

            await asyncio.gather(*(later(i) for i in range(4)))
            demands.append(batcher.demand)
            for i in range(3):  # concurrency 1 from here: the demand falls back to one frame
                await batcher.infer(frames(1, seed=i))
                demands.append(batcher.demand)
            return {
                size: b.compute_infer.count for size, b in batcher.stats.batches.items()
            }, demands
        finally:
            await batcher.close()

    sizes, demands = asyncio.run(go())
    assert sizes[4] == 2
    assert demands[:2] == [4, 4]
    assert demands[-1] == 1


def test_full_queue_rejects_at_once(tiny_reference: ModelRunner, frames: Frames) -> None:
    async def go() -> list[object]:
        batcher = await started(tiny_reference, max_batch_size=2, max_queue_size=3)
        try:
            calls = [batcher.infer(frames(1, seed=i)) for i in range(6)]
            return list(await asyncio.gather(*calls, return_exceptions=True))
        finally:
            await batcher.close()

    results = asyncio.run(go())
    rejected = [r for r in results if isinstance(r, QueueFull)]
    assert len(rejected) == 3
    assert "maxQueueSize 3" in str(rejected[0])
    assert all(isinstance(r, np.ndarray) for r in results[:3])


def test_request_bigger_than_the_queue_is_invalid_not_retryable(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    async def go() -> None:
        batcher = await started(tiny_reference, max_batch_size=2, max_queue_size=4)
        try:
            with pytest.raises(TooLarge, match="can never fit the queue of maxQueueSize 4") as err:
                await batcher.infer(frames(5, seed=0))
            assert to_status(err.value)[0] is grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await batcher.close()

    asyncio.run(go())


def test_expired_deadline_is_dropped_before_compute(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    async def go() -> int:
        batcher = await started(tiny_reference)
        try:
            with pytest.raises(DeadlineExpired, match="deadline exceeded"):
                await batcher.infer(frames(1, seed=0), deadline=time.perf_counter() - 1)
            return batcher.stats.inference_count
        finally:
            await batcher.close()

    assert asyncio.run(go()) == 0


def test_a_caller_that_went_away_is_skipped_before_compute(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    async def go() -> tuple[int, int]:
        batcher = await started(tiny_reference, max_batch_size=4)
        try:
            gone = asyncio.create_task(batcher.infer(frames(3, seed=0)))
            await asyncio.sleep(0)  # it is queued now
            gone.cancel()
            await batcher.infer(frames(1, seed=1))
            return batcher.stats.inference_count, batcher.queued_frames
        finally:
            await batcher.close()

    assert asyncio.run(go()) == (1, 0)


def test_a_failing_forward_fails_every_request_in_its_batch(
    tiny_reference: ModelRunner, frames: Frames
) -> None:
    wrong = np.zeros((1, 8, 8, 3), dtype=np.uint8)  # the runner expects 32x32 frames

    async def go() -> list[object]:
        batcher = await started(tiny_reference, max_batch_size=4)
        try:
            calls = [batcher.infer(wrong) for _ in range(3)]
            results = list(await asyncio.gather(*calls, return_exceptions=True))
            results.append(await batcher.infer(frames(1, seed=1)))  # and it serves on
            return results
        finally:
            await batcher.close()

    results = asyncio.run(go())
    assert all(isinstance(r, Exception) for r in results[:3])
    assert isinstance(results[3], np.ndarray)


def test_live_settings_warm_up_a_larger_batch(tiny_reference: ModelRunner, frames: Frames) -> None:
    async def go() -> tuple[int, int]:
        batcher = await started(tiny_reference, max_batch_size=2)
        try:
            batcher.apply(BatchSettings(max_batch_size=5))
            await batcher.wait_warm()
            await batcher.infer(frames(5, seed=2))
            return batcher.settings.max_batch_size, max(batcher.stats.batches)
        finally:
            await batcher.close()

    assert asyncio.run(go()) == (5, 5)
    assert tiny_reference.warmed_batch_size >= 5


def test_closed_batcher_refuses_work(tiny_reference: ModelRunner, frames: Frames) -> None:
    async def go() -> None:
        batcher = await started(tiny_reference)
        await batcher.close()
        with pytest.raises(NotReady):
            await batcher.infer(frames(1, seed=0))

    asyncio.run(go())
