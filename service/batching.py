"""Service stage, micro-batching: concurrent queries share one encoder forward and one FAISS search."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class BatchStats:
    """Counts for /metrics: how many batches ran and how many items they held."""

    batches: int = 0
    items: int = 0
    largest: int = 0


class MicroBatcher(Generic[In, Out]):
    """Groups items submitted from many threads into calls of `fn` on lists, then splits the results.

    One worker thread takes the first waiting item and everything queued behind it (up to
    `max_batch`). While a batch runs, new requests queue up and form the next batch, so an idle
    service adds no latency. Under load (the last batch held more than one item) the worker also
    waits up to `max_wait_ms` for stragglers, which trades a millisecond for a fuller forward.
    """

    def __init__(self, fn: Callable[[list[In]], Sequence[Out]], max_batch: int = 32, max_wait_ms: float = 2.0,
                 name: str = "batch"):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: queue.Queue[tuple[In, Future[Out]] | None] = queue.Queue()
        self._busy = False  # the previous batch held more than one item
        self._closed = False
        self._lock = threading.Lock()  # orders submits against close: nothing is queued after the sentinel
        self._thread = threading.Thread(target=self._run, name=f"microbatch-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Future[Out]:
        future: Future[Out] = Future()
        with self._lock:
            if not self._closed:
                self._queue.put((item, future))
                return future
        self._execute([(item, future)])  # closed (an index version being retired): run it here
        return future

    def __call__(self, item: In) -> Out:
        """Submit and wait; exceptions raised by `fn` are raised here, in the caller's thread."""
        return self.submit(item).result()

    def close(self) -> None:
        """Stop the worker after the queued items; later submits run in the caller's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=30)

    def _collect(self, first: tuple[In, Future[Out]]) -> tuple[list[tuple[In, Future[Out]]], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + (self.max_wait_s if self._busy else 0.0)
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                got = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if got is None:
                stop = True
                break
            batch.append(got)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self._busy = len(batch) > 1
            self._execute(batch)
            if stop:
                break
        while True:  # items queued between the batch and the sentinel
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._execute([item])

    def _execute(self, batch: list[tuple[In, Future[Out]]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self.fn([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"batched function returned {len(results)} results for {len(live)} items")
        except BaseException as exc:  # noqa: BLE001 (handed to every waiting caller)
            for _, fut in live:
                fut.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.largest = max(self.stats.largest, len(live))
        for (_, fut), result in zip(live, results, strict=True):
            fut.set_result(result)
