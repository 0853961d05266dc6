"""Batching: awaited items share one call of their stage, results and errors go back to the right caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from indexer.encoder import DualEncoder
from service.pipeline.admission import Admission
from service.pipeline.batcher import Batcher, Overloaded
from service.pipeline.cache import QueryCache
from service.pipeline.stages import TextStage


class Recorder:
    """A batch function that records each call's items and thread, holds the call holding item 0 until
    `release`, fails a whole batch holding -1, fails item -2 alone, and adds 100 to the rest."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, items: list[int]) -> list[Any]:
        self.calls.append((threading.current_thread().name, list(items)))
        if 0 in items:
            self.entered.set()
            self.release.wait(5)
        if -1 in items:
            raise ValueError("negative")
        return [ValueError("minus two") if i == -2 else i + 100 for i in items]


def run_behind_a_held_batch(batcher: Batcher[int, int], rec: Recorder, items: Sequence[tuple[int, float]],
                            then: Callable[[], None] = lambda: None) -> list[Any]:
    """Hold the batcher on item 0, queue `items` (value, key) behind it, run `then`, release; the results."""

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(batcher(0))
        while not rec.entered.is_set():
            await asyncio.sleep(0.001)
        waiting = [asyncio.ensure_future(batcher(i, key=key)) for i, key in items]
        await asyncio.sleep(0.02)  # every coroutine is queued, none holding a thread
        assert len(rec.calls) == 1 and not any(w.done() for w in waiting)  # only the held batch has run
        then()
        rec.release.set()
        return [await first, *await asyncio.gather(*waiting, return_exceptions=True)]

    return asyncio.run(scenario())


def test_items_queued_behind_a_running_batch_share_the_next_ones_bounded_by_max_batch() -> None:
    rec, sizes = Recorder(), []
    batcher = Batcher(rec, "w", max_batch=8, max_wait_ms=0, observe=sizes.append)
    got = run_behind_a_held_batch(batcher, rec, [(i, 0.0) for i in range(1, 11)])
    batcher.close()
    assert got == [100 + i for i in range(11)]
    assert [len(items) for _, items in rec.calls] == [1, 8, 2] == sizes
    assert all(thread.startswith("w-") for thread, _ in rec.calls)


def test_the_smallest_key_goes_first_then_arrival() -> None:
    rec = Recorder()
    batcher = Batcher(rec, "w", max_batch=2, max_wait_ms=0)
    run_behind_a_held_batch(batcher, rec, [(1, 5.0), (2, 1.0), (3, 5.0), (4, 0.5)])
    batcher.close()
    assert [items for _, items in rec.calls] == [[0], [4, 2], [1, 3]]


def test_an_error_reaches_every_caller_of_its_batch_an_item_error_only_its_own() -> None:
    rec = Recorder()
    batcher = Batcher(rec, "w", max_batch=8, max_wait_ms=0)
    got = run_behind_a_held_batch(batcher, rec, [(5, 0.0), (-2, 0.0), (6, 0.0)])
    assert got[:2] == [100, 105] and isinstance(got[2], ValueError) and got[3] == 106
    with pytest.raises(ValueError, match="negative"):
        asyncio.run(batcher(-1))
    assert asyncio.run(batcher(7)) == 107  # the worker carries on
    batcher.close()


def test_wrong_result_count_is_an_error_not_a_hang() -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: [], "w")
    with pytest.raises(RuntimeError, match="0 results for 1"):
        asyncio.run(batcher(1))
    batcher.close()


