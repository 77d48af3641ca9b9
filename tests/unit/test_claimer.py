"""The claimer on virtual time: claiming, concurrency, batched settling and the drain."""

from __future__ import annotations

import logging

import pytest
import trio

from spectral.actors.claimer import SETTLE_BATCHES, Claimer
from spectral.app import App
from spectral.db import Settled, Settlement
from spectral.errors import DatabaseError, DatabaseUnavailableError, ReconnectBudgetExhaustedError
from spectral.events import Event
from spectral.state import RuntimeState
from spectral.turns import RetryPolicy, TurnRunner
from spectral.tx import Tx

from ..fakes import FakeStore, FixedJitter, make_state, wait_until

FAST = "job.fast"


class Load:
    """Handlers that record how many turns run at once."""

    def __init__(self, app: App, *, seconds: float = 1.0) -> None:
        self.running = 0
        self.peak = 0
        self.done: list[int] = []

        @app.handler(FAST, name="work")
        async def work(event: Event, tx: Tx) -> None:
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await trio.sleep(seconds)
            finally:
                self.running -= 1
            self.done.append(event.id)


def build(store: FakeStore, state: RuntimeState, app: App, *, concurrency: int = 4,
          batch_size: int = 10, poll: float = 1.0, budget: float = 120.0,
          handler_max: float = 60.0) -> Claimer:
    turns = TurnRunner(app, store, state, handler_max=handler_max,
                       policy=RetryPolicy(10, base=1.0, cap=600.0), max_payload_bytes=10_000,
                       rng=FixedJitter(1.0))
    return Claimer(store, state, turns, concurrency=concurrency, batch_size=batch_size,
                   claim_ttl=300.0, poll_interval=poll, reconnect_budget=budget)


def limits(store: FakeStore) -> list[int]:
    return [c.args[1] for c in store.calls if c.name == "claim"]


def add(store: FakeStore, n: int, topic: str = FAST, **kw: int) -> list[int]:
    return [store.add(topic, {"n": i}, **kw) for i in range(n)]


def all_done(store: FakeStore, ids: list[int]) -> bool:
    return all(store.status(i) == "DONE" for i in ids)


# --- the standard tests ----------------------------------------------------------------


async def test_defaults_nothing_happens_before_run(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    claimer = build(store, state, app, concurrency=7)
    assert claimer.running == 0
    assert store.calls == []
    with pytest.raises(AssertionError, match="nursery"):
        await claimer.run_once()


async def test_starts_and_is_cancelled_at_once(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, App()).run)
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 0


async def test_run_once_twice_claims_for_the_free_slots(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=10)
    claimer = build(store, state, app, concurrency=15, batch_size=10, poll=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(claimer.run)
        await trio.sleep(1)  # the loop's first claim found nothing; it waits for a poll
        ids = add(store, 30)
        assert await claimer.run_once() == 10
        assert await claimer.run_once() == 5  # only five slots were free
        assert claimer.running == 15
        assert limits(store) == [10, 10, 5]
        await wait_until(lambda: len(load.done) == 15)
        assert state.counters.claimed == 15
        assert [store.status(i) for i in ids].count("DONE") == 15
        nursery.cancel_scope.cancel()


async def test_survives_a_claim_database_error(
    autojump_clock: object, caplog: pytest.LogCaptureFixture,
) -> None:
    store, state, app = FakeStore(), make_state(), App()
    Load(app, seconds=0)
    ids = add(store, 3)
    store.fail_next("claim", DatabaseError("deadlock detected"))
    with caplog.at_level(logging.ERROR, logger="spectral.claimer"):
        async with trio.open_nursery() as nursery:
            await nursery.start(build(store, state, app, poll=5).run)
            await wait_until(lambda: all_done(store, ids))
            nursery.cancel_scope.cancel()
    assert store.times("claim")[:2] == [0, 5], "the next claim runs at the next poll"
    assert any("claim failed: deadlock detected" in r.getMessage() for r in caplog.records)


async def test_survives_an_unreachable_database(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    Load(app, seconds=0)
    ids = add(store, 3)
    store.fail_next("claim", DatabaseUnavailableError("connection refused"), times=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=5).run)
        await wait_until(lambda: store.count("claim") == 2)
        assert "claimer" in state.down
        await wait_until(lambda: all_done(store, ids))
        assert state.down == set()
        assert state.counters.reconnects == 1
        assert store.times("claim")[-1] < 5, "retried with backoff, not at the next poll"
        nursery.cancel_scope.cancel()


async def test_budget_exhaustion_raises(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    store.reachable = False
    with pytest.RaisesGroup(ReconnectBudgetExhaustedError, flatten_subgroups=True):
        await build(store, state, App(), budget=10).run()
    assert 10 < trio.current_time() < 20


# --- claiming and concurrency ----------------------------------------------------------


async def test_claims_min_of_batch_size_and_free_slots(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=1)
    ids = add(store, 10)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=3, batch_size=10).run)
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()
    # Never the batch size of 10: at most the three slots, exactly that when all are free.
    assert limits(store)[0] == 3
    assert max(limits(store)) == 3
    assert load.peak == 3


