"""Service pipeline, batching: coroutines' items queued for one stage, run in batches on its own threads."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
BatchFn = Callable[[list[In]], Sequence[Any]]  # one result per item: its value, or the exception it raised


class Overloaded(RuntimeError):
    """Work refused because a queue is full; `retry_after_s` estimates when it drains."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(order=True)
class _Queued:
    key: float  # smaller first, then by arrival
    seq: int
    item: Any = field(compare=False)
    waiter: asyncio.Future[Any] = field(compare=False)


class Batcher(Generic[In, Out]):
    """A stage behind a bounded queue: awaited items run as calls of `fn` on lists, on `workers` threads.

    A worker takes up to `max_batch` queued items, smallest `key` first. Under load (its last batch held
    more than one item) it first waits up to `max_wait_ms` for stragglers: a fuller forward for a
    millisecond. While `hold(key)` is true for the smallest key queued it leaves the queue to fill (up to
    `max_batch`): the next stage is kept busy by work that runs before these items would, so running them
    now would only queue them there, whereas run when it frees up, the backlog shares one call. Coroutines wait
    without holding a thread; each batch settles its waiters with one call per event loop. `fn` returns one
    result per item, an exception instance for an item that failed alone; an exception it raises fails the
    whole batch. Past `max_queue` waiting items a call is refused with Overloaded (the admission signal).
    Batches led by an item whose key passes `long_key` run on all workers but one at most.
    """

    def __init__(self, fn: BatchFn[In], name: str, *, max_batch: int = 32, max_wait_ms: float = 1.0, workers: int = 1,
                 max_queue: int = 4096, hold: Callable[[float], bool] | None = None, long_key: float = math.inf,
                 observe: Callable[[int], None] | None = None):
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be at least 1")
        self.fn, self.name, self.max_batch, self.workers = fn, name, max_batch, workers
        self.max_wait_s, self.max_queue = max_wait_ms / 1000, max_queue
        self.hold, self.observe = hold or (lambda _: False), observe
        self._running_keys: list[float] = []  # of the batches running now (their first item's)
        # batches whose first item's key passes long_key run on all workers but one: a short item always finds one
        self.long_key, self.max_long, self._long_running = long_key, max(1, workers - 1), 0
        self._queue: list[_Queued] = []  # a heap
        self._seq = 0
        self._closed = False
        self._cond = threading.Condition()  # guards the queue, the counters and _closed
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def __call__(self, item: In, key: float = 0.0) -> Out:
        """The item's result (or its exception), once a batch has run it."""
        waiter: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.name} stage is closed")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"the {self.name} stage has {len(self._queue)} items queued; retry later", 1)
            heapq.heappush(self._queue, _Queued(key, self._seq, item, waiter))
            self._seq += 1
            self._cond.notify()
        return await waiter

    def busy_before(self, key: float) -> bool:
        """Whether work that runs before an item of this key (no larger) fills the stage: such an item
        waits in the queue, or every worker runs one."""
        with self._cond:
            queued = bool(self._queue) and self._queue[0].key <= key
            return queued or sum(k <= key for k in self._running_keys) >= self.workers

    def close(self) -> None:
        """Stop the workers once the queued items have run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _ready(self) -> bool:
        if not self._queue:
            return self._closed
        first = self._queue[0].key
        if first > self.long_key and self._long_running >= self.max_long:
            return False  # only long items wait (the heap's smallest is long), and they have their share
        return self._closed or len(self._queue) >= self.max_batch or not self.hold(first)

    def _take(self, busy: bool) -> list[_Queued] | None:
        """The next batch (waiting for stragglers when this worker's last batch was `busy`); None once closed
        and drained."""
        with self._cond:
            while True:
                while not self._ready():
                    self._cond.wait(self.max_wait_s or 0.001 if self._queue else None)  # a hold is re-checked
                if not busy or self._closed:
                    break
                deadline = time.monotonic() + self.max_wait_s
                while len(self._queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if self._ready():  # another worker may have taken the short items meanwhile, leaving long ones
                    break
            if not self._queue:
                return None
            self._running_keys.append(self._queue[0].key)
            self._long_running += self._queue[0].key > self.long_key
            return [heapq.heappop(self._queue) for _ in range(min(self.max_batch, len(self._queue)))]

    def _work(self) -> None:
        busy = False  # per worker: one worker's full batch says nothing of the load on another's
        while (batch := self._take(busy)) is not None:
            busy = len(batch) > 1
            try:
                self._run([q for q in batch if not q.waiter.done()])  # done: its client went away
            finally:
                with self._cond:
                    self._running_keys.remove(batch[0].key)
                    if batch[0].key > self.long_key:
                        self._long_running -= 1
                        self._cond.notify_all()

    def _run(self, batch: list[_Queued]) -> None:
        if not batch:
            return
        if self.observe is not None:
            self.observe(len(batch))
        try:
            results = list(self.fn([q.item for q in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 (every waiter of the batch gets it)
            results = [exc] * len(batch)
        _settle([q.waiter for q in batch], results)


def _settle(waiters: Sequence[asyncio.Future[Any]], results: Sequence[Any]) -> None:
    """Hand each waiter its result, in one call per event loop (a future is only touched from its loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for waiter, result in zip(waiters, results, strict=True):
        by_loop.setdefault(waiter.get_loop(), []).append((waiter, result))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is left to await these
            loop.call_soon_threadsafe(_resolve, pairs)


def _resolve(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for waiter, result in pairs:
        if waiter.done():  # cancelled: the client went away
            continue
        if isinstance(result, BaseException):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)
