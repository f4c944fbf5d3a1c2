"""The dynamic batcher: one future per request, batches of up to maxBatchSize frames, one forward
pass at a time on a dedicated thread. Knows asyncio and numpy, not protobuf or torch.

The rule: a request that reaches an idle model with an empty queue is dispatched at once (waiting
would only add latency, nothing can join it). Requests that arrive while the model is busy queue;
when the model frees, the queued frames leave at once if they fill a batch or the oldest has waited
maxQueueDelay, otherwise the batcher lingers until one of the two holds. A batch counts as full at
maxBatchSize or at the demand of the previous cycle (the most frames that were queued or computing
at once between the last two dispatches), whichever is smaller: with 4 requests in flight a batch
of 4 leaves as soon as the 4th arrives, instead of waiting maxQueueDelay for 8 that never come;
and a head request that finds the model idle waits for that demand too (so a convoy of 4 is not
split into 1 + 3), which at concurrency 1 is no wait at all. Requests carrying several
frames are split across batches when needed and their logits merged back in order. A full queue
rejects at once; requests whose deadline passed (or whose caller went away) are dropped before
compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from fleet_proto.tensors import Frames, Logits
from fleet_spec.contract import BatchSettings

from fleet_server import metrics
from fleet_server.errors import DeadlineExpired, NotReady, QueueFull, TooLarge
from fleet_server.stats import ModelStats

log = logging.getLogger(__name__)
# Forward passes that fail in a row before the worker reports itself unhealthy (a sticky device
# error fails every batch; one bad batch does not). A pass that succeeds makes it healthy again.
FAILURES_UNHEALTHY = 3


class Runner(Protocol):
    """What the batcher needs from a model runner."""

    warmed_batch_size: int

    def infer(self, parts: list[Frames]) -> Logits: ...

    def warm_up(self, max_batch_size: int) -> None: ...


@dataclass(eq=False)
class _Pending:
    frames: Frames
    future: asyncio.Future[Logits]
    enqueued: float
    deadline: float | None
    taken: int = 0  # frames handed to a batch so far
    done: int = 0  # frames whose logits are in `out`
    out: Logits | None = None


@dataclass(eq=False)
class _Slice:
    request: _Pending
    start: int
    count: int


@dataclass
class _Queue:
    items: deque[_Pending] = field(default_factory=deque)
    frames: int = 0  # frames not yet handed to a batch


class Batcher:
    """Queues frames, forms batches, runs them on one executor thread, resolves the futures."""

    def __init__(
        self,
        runner: Runner,
        settings: BatchSettings,
        *,
        model: str,
        stats: ModelStats | None = None,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.failures = 0  # forward passes failed in a row
        self._on_health = on_health
        self._warming: asyncio.Task[None] | None = None
        self.stats = stats if stats is not None else ModelStats()
        self._queue = _Queue()
        self._computing = 0  # frames in the forward pass now
        self._peak = 0  # most frames queued or computing at once since the last dispatch
        self._demand = 1  # that peak for the previous cycle: the batch worth waiting for
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # One thread runs every forward pass, warm-up included, so torch's per-thread state
        # (OpenMP team, CUDA context and streams) is built once, before the first request.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{model}")
        self._m_depth = metrics.QUEUE_DEPTH.labels(model=model)
        self._m_queue = metrics.QUEUE_DURATION.labels(model=model)
        self._m_compute = metrics.COMPUTE_DURATION.labels(model=model)
        self._m_batch = metrics.BATCH_SIZE.labels(model=model)

    @property
    def healthy(self) -> bool:
        return self.failures < FAILURES_UNHEALTHY

    async def start(self, warm_budget_s: float = math.inf) -> None:
        """Warm up batch sizes 1, 2, ... on the forward thread for up to `warm_budget_s` (at
        least size 1), then accept work; the sizes left are warmed in the background."""
        give_up = time.perf_counter() + warm_budget_s
        target = self.settings.max_batch_size
        while self.runner.warmed_batch_size < target:
            if self.runner.warmed_batch_size >= 1 and time.perf_counter() >= give_up:
                log.info(
                    "warm-up budget of %.0fs spent at batch size %d; warming the rest while "
                    "serving",
                    warm_budget_s,
                    self.runner.warmed_batch_size,
                )
                break
            await self._warm_one()
        self._task = asyncio.create_task(self._dispatch_forever(), name="batcher")
        self._warm_in_background()

    async def _warm_one(self) -> None:
        """Warm the next batch size: one job on the forward thread, between real batches."""
        size = self.runner.warmed_batch_size + 1
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.runner.warm_up, size)

    def _warm_in_background(self) -> None:
        if self._warming is None or self._warming.done():
            self._warming = asyncio.create_task(self._warm_up_to_target(), name="warm-up")

    async def _warm_up_to_target(self) -> None:
        """Warm sizes up to maxBatchSize one at a time; batches stay within the warm sizes
        meanwhile. A size that fails to warm (e.g. out of memory) is logged and not used."""
        try:
            while self.runner.warmed_batch_size < self.settings.max_batch_size:
                await self._warm_one()
                self._wake.set()
        except Exception:
            log.exception(
                "warming batch size %d failed; batches stay at most %d frames",
                self.runner.warmed_batch_size + 1,
                self.runner.warmed_batch_size,
            )

    async def wait_warm(self) -> None:
        """Return once the background warm-up is over (done or failed)."""
        if self._warming is not None:
            await asyncio.shield(self._warming)

    def apply(self, settings: BatchSettings) -> None:
        """Apply new batching settings at once; a larger maxBatchSize is warmed up in the
        background, and batches grow as their sizes become warm."""
        self.settings = settings
        self._wake.set()
        self._warm_in_background()

    @property
    def batch_limit(self) -> int:
        """The most frames a batch may take now: maxBatchSize, within the warm sizes."""
        return max(1, min(self.settings.max_batch_size, self.runner.warmed_batch_size))

    @property
    def demand(self) -> int:
        """Frames the batcher waits for before a batch counts as full (at most the batch limit)."""
        return min(self.batch_limit, self._demand)

    @property
    def queued_frames(self) -> int:
        return self._queue.frames

    async def infer(self, frames: Frames, deadline: float | None = None) -> Logits:
        """Logits for frames [n, H, W, 3]; `deadline` is a time.perf_counter() value."""
        return await self.submit(frames, deadline)

    def submit(self, frames: Frames, deadline: float | None = None) -> asyncio.Future[Logits]:
        """Queue frames [n, H, W, 3]; the future gets their logits. Raises when it cannot queue.

        Cancelling the future before its batch forms drops the frames.
        """
        if self._closing or self._task is None or self._task.done():
            raise NotReady("the worker is not accepting requests (warming up or shutting down)")
        n = int(frames.shape[0])
        limit = self.settings.max_queue_size
        if n > limit:
            raise TooLarge(f"{n} frames can never fit the queue of maxQueueSize {limit} frames")
        if self._queue.frames + n > limit:
            raise QueueFull(
                f"queue full: {self._queue.frames} frames waiting, {n} more would exceed "
                f"maxQueueSize {limit}"
            )
        future: asyncio.Future[Logits] = asyncio.get_running_loop().create_future()
        self._queue.items.append(_Pending(frames, future, time.perf_counter(), deadline))
        self._queue.frames += n
        self._peak = max(self._peak, self._queue.frames + self._computing)
        self._m_depth.set(self._queue.frames)
        self._wake.set()
        return future

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the forward thread."""
        self._closing = True
        self._wake.set()
        if self._warming is not None:
            self._warming.cancel()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _dispatch_forever(self) -> None:
        fresh = True  # the model was idle with an empty queue when the head request arrived
        while True:
            if not self._queue.items:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                fresh = True
                continue
            if not fresh or self._demand > 1:
                await self._linger()
            fresh = False
            self._demand = max(1, self._peak)
            batch = self._take()
            self._peak = self._queue.frames + sum(s.count for s in batch)
            if batch:
                await self._execute(batch)

    async def _linger(self) -> None:
        """Wait for more frames until a batch is full (maxBatchSize, or the demand when that is
        less) or the oldest request waited maxQueueDelay."""
        while self._queue.items and not self._closing:
            settings = self.settings
            if self._queue.frames >= self.demand:
                return
            remaining = (
                self._queue.items[0].enqueued + settings.max_queue_delay_s - time.perf_counter()
            )
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    def _take(self) -> list[_Slice]:
        """Up to maxBatchSize frames from the head of the queue; expired requests are failed."""
        room = self.batch_limit
        now = time.perf_counter()
        batch: list[_Slice] = []
        queue = self._queue
        while queue.items and room > 0:
            head = queue.items[0]
            left = int(head.frames.shape[0]) - head.taken
            if head.future.done():  # the caller went away (cancelled) or a batch failed
                queue.items.popleft()
                queue.frames -= left
                continue
            if head.taken == 0 and head.deadline is not None and now >= head.deadline:
                queue.items.popleft()
                queue.frames -= left
                head.future.set_exception(
                    DeadlineExpired("deadline exceeded while waiting in the queue")
                )
                continue
            if head.taken == 0:
                self._m_queue.observe(now - head.enqueued)
                self.stats.record_queue(now - head.enqueued)
            count = min(left, room)
            batch.append(_Slice(head, head.taken, count))
            head.taken += count
            queue.frames -= count
            room -= count
            if head.taken == head.frames.shape[0]:
                queue.items.popleft()
        self._m_depth.set(queue.frames)
        return batch

    async def _execute(self, batch: list[_Slice]) -> None:
        parts = [s.request.frames[s.start : s.start + s.count] for s in batch]
        total = sum(s.count for s in batch)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._computing = total
        try:
            logits = await loop.run_in_executor(self._executor, self.runner.infer, parts)
            if logits.shape[0] != total:
                raise RuntimeError(f"model returned {logits.shape[0]} rows for {total} frames")
        except Exception as exc:
            log.exception("forward pass of %d frames failed", total)
            self._count_failure(failed=True)
            for s in batch:
                if not s.request.future.done():
                    s.request.future.set_exception(exc)
            return
        finally:
            self._computing = 0
        self._count_failure(failed=False)
        elapsed = time.perf_counter() - started
        self._m_compute.observe(elapsed)
        self._m_batch.observe(total)
        self.stats.record_batch(total, len(batch), elapsed)
        offset = 0
        for s in batch:
            self._deliver(s, logits[offset : offset + s.count])
            offset += s.count

    def _count_failure(self, failed: bool) -> None:
        was = self.healthy
        self.failures = self.failures + 1 if failed else 0
        if self.healthy != was:
            if not self.healthy:
                log.error("%d forward passes failed in a row: reporting NOT_SERVING", self.failures)
            if self._on_health is not None:
                self._on_health(self.healthy)

    @staticmethod
    def _deliver(s: _Slice, rows: Logits) -> None:
        request = s.request
        if request.future.done():
            return
        n = int(request.frames.shape[0])
        if s.count == n:
            request.future.set_result(rows)
            return
        if request.out is None:
            request.out = np.empty((n, rows.shape[1]), dtype=np.float32)
        request.out[s.start : s.start + s.count] = rows
        request.done += s.count
        if request.done == n:
            request.future.set_result(request.out)