def test_a_held_stage_lets_its_queue_fill_then_runs_it_as_one_batch() -> None:
    rec, held = Recorder(), threading.Event()
    held.set()
    batcher = Batcher(rec, "w", max_batch=4, max_wait_ms=1, hold=lambda key: held.is_set() and key < 10)
    rec.release.set()

    async def scenario() -> list[Any]:
        waiting = [asyncio.ensure_future(batcher(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        assert not rec.calls  # held: nothing ran
        held.clear()
        return list(await asyncio.gather(*waiting))

    assert asyncio.run(scenario()) == [101, 102, 103] and [items for _, items in rec.calls] == [[1, 2, 3]]
    held.set()
    assert asyncio.run(asyncio.wait_for(batcher(20, key=50), 5)) == 120  # its key is not held
    assert asyncio.run(asyncio.wait_for(_many(batcher, range(10, 14)), 5)) == [110, 111, 112, 113]  # max_batch
    batcher.close()


async def _many(batcher: Batcher[int, int], items: range) -> list[int]:
    return list(await asyncio.gather(*(batcher(i) for i in items)))


def test_a_full_queue_refuses_and_a_closed_stage_drains_then_refuses() -> None:
    rec = Recorder()
    batcher = Batcher(rec, "w", max_batch=8, max_wait_ms=0, max_queue=2)

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher(0))
        while not rec.entered.is_set():
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(batcher(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="2 items queued"):
            await batcher(3)
        closing = asyncio.get_running_loop().run_in_executor(None, batcher.close)
        await asyncio.sleep(0.01)
        rec.release.set()
        await closing
        assert await first == 100 and await asyncio.gather(*queued) == [101, 102]  # drained before it stopped

    asyncio.run(scenario())
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(batcher(4))


def test_a_cancelled_coroutine_is_skipped_and_breaks_nothing() -> None:
    rec = Recorder()
    batcher = Batcher(rec, "w", max_batch=8, max_wait_ms=0)

    async def scenario() -> int:
        first = asyncio.ensure_future(batcher(0))
        while not rec.entered.is_set():
            await asyncio.sleep(0.001)
        gone, kept = asyncio.ensure_future(batcher(1)), asyncio.ensure_future(batcher(2))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while its item queued
        rec.release.set()
        await first
        return await kept

    assert asyncio.run(scenario()) == 102 and rec.calls[1][1] == [2]
    batcher.close()


def test_workers_run_batches_side_by_side() -> None:
    inside, both = threading.Semaphore(0), threading.Event()
    seen: list[int] = []

    def meet(items: list[int]) -> list[int]:
        seen.extend(items)
        inside.release()
        if len(seen) == 2:
            both.set()
        return [int(both.wait(5))] * len(items)

    batcher = Batcher(meet, "w", max_batch=1, workers=2)
    assert asyncio.run(_many(batcher, range(2))) == [1, 1]  # each waited for the other: two at once
    batcher.close()


def test_long_items_never_take_every_worker() -> None:
    running, most_long, lock = [0, 0], [0], threading.Lock()
    order: list[int] = []

    def step(items: list[int]) -> list[int]:
        long = items[0] >= 100
        with lock:
            running[long] += 1
            most_long[0] = max(most_long[0], running[1])
            order.append(items[0])
        threading.Event().wait(0.02)
        with lock:
            running[long] -= 1
        return items

    batcher = Batcher(step, "w", max_batch=1, max_wait_ms=0, workers=2, long_key=50)

    async def scenario() -> list[int]:
        longs = [asyncio.ensure_future(batcher(i, key=100 + i)) for i in range(100, 104)]
        await asyncio.sleep(0.005)
        short = await batcher(1, key=1)  # a worker is always free for it
        await asyncio.gather(*longs)
        return [short]

    assert asyncio.run(scenario()) == [1]
    batcher.close()
    assert most_long[0] == 1 and order.index(1) <= 2  # the short one ran at once, beside the first long one


def test_text_stage_batches_match_single_encodes_with_tokens_or_without(encoder: DualEncoder) -> None:
    texts = [f"a {c} circle left of a small {d} square" for c in ("red", "blue", "green") for d in ("white", "cyan")]
    none = QueryCache(None, 1)
    with_tokens, pooled_only = TextStage(encoder, none, True), TextStage(encoder, none, False)
    pooled, tokens, mask = encoder.encode_texts_and_tokens(texts)
    for i, enc in enumerate(with_tokens(texts)):
        np.testing.assert_allclose(enc.pooled, pooled[i], atol=1e-5)
        np.testing.assert_allclose(enc.tokens[mask[i]], tokens[i][mask[i]], atol=1e-4)
        assert (enc.mask == mask[i]).all()
    plain = pooled_only(texts)
    np.testing.assert_allclose(np.stack([e.pooled for e in plain]), pooled, atol=1e-5)
    assert all(e.tokens.shape[0] == 0 for e in plain)  # nobody asked for them


def test_admission_bounds_the_work_ahead_per_tier_and_says_when_to_retry() -> None:
    admission = Admission(bound=512, workers=2)
    heavy = [admission.admit("early", 256), admission.admit("early", 256)]
    with pytest.raises(Overloaded, match="512 candidates queued ahead") as refused:
        admission.admit("early", 256)
    assert refused.value.retry_after_s >= 1
    small = admission.admit("early", 16)  # smaller requests go first: the large ones are not ahead of it
    other = admission.admit("mid", 256)  # another tier has its own queue
    admission.scored(heavy[0], 128, 2.56)  # 20 ms per candidate
    assert admission.queued("early") == 128 + 256 + 16
    with pytest.raises(Overloaded) as refused:
        admission.admit("early", 256)
    assert refused.value.retry_after_s == 4  # 400 candidates ahead at 20 ms each on two workers
    admission.release(heavy[1])
    admission.admit("early", 256)
    for ticket in (small, other):
        admission.release(ticket)
    assert admission.queued("mid") == 0
