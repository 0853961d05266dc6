"""Micro-batching: concurrent callers share one call, results go back to the right caller, errors too."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from indexer.encoder import DualEncoder
from service.admission import Admission, Overloaded
from service.batching import AGAIN, Again, MicroBatcher, StagedBatcher
from service.encoding import QueryEncoder


def test_items_queued_behind_a_running_batch_form_one_batch() -> None:
    release = threading.Event()
    sizes: list[int] = []

    def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if items == [0]:
            release.wait(5)  # hold the worker while the others queue up
        return [2 * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(double, max_batch=8, max_wait_ms=0)
    first = batcher.submit(0)
    while not sizes:  # the worker is now inside the first call
        threading.Event().wait(0.001)
    rest = [batcher.submit(i) for i in range(1, 11)]
    release.set()
    assert first.result(5) == 0 and [f.result(5) for f in rest] == [2 * i for i in range(1, 11)]
    assert sizes == [1, 8, 2]  # bounded by max_batch
    assert batcher.stats.items == 11 and batcher.stats.largest == 8
    batcher.close()


def test_an_error_reaches_every_caller_of_the_batch_and_the_worker_survives() -> None:
    def fail_on_negative(items: list[int]) -> list[int]:
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(fail_on_negative, max_batch=4)
    with pytest.raises(ValueError, match="negative"):
        batcher(-1)
    assert batcher(3) == 3
    batcher.close()


def test_wrong_result_count_is_an_error_not_a_hang() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [], max_batch=4)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        batcher.submit(1).result(5)
    batcher.close()


def test_concurrent_text_queries_match_single_encodes(encoder: DualEncoder) -> None:
    texts = [f"a {c} circle left of a small {d} square" for c in ("red", "blue", "green", "yellow")
             for d in ("white", "purple", "orange", "cyan")]
    queries = QueryEncoder(encoder, max_batch=8)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(queries.text, texts))
    pooled, tokens, mask = encoder.encode_texts_and_tokens(texts)
    for i, enc in enumerate(got):
        np.testing.assert_allclose(enc.pooled, pooled[i], atol=1e-5)
        np.testing.assert_allclose(enc.tokens[mask[i]], tokens[i][mask[i]], atol=1e-4)
        assert (enc.mask == mask[i]).all()
    batched = queries.metrics.registry.get_sample_value("imsearch_batch_size_sum", {"batcher": "text"})
    assert batched == len(texts)  # every text went through a batch
    queries.close()


def test_after_close_calls_still_complete_in_the_callers_thread() -> None:
    threads: list[str] = []

    def record(items: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(record, name="retiring")
    assert batcher.submit(1).result(5) == 1
    batcher.close()
    assert batcher(2) == 2  # an in-flight request on a retired index version still gets its answer
    assert threads[0] == "microbatch-retiring" and threads[1] == threading.current_thread().name


def recording_batcher(release: threading.Event, entered: threading.Event | None = None
                      ) -> tuple[MicroBatcher[int, int], list[tuple[str, list[int]]]]:
    """A batcher ("w") that records (thread, sorted items) per call, holds the call of item 0 until
    `release` (setting `entered` first), refuses -1 and adds 100 to the rest."""
    calls: list[tuple[str, list[int]]] = []

    def record(items: list[int]) -> list[int]:
        calls.append((threading.current_thread().name, sorted(items)))
        if items == [0]:
            if entered is not None:
                entered.set()
            release.wait(5)
        if -1 in items:
            raise ValueError("negative")
        return [i + 100 for i in items]

    return MicroBatcher(record, max_batch=8, max_wait_ms=0, name="w"), calls


def test_an_idle_call_runs_inline_and_calls_behind_a_batch_join_the_next_one() -> None:
    release = threading.Event()
    batcher, calls = recording_batcher(release)
    assert batcher(5) == 105  # idle: no hand-off to the worker
    assert calls == [(threading.current_thread().name, [5])]
    first = batcher.submit(0)
    while len(calls) < 2:
        threading.Event().wait(0.001)
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(batcher, i) for i in (1, 2, 3)]
        while len(batcher._pending) < 3:  # all three queued behind the running batch
            threading.Event().wait(0.001)
        release.set()
        assert [f.result(5) for f in waiting] == [101, 102, 103] and first.result(5) == 100
    assert calls[1:] == [("microbatch-w", [0]), ("microbatch-w", [1, 2, 3])]
    batcher.close()


def test_items_submitted_while_an_inline_call_runs_are_run_by_the_worker_after_it() -> None:
    entered, release = threading.Event(), threading.Event()
    batcher, calls = recording_batcher(release, entered)
    with ThreadPoolExecutor(1) as pool:
        inline = pool.submit(batcher, 0)  # idle: runs in the pool's thread
        assert entered.wait(5)
        queued = [batcher.submit(i) for i in (1, 2)]
        release.set()  # the inline call ends and must hand the queued items to the worker
        assert inline.result(5) == 100 and [f.result(5) for f in queued] == [101, 102]
    assert calls[0][0].startswith("ThreadPoolExecutor") and calls[1] == ("microbatch-w", [1, 2])
    batcher.close()


def test_coroutines_queued_behind_a_batch_share_the_next_one_and_get_their_own_results() -> None:
    release = threading.Event()
    batcher, calls = recording_batcher(release)

    async def scenario() -> tuple[int, list[int], int, str]:
        alone = await batcher.acall(5, inline=True)  # idle: runs here, in the loop's thread
        first = batcher.submit(0)  # holds the worker
        while len(calls) < 2:
            await asyncio.sleep(0.001)
        waiting = [asyncio.ensure_future(batcher.acall(i)) for i in (3, 1, 2)]
        await asyncio.sleep(0.01)  # every coroutine is now queued, none holding a thread
        assert len(batcher._pending) == 3 and not any(w.done() for w in waiting)
        release.set()
        got = list(await asyncio.gather(*waiting))
        with pytest.raises(ValueError, match="negative"):
            await batcher.acall(-1)  # an error in the batch is raised in the awaiting coroutine
        return alone, got, first.result(5), threading.current_thread().name

    alone, got, first, loop_thread = asyncio.run(scenario())
    assert alone == 105 and got == [103, 101, 102] and first == 100
    assert calls[:3] == [(loop_thread, [5]), ("microbatch-w", [0]), ("microbatch-w", [1, 2, 3])]
    assert calls[3] == ("microbatch-w", [-1])  # not inline: only an idle batcher asked for inline runs here
    batcher.close()


def test_a_cancelled_coroutine_does_not_break_the_batch_it_was_in() -> None:
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(slow, max_batch=8, max_wait_ms=0)

    async def scenario() -> int:
        gone = asyncio.ensure_future(batcher.acall(1))
        kept = asyncio.ensure_future(batcher.acall(2))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while its item was in the batch
        release.set()
        return await kept

    assert asyncio.run(scenario()) == 2
    assert batcher(3) == 3  # the worker carries on
    batcher.close()


def test_queries_without_rerank_get_the_same_vector_without_tokens(encoder: DualEncoder) -> None:
    texts = [f"a {c} circle above a {d} square" for c in ("red", "blue", "green") for d in ("white", "cyan")]
    queries = QueryEncoder(encoder, max_batch=4)
    with ThreadPoolExecutor(6) as pool:  # alone or batched, with or without a reranked neighbour in the batch
        plain = list(pool.map(queries.pooled, texts))
        mixed = list(pool.map(lambda i: queries.pooled(texts[i]) if i % 2 else queries.text(texts[i]).pooled,
                              range(len(texts))))
    expected = encoder.encode_texts(texts)
    np.testing.assert_allclose(np.stack(plain), expected, atol=1e-5)
    np.testing.assert_allclose(np.stack(mixed), expected, atol=1e-5)
    assert asyncio.run(queries.apooled(texts[0], inline=True)) == pytest.approx(expected[0], abs=1e-5)
    assert queries.text(texts[0]).tokens.shape[0] > 0  # who asks for tokens gets them
    queries.close()


def test_staged_items_queued_behind_a_finish_are_prepared_together_and_settled_one_by_one() -> None:
    release, one_back = threading.Event(), threading.Event()
    prepared: list[list[int]] = []
    saw_one_back: list[bool] = []

    def finish(item: int) -> int:
        if item == 0:
            release.wait(5)  # hold the only worker while the others queue up
        if item == 2:  # item 1 of the same batch must have reached its caller already
            saw_one_back.append(one_back.wait(5))
        return 10 * item

    def prepare(items: list[int]) -> list[int]:
        prepared.append(items)
        return items

    staged: StagedBatcher[int, int, int] = StagedBatcher(prepare, finish, workers=1, max_batch=3)

    async def scenario() -> list[int]:
        first = asyncio.ensure_future(staged.acall(0))
        while not prepared:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(staged.acall(i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        release.set()
        assert await first == 0
        await rest[0]
        one_back.set()
        return [await f for f in rest]

    assert asyncio.run(scenario()) == [10, 20, 30, 40, 50]
    assert prepared == [[0], [1, 2, 3], [4, 5]]  # the backlog, bounded by max_batch
    assert saw_one_back == [True]  # not held until the end of its batch
    staged.close()


def test_staged_workers_finish_in_parallel_and_errors_reach_only_their_callers() -> None:
    both_in = threading.Barrier(2, timeout=5)

    def prepare(items: list[int]) -> list[int]:
        if 99 in items:
            raise ValueError("bad batch")
        return items

    def finish(item: int) -> int:
        if item < 0:
            raise KeyError(item)
        if item in (1, 2):
            both_in.wait()  # only passes when two finishes run at once
        return item

    staged: StagedBatcher[int, int, int] = StagedBatcher(prepare, finish, workers=2, max_batch=1)

    async def scenario() -> list[int]:
        parallel = await asyncio.gather(staged.acall(1), staged.acall(2))
        with pytest.raises(KeyError):
            await staged.acall(-1)
        with pytest.raises(ValueError, match="bad batch"):
            await staged.acall(99)
        return [*parallel, await staged.acall(3)]  # the workers survived both errors

    assert asyncio.run(scenario()) == [1, 2, 3]
    staged.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(staged.acall(4))


def test_staged_long_items_step_aside_for_short_ones_and_never_take_every_worker() -> None:
    order: list[tuple[str, int]] = []
    long_running, most_long = 0, 0
    lock = threading.Lock()
    steps = {"long-a": 4, "long-b": 4}

    def finish(item: str) -> str | Again:
        nonlocal long_running, most_long
        with lock:
            if item.startswith("long"):
                long_running += 1
                most_long = max(most_long, long_running)
        time.sleep(0.01)
        with lock:
            order.append((item, steps.get(item, 0)))
            if item.startswith("long"):
                long_running -= 1
                steps[item] -= 1
                return AGAIN if steps[item] > 0 else item
        return item

    staged: StagedBatcher[str, str, str] = StagedBatcher(lambda items: items, finish, workers=2, max_batch=8,
                                                         key=len, heavy=lambda item: item.startswith("long"))

    async def scenario() -> list[str]:
        long = [asyncio.ensure_future(staged.acall(name)) for name in ("long-a", "long-b")]
        while not order:
            await asyncio.sleep(0.001)
        short = await asyncio.gather(*(staged.acall(f"s{i}") for i in range(6)))
        return [*short, *(await asyncio.gather(*long))]

    assert asyncio.run(scenario()) == [*(f"s{i}" for i in range(6)), "long-a", "long-b"]
    staged.close()
    assert most_long == 1  # two workers: long items never held both
    first_short = next(i for i, (item, _) in enumerate(order) if item.startswith("s"))
    last_short = max(i for i, (item, _) in enumerate(order) if item.startswith("s"))
    longs_between = [item for item, _ in order[first_short:last_short] if item.startswith("long")]
    assert len(longs_between) <= 3  # the short ones ran beside at most a few long steps, not after all eight


def test_staged_steps_of_an_abandoned_item_are_skipped() -> None:
    calls: list[int] = []

    def finish(item: int) -> int | Again:
        calls.append(item)
        time.sleep(0.01)
        return AGAIN if len(calls) < 100 else item

    staged: StagedBatcher[int, int, int] = StagedBatcher(lambda items: items, finish, workers=1)

    async def scenario() -> None:
        task = asyncio.ensure_future(staged.acall(7))
        while len(calls) < 3:
            await asyncio.sleep(0.001)
        task.cancel()  # the client went away
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    staged.close()
    assert 3 <= len(calls) < 10


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