async def test_batch_size_bounds_each_claim(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=1)
    ids = add(store, 10)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=10, batch_size=4).run)
        await trio.sleep(0.5)
        assert limits(store)[:3] == [4, 4, 2]  # the third only for the two free slots
        assert load.running == 10
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()


async def test_never_runs_more_than_concurrency_turns(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=1)
    ids = add(store, 23)
    claimer = build(store, state, app, concurrency=5, batch_size=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(claimer.run)
        while not all_done(store, ids):
            assert claimer.running <= 5
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert load.peak == 5
    assert sorted(load.done) == ids


async def test_settles_outcomes_in_batches(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    Load(app, seconds=1)
    ids = add(store, 40)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=40, batch_size=40).run)
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()
    settled = [len(s) for s in store.settlements]
    assert sum(settled) == 40
    assert len(settled) <= 2, f"one settle per finished batch, not per row: {settled}"
    assert state.counters.acked == 40
    assert sorted(i for s in store.settlements for i, _ in s.ack) == ids
    # The ledger rows of handlers that used no transaction ride with the acknowledgement.
    assert {("work", i) for i in ids} <= store.handled


async def test_failures_are_settled_as_retries_and_dead(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()

    @app.handler(FAST, name="broken")
    async def broken(event: Event, tx: Tx) -> None:
        raise ValueError("nope")

    retry = store.add(FAST)
    dead = store.add(FAST, attempts=9)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=100).run)
        await wait_until(lambda: store.status(dead) == "DEAD")
        nursery.cancel_scope.cancel()
    assert (state.counters.retried, state.counters.dead) == (1, 1)
    row = store.row(retry)
    assert (row.status, row.attempts) == ("PENDING", 1)
    assert row.available_at == pytest.approx(1.0)
    assert row.last_error is not None and "ValueError: nope" in row.last_error


async def test_waits_for_the_poll_interval_and_is_woken_early(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=10).run)
        await trio.sleep(25)
        assert store.times("claim") == pytest.approx([0, 10, 20])
        assert state.counters.polls == 3
        event_id = store.add(FAST)
        state.wake()
        await wait_until(lambda: load.done == [event_id])
        assert store.times("claim")[3] == pytest.approx(25)
        nursery.cancel_scope.cancel()


async def test_due_later_rows_are_claimed_at_a_poll(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=0)
    event_id = store.add(FAST, delay=4.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=2).run)
        await wait_until(lambda: load.done == [event_id])
        assert store.times("claim")[:4] == pytest.approx([0, 2, 4, 6])
        nursery.cancel_scope.cancel()


async def test_settle_retries_an_unreachable_database(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    Load(app, seconds=0)
    ids = add(store, 2)
    store.fail_next("settle", DatabaseUnavailableError("connection reset"), times=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=100).run)
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()
    # The two refused attempts, then one write per batch (the turns may finish apart).
    assert store.count("settle") == 2 + len(store.settlements)
    assert state.counters.acked == 2
    assert state.down == set() and state.counters.reconnects == 1


# --- lost claims -----------------------------------------------------------------------


async def test_lost_claims_are_counted(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    release = trio.Event()

    @app.handler(FAST, name="waits")
    async def waits(event: Event, tx: Tx) -> None:
        await release.wait()

    mine, stolen = add(store, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=100).run)
        await wait_until(lambda: store.status(stolen) == "CLAIMED")
        store.lose_claim(stolen)  # reaped and claimed elsewhere meanwhile
        release.set()
        await wait_until(lambda: store.count("settle") > 0)
        nursery.cancel_scope.cancel()
    assert state.counters.lost_claims == 1
    assert state.counters.acked == 1
    assert store.status(mine) == "DONE"
    assert store.row(stolen).claimed_by == "another-worker"


