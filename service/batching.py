"""Service stage, micro-batching: concurrent queries share one encoder forward and one FAISS search."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
Mid = TypeVar("Mid")
Waiter = Future[Any] | asyncio.Future[Any]  # a blocked thread's future, or an awaiting coroutine's


@dataclass
class BatchStats:
    """Counts for /metrics: how many batches ran and how many items they held."""

    batches: int = 0
    items: int = 0
    largest: int = 0

    def record(self, results: Sequence[Any], items: int) -> None:
        """Count a batch of `items` whose call returned `results` (one per item, or a RuntimeError)."""
        if len(results) != items:
            raise RuntimeError(f"batched function returned {len(results)} results for {items} items")
        self.batches += 1
        self.items += items
        self.largest = max(self.largest, items)


class MicroBatcher(Generic[In, Out]):
    """Groups items submitted from many threads or awaited on event loops into calls of `fn` on
    lists, then splits the results.

    One batch runs at a time. A blocking call that finds the batcher idle runs its item at once in
    its own thread: a hand-off to the worker costs more than a small forward when nobody else is
    waiting. Items that arrive while a batch runs queue up, and the worker thread runs them as the
    next batch (up to `max_batch`). Under load (the last batch held more than one item) the worker
    also waits up to `max_wait_ms` for stragglers, which trades a millisecond for a fuller forward.
    Coroutines that await items (`acall`) cost no thread of their own: the worker settles all of a
    batch's awaiting coroutines with one call into their event loop.
    """

    def __init__(self, fn: Callable[[list[In]], Sequence[Out]], max_batch: int = 32, max_wait_ms: float = 2.0,
                 name: str = "batch"):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.stats = BatchStats()
        self._pending: deque[tuple[In, Waiter]] = deque()
        self._cond = threading.Condition()  # guards _pending, _running, _closed; wakes the worker
        self._running = False  # a batch is executing (in the worker or inline in a caller)
        self._busy = False  # the previous batch held more than one item
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"microbatch-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Future[Out]:
        """Queue the item for the worker; closed (an index version being retired): run it here."""
        future: Future[Out] = Future()
        with self._cond:
            if not self._closed:
                self._pending.append((item, future))
                self._cond.notify()
                return future
        self._execute([(item, future)])
        return future

    def __call__(self, item: In) -> Out:
        """Run and wait; exceptions raised by `fn` are raised here, in the caller's thread."""
        if self._claim_idle():
            return self._inline(item)
        return self.submit(item).result()

    async def acall(self, item: In, inline: bool = False) -> Out:
        """Await the item's result from an event loop.

        `inline`: when the batcher is idle, run the item here at once (blocking the loop for that call:
        for the caller that knows nobody else is waiting). Otherwise the worker runs it in a batch and
        the coroutine waits without holding a thread.
        """
        if inline and self._claim_idle():
            return self._inline(item)
        waiter: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        with self._cond:
            queued = not self._closed
            if queued:
                self._pending.append((item, waiter))
                self._cond.notify()
        if not queued:  # closed: run it here
            return self._inline(item, claimed=False)
        return await waiter

    def _claim_idle(self) -> bool:
        """Mark a batch as running if none runs and none is queued; True when this caller got it."""
        with self._cond:
            idle = not (self._closed or self._running or self._pending)
            self._running = self._running or idle
        return idle

    def _inline(self, item: In, claimed: bool = True) -> Out:
        """Run one item in the calling thread (after _claim_idle, unless closed); `fn`'s errors are raised here."""
        try:
            results = self.fn([item])
            self.stats.record(results, 1)
            return results[0]
        finally:
            if claimed:
                with self._cond:
                    self._running = False
                    if self._pending:  # items queued behind this call; waking the idle worker for nothing
                        self._cond.notify()  # costs a context switch per query (profiled)

    def close(self) -> None:
        """Stop the worker after the queued items; later calls run in the caller's thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[tuple[In, Waiter]] | None:
        """Wait for work and the end of any running batch; None once closed and drained."""
        with self._cond:
            while self._running or not (self._pending or self._closed):
                self._cond.wait()
            if not self._pending:
                return None
            self._running = True
            deadline = time.monotonic() + (self.max_wait_s if self._busy and not self._closed else 0.0)
            while len(self._pending) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
            return [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._busy = len(batch) > 1
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._running = False

    def _execute(self, batch: list[tuple[In, Waiter]]) -> None:
        live = [(item, w) for item, w in batch if not isinstance(w, Future) or w.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.fn([item for item, _ in live])
            self.stats.record(results, len(live))
        except BaseException as exc:  # noqa: BLE001 (handed to every waiting caller)
            _settle([w for _, w in live], None, exc)
            return
        _settle([w for _, w in live], results, None)


def _settle(waiters: Sequence[Waiter], results: Sequence[Any] | None, exc: BaseException | None) -> None:
    """Hand results (or the exception) to their waiters: thread futures directly, coroutines' futures
    in one call per event loop (an asyncio future may only be touched from its loop's thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for i, waiter in enumerate(waiters):
        value = results[i] if results is not None else None
        if isinstance(waiter, Future):
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(value)
        else:
            by_loop.setdefault(waiter.get_loop(), []).append((waiter, value))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is left to await these
            loop.call_soon_threadsafe(_resolve, pairs, exc)


def _resolve(pairs: list[tuple[asyncio.Future[Any], Any]], exc: BaseException | None) -> None:
    for waiter, value in pairs:
        if waiter.done():  # cancelled: the client went away
            continue
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(value)


class Again:
    """What a StagedBatcher's `finish` returns when the item has more steps to run (see StagedBatcher)."""


AGAIN = Again()


@dataclass(order=True)
class _Ready(Generic[Mid, Out]):
    """A prepared item in a StagedBatcher's queue, ordered by its key, then by arrival."""

    key: float
    seq: int
    mid: Mid = field(compare=False)
    waiter: asyncio.Future[Out] = field(compare=False)


class StagedBatcher(Generic[In, Mid, Out]):
    """Heavy per-item work behind a cheap step that batches well: `prepare` runs on a list of items
    (one encoder forward, one FAISS call for all of them), `finish` on one prepared item at a time,
    on `workers` threads; coroutines await the items without holding a thread.

    A worker that needs work takes the next prepared item; when none is ready it prepares every item
    queued meanwhile (up to `max_batch`) at once. So under load the cheap step batches the whole
    backlog, where a MicroBatcher in front of it would see items one at a time: they arrive paced
    by the heavy step's completions, a whole heavy step apart. Each item is settled as soon as its
    own `finish` returns, not at the end of its batch.

    Long items do not hold up short ones. `finish` may return AGAIN: it did one step of the item's
    work, and is called again for it later, so between steps its worker takes whatever is most
    urgent. Ready items go smallest `key` first (then by arrival); items that `heavy` calls long
    queue apart and run only after the short ones and the items still to prepare, on at most
    `workers - 1` workers at once (when there are two or more), so a short item always finds a free
    one. A waiter that went away (a client that disconnected) is dropped between steps.
    """

    def __init__(self, prepare: Callable[[list[In]], Sequence[Mid]], finish: Callable[[Mid], Out | Again],
                 workers: int = 1, max_batch: int = 32, name: str = "staged",
                 key: Callable[[Mid], float] = lambda _: 0.0, heavy: Callable[[Mid], bool] = lambda _: False):
        if workers < 1 or max_batch < 1:
            raise ValueError("workers and max_batch must be at least 1")
        self.prepare, self.finish, self.max_batch = prepare, finish, max_batch
        self.key, self.heavy = key, heavy
        self.max_heavy = max(1, workers - 1)
        self.stats = BatchStats()  # of the prepare calls
        self._pending: deque[tuple[In, asyncio.Future[Out]]] = deque()
        self._light: list[_Ready[Mid, Out]] = []  # heaps
        self._long: list[_Ready[Mid, Out]] = []
        self._heavy_running = 0
        self._seq = 0
        self._cond = threading.Condition()  # guards the queues, the counters and _closed
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"staged-{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def acall(self, item: In) -> Out:
        waiter: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append((item, waiter))
            self._cond.notify()
        return await waiter

    def close(self) -> None:
        """Stop the workers once every queued item is finished."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _take_long(self) -> bool:
        return bool(self._long) and self._heavy_running < self.max_heavy

    def _next(self) -> tuple[_Ready[Mid, Out], bool] | list[tuple[In, asyncio.Future[Out]]] | None:
        """A ready item (and whether it is long), else the queued items to prepare; None once closed
        and drained."""
        with self._cond:
            while not (self._light or self._pending or self._take_long() or (self._closed and not self._long)):
                self._cond.wait()
            if self._light:
                return heapq.heappop(self._light), False
            if self._pending:
                return [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            if self._long:
                self._heavy_running += 1
                return heapq.heappop(self._long), True
            return None

    def _run(self) -> None:
        while (work := self._next()) is not None:
            if isinstance(work, list):
                self._prepare(work)
                continue
            ready, long = work
            try:
                self._step(ready)
            finally:
                if long:
                    with self._cond:
                        self._heavy_running -= 1
                        self._cond.notify_all()

    def _step(self, ready: _Ready[Mid, Out]) -> None:
        if ready.waiter.cancelled():  # the client went away while it queued
            return
        try:
            out = self.finish(ready.mid)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting caller)
            _settle([ready.waiter], None, exc)
            return
        if isinstance(out, Again):
            self._queue([ready])
        else:
            _settle([ready.waiter], [out], None)

    def _queue(self, items: Sequence[_Ready[Mid, Out]]) -> None:
        with self._cond:
            for ready in items:
                heapq.heappush(self._long if self.heavy(ready.mid) else self._light, ready)
            self._cond.notify_all()

    def _prepare(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        waiters = [w for _, w in batch]
        try:
            mids = self.prepare([item for item, _ in batch])
            self.stats.record(mids, len(batch))
        except BaseException as exc:  # noqa: BLE001 (handed to every waiting caller)
            _settle(waiters, None, exc)
            return
        with self._cond:
            start, self._seq = self._seq, self._seq + len(mids)
        self._queue([_Ready(self.key(m), start + i, m, w) for i, (m, w) in enumerate(zip(mids, waiters, strict=True))])
