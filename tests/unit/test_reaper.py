"""The reaper on virtual time, against a fake store."""

from __future__ import annotations

import logging

import pytest
import trio

from spectral.actors.reaper import REAP_BATCH, Reaper
from spectral.errors import DatabaseError, DatabaseUnavailableError

from ..fakes import FakeStore, make_state


async def lapsed(store: FakeStore, n: int, *, worker_id: str = "dead-worker") -> list[int]:
    """Add ``n`` rows claimed by a worker whose claim has already run out."""
    ids = [store.add("order.created", {"n": i}, notify=False) for i in range(n)]
    claimed = await store.claim(1, n, worker_id, 1.0)
    assert len(claimed) == n
    await trio.sleep(2)
    return ids


async def test_defaults_nothing_happens_before_run(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    reaper = Reaper(store, state, interval=10)
    assert reaper.passes == 0
    assert store.calls == []


async def test_starts_and_is_cancelled_at_once(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(Reaper(store, state, interval=10).run)
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 0


async def test_run_once_returns_the_count_and_runs_twice(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    ids = await lapsed(store, 3)
    reaper = Reaper(store, state, interval=10)
    assert await reaper.run_once() == 3
    assert await reaper.run_once() == 0
    assert reaper.passes == 2
    assert state.counters.reaped == 3
    for event_id in ids:
        row = store.row(event_id)
        assert (row.status, row.attempts) == ("PENDING", 1), "a reaped row is charged an attempt"
        assert row.last_error is not None and "dead-worker" in row.last_error


async def test_live_claims_are_left_alone(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    event_id = store.add("order.created")
    await store.claim(1, 1, "live-worker", 300.0)
    assert await Reaper(store, state, interval=10).run_once() == 0
    assert store.status(event_id) == "CLAIMED"


async def test_repeats_while_batches_are_full(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    await lapsed(store, 2 * REAP_BATCH + 7)
    assert await Reaper(store, state, interval=10).run_once() == 2 * REAP_BATCH + 7
    assert [c.args for c in store.calls if c.name == "reap"] == [(REAP_BATCH,)] * 3


async def test_an_exactly_full_batch_is_followed_by_one_more_query(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    await lapsed(store, REAP_BATCH)
    assert await Reaper(store, state, interval=10).run_once() == REAP_BATCH
    assert store.count("reap") == 2


async def test_wakes_the_claimer_only_when_it_reaped(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    reaper = Reaper(store, state, interval=10)
    await reaper.run_once()
    assert not await state.wait_for_work(0.001)
    await lapsed(store, 1)
    await reaper.run_once()
    assert await state.wait_for_work(0.001)


async def test_passes_run_every_interval(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(Reaper(store, state, interval=10).run)
        await trio.sleep(35)
        assert store.times("reap") == pytest.approx([0, 10, 20, 30])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("error", [DatabaseError("deadlock detected"),
                                   DatabaseUnavailableError("connection refused")])
async def test_failed_pass_is_logged_and_the_next_runs_on_schedule(
    autojump_clock: object, caplog: pytest.LogCaptureFixture, error: DatabaseError,
) -> None:
    store, state = FakeStore(), make_state()
    await lapsed(store, 2)
    start = trio.current_time()
    store.fail_next("reap", error)
    reaper = Reaper(store, state, interval=10)
    with caplog.at_level(logging.WARNING, logger="spectral.reaper"):
        async with trio.open_nursery() as nursery:
            await nursery.start(reaper.run)
            await trio.sleep(15)
            nursery.cancel_scope.cancel()
    assert [t - start for t in store.times("reap")] == pytest.approx([0, 10])
    assert state.counters.reaped == 2
    assert reaper.passes == 1
    assert any("reaper pass failed" in r.getMessage() and str(error) in r.getMessage()
               for r in caplog.records)