# --- the drain -------------------------------------------------------------------------


async def test_drain_finishes_in_flight_turns_then_releases_the_rest(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    Load(app, seconds=3)

    @app.handler("job.slow", name="slow")
    async def slow(event: Event, tx: Tx) -> None:
        await tx.execute("update t set n = n + 1")
        await trio.sleep(100)

    fast = add(store, 2)
    (stuck,) = add(store, 1, topic="job.slow")
    claimer = build(store, state, app, concurrency=4, poll=1)
    returned: list[float] = []

    async def run() -> None:
        await claimer.run()
        returned.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(0.5)
        state.begin_drain(5.0)
        late = store.add(FAST)
        state.wake()
        await trio.sleep(1)
        assert await claimer.run_once() == 0
    claims = store.times("claim")
    assert returned == [pytest.approx(5.5)], "run() returns at the drain deadline"
    assert claims and max(claims) < 0.5, "nothing is claimed after the drain began"
    assert store.status(late) == "PENDING"
    assert all_done(store, fast), "in-flight turns finish during the drain"
    row = store.row(stuck)
    assert (row.status, row.attempts) == ("PENDING", 0), "released without charging an attempt"
    assert row.last_error == "cancelled at the drain deadline"
    (release,) = [r for s in store.settlements for r in s.release]
    assert release[0] == stuck and release[2] is False
    assert [t for t in store.transactions if t.handler == "slow"][0].rolled_back
    assert (state.counters.acked, state.counters.released) == (2, 1)


async def test_drain_with_nothing_in_flight_returns_at_once(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=30).run)
        await trio.sleep(1)
        state.begin_drain(20.0)
    assert trio.current_time() == pytest.approx(1.0)
    assert store.count("claim") == 1


async def test_drain_while_every_slot_is_busy(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=2)
    ids = add(store, 4)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=2, poll=1).run)
        await trio.sleep(0.5)
        state.begin_drain(10.0)
    assert trio.current_time() == pytest.approx(2.0)
    assert sorted(load.done) == ids[:2]
    assert [store.status(i) for i in ids] == ["DONE", "DONE", "PENDING", "PENDING"]


# --- bugs ------------------------------------------------------------------------------


async def test_claim_lost_during_the_turn_is_counted(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    go = trio.Event()

    @app.handler(FAST, name="writes")
    async def writes(event: Event, tx: Tx) -> None:
        await go.wait()
        await tx.execute("insert into t values (1)")

    (event_id,) = add(store, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=100).run)
        await wait_until(lambda: store.status(event_id) == "CLAIMED")
        store.lose_claim(event_id)
        go.set()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert state.counters.lost_claims == 1


async def test_survives_a_settle_database_error(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=0)
    store.fail_next("settle", DatabaseError('invalid byte sequence for encoding "UTF8": 0x00'))
    add(store, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=1).run)
        await trio.sleep(2)
        later = store.add(FAST)
        await wait_until(lambda: store.status(later) == "DONE")
        nursery.cancel_scope.cancel()
    assert len(load.done) == 2


async def test_drain_deadline_releases_a_handler_that_uses_a_nursery(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()

    @app.handler(FAST, name="fan")
    async def fan(event: Event, tx: Tx) -> None:
        await tx.execute("select 1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep_forever()

    (event_id,) = add(store, 1)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(build(store, state, app).run)
            await trio.sleep(0.5)
            state.begin_drain(2.0)
    assert store.status(event_id) == "PENDING", "left CLAIMED until the reaper charges an attempt"
    assert store.transactions[0].rolled_back


# --- turn runners, the HANDLER_MAX watchdog, overlapping writes ------------------------


async def test_turns_that_never_wait_run_back_to_back_in_one_task(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    tasks: list[object] = []

    @app.handler(FAST, name="instant")
    async def instant(event: Event, tx: Tx) -> None:
        tasks.append(trio.lowlevel.current_task())

    ids = add(store, 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=20, batch_size=20, poll=100).run)
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()
    assert len(tasks) == 20
    assert len(set(map(id, tasks))) == 1, "a turn that never waits needs no task of its own"


async def test_turns_that_wait_still_run_concurrently_up_to_the_concurrency(
    autojump_clock: object,
) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=10)
    ids = add(store, 30)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=12, batch_size=30, poll=100).run)
        await trio.sleep(1)
        assert load.running == 12  # every slot's turn started at once, not one after another
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()
    # Three rounds of ten seconds: the runners took the rows as soon as slots were free.
    assert trio.current_time() < 40


async def test_handler_max_cuts_only_the_turn_that_exceeds_it_at_its_own_deadline(
    autojump_clock: object,
) -> None:
    store, state, app = FakeStore(), make_state(), App()
    ended: dict[int, float] = {}

    @app.handler(FAST, name="varied")
    async def varied(event: Event, tx: Tx) -> None:
        await trio.sleep(event.payload["n"])
        ended[event.id] = trio.current_time()

    stuck = store.add(FAST, {"n": 100})
    late = store.add(FAST, {"n": 3}, delay=2)  # starts at 2 s: its own deadline would be 7 s
    quick = store.add(FAST, {"n": 4})
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, poll=1, handler_max=5.0).run)
        await wait_until(lambda: store.row(stuck).attempts == 1)
        cut_at = trio.current_time()
        nursery.cancel_scope.cancel()
    assert cut_at == pytest.approx(5.0, abs=0.01), "cut at HANDLER_MAX after its start"
    assert store.status(quick) == store.status(late) == "DONE"
    assert ended[quick] == pytest.approx(4.0) and ended[late] == pytest.approx(5.0)
    row = store.row(stuck)
    assert row.status == "PENDING"
    assert "varied: exceeded SPECTRAL_HANDLER_MAX (5s)" in (row.last_error or "")


async def test_a_runner_cut_at_handler_max_runs_the_next_row_normally(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    runs: list[int] = []

    @app.handler(FAST, name="first-hangs")
    async def first_hangs(event: Event, tx: Tx) -> None:
        runs.append(event.id)
        if len(runs) == 1:
            await trio.sleep(100)
        await trio.sleep(1)

    ids = add(store, 3)
    async with trio.open_nursery() as nursery:
        # One slot: the three rows go through the same runner, one after another.
        await nursery.start(build(store, state, app, concurrency=1, poll=1, handler_max=5.0).run)
        await wait_until(lambda: store.status(ids[1]) == store.status(ids[2]) == "DONE")
        nursery.cancel_scope.cancel()
    assert store.row(ids[0]).attempts == 1
    assert store.row(ids[1]).attempts == store.row(ids[2]).attempts == 0


class SlowSettleStore(FakeStore):
    """A database whose acknowledgements take a second."""

    async def settle(self, batch: Settlement) -> Settled:
        await trio.sleep(1)
        return await super().settle(batch)


async def test_the_next_claim_overlaps_the_write_of_the_previous_outcomes(
    autojump_clock: object,
) -> None:
    store, state, app = SlowSettleStore(), make_state(), App()
    Load(app, seconds=0)
    ids = add(store, 12)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=4, batch_size=4, poll=100).run)
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()
    claims = [t for t in store.times("claim")][:3]
    # Without the overlap each claim waits for the previous batch's one-second write.
    assert claims[2] - claims[0] < 1.5
    # Bounded all the same: never more than one batch written while the next one runs.
    assert max(limits(store)) == 4


async def test_a_slow_acknowledgement_makes_writes_larger_but_never_beyond_one_writes_cap(
    autojump_clock: object,
) -> None:
    store, state, app = SlowSettleStore(), make_state(), App()
    Load(app, seconds=0)
    ids = add(store, 200)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=4, batch_size=4, poll=100).run)
        await wait_until(lambda: all_done(store, ids))
        nursery.cancel_scope.cancel()
    written = [len(s) for s in store.settlements]
    assert sum(written) == 200
    # Claiming went on during each one-second write, so the next write took more than
    # the four turns that fit at once; but no write takes more than five batches.
    assert max(written) == 4 * SETTLE_BATCHES
    assert trio.current_time() < 200 / 4  # far fewer than one write per four rows


async def test_a_claim_that_finds_fewer_rows_than_it_asks_for_is_not_repeated_at_once(
    autojump_clock: object,
) -> None:
    store, state, app = FakeStore(), make_state(), App()
    load = Load(app, seconds=0)
    ids = add(store, 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, concurrency=10, batch_size=10, poll=100).run)
        await wait_until(lambda: all_done(store, ids))
        await trio.sleep(50)
        assert store.times("claim") == [0]  # all three due rows, then nothing to ask for
        later = store.add(FAST)
        state.wake()  # its NOTIFY
        await wait_until(lambda: later in load.done)
        assert store.times("claim") == pytest.approx([0, 50], abs=0.1)
        nursery.cancel_scope.cancel()
    assert state.counters.polls == 0
