"""TurnRunner on virtual time: outcomes, transactions and the ledger, with a fake store."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
import trio

from spectral.app import App
from spectral.db import ClaimedRow, Settlement
from spectral.errors import AlreadyHandledError
from spectral.events import Event
from spectral.state import RuntimeState
from spectral.turns import MAX_ERROR_LENGTH, Outcome, RetryPolicy, TurnRunner
from spectral.tx import Tx

from ..fakes import FakeStore, FakeTurnTx, FixedJitter, make_state

TOPIC = "order.created"


def runner(app: App, store: FakeStore, state: RuntimeState, *, handler_max: float = 60.0,
           max_attempts: int = 10) -> TurnRunner:
    return TurnRunner(app, store, state, handler_max=handler_max,
                      policy=RetryPolicy(max_attempts, base=1.0, cap=600.0),
                      max_payload_bytes=10_000, rng=FixedJitter(1.0))


async def claimed(store: FakeStore, topic: str = TOPIC, *, attempts: int = 0,
                  handled: Sequence[str] = ()) -> ClaimedRow:
    event_id = store.add(topic, {"order": 42}, attempts=attempts, handled=handled)
    rows = await store.claim(store.row(event_id).generation, 1, "test-worker", 300.0)
    assert [r.id for r in rows] == [event_id]
    return rows[0]


def txs(store: FakeStore, handler: str) -> list[FakeTurnTx]:
    return [t for t in store.transactions if t.handler == handler]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def state() -> RuntimeState:
    return make_state()


# --- success ---------------------------------------------------------------------------


async def test_success_without_tx_acks_with_a_ledger_row(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()
    seen: list[Event] = []

    @app.handler(TOPIC, name="notify")
    async def notify(event: Event, tx: Tx) -> None:
        seen.append(event)

    row = await claimed(store, attempts=2)
    outcome = await runner(app, store, state).run(row)
    assert (outcome.kind, outcome.ledger, outcome.error) == ("ack", [("notify", row.id)], None)
    tx = txs(store, "notify")[0]
    assert not tx.opened and not tx.committed
    event = seen[0]
    assert (event.id, event.topic, event.payload, event.attempt) == (row.id, TOPIC, {"order": 42}, 3)
    assert state.in_flight == {}


async def test_handler_using_tx_commits_and_writes_no_ledger_entry(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="receipt")
    async def receipt(event: Event, tx: Tx) -> None:
        await tx.execute("insert into receipts(order_id) values ($1)", event.payload["order"])
        await tx.publish("receipt.sent", {"order": event.payload["order"]})

    row = await claimed(store)
    outcome = await runner(app, store, state).run(row)
    assert (outcome.kind, outcome.ledger) == ("ack", [])
    tx = txs(store, "receipt")[0]
    assert tx.committed and not tx.rolled_back
    assert tx.statements[0] == ("execute", "insert into receipts(order_id) values ($1)", (42,))
    # The commit wrote the ledger row and the follow-up event, stamped with our generation.
    assert ("receipt", row.id) in store.handled
    (follow_up,) = [r for r in store.rows.values() if r.topic == "receipt.sent"]
    assert (follow_up.payload, follow_up.generation) == ({"order": 42}, state.generation)


async def test_in_flight_lists_the_running_handler(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()
    during: list[list[tuple[int, str]]] = []

    @app.handler(TOPIC, name="h")
    async def h(event: Event, tx: Tx) -> None:
        during.append(list(state.in_flight))

    row = await claimed(store)
    await runner(app, store, state).run(row)
    assert during == [[(row.id, "h")]]
    assert state.in_flight == {}


# --- failure, retry and DEAD -----------------------------------------------------------


async def test_exception_rolls_back_and_fails_with_a_backoff_delay(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="charge")
    async def charge(event: Event, tx: Tx) -> None:
        await tx.execute("update accounts set balance = balance - 1")
        raise ValueError("card declined")

    row = await claimed(store, attempts=2)
    outcome = await runner(app, store, state).run(row)
    assert (outcome.kind, outcome.dead, outcome.ledger) == ("fail", False, [])
    assert outcome.delay == 4.0  # the third attempt: base 1 s doubled twice, full jitter
    assert outcome.error is not None
    assert outcome.error.startswith("charge: ValueError: card declined at charge (test_turns.py:")
    tx = txs(store, "charge")[0]
    assert tx.rolled_back and not tx.committed
    assert ("charge", row.id) not in store.handled


async def test_long_errors_are_truncated(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="chatty")
    async def chatty(event: Event, tx: Tx) -> None:
        raise RuntimeError("x" * 10 * MAX_ERROR_LENGTH)

    outcome = await runner(app, store, state).run(await claimed(store))
    assert outcome.error is not None
    assert len(outcome.error) == MAX_ERROR_LENGTH
    assert outcome.error.startswith("chatty: RuntimeError: xxx")


async def test_last_attempt_fails_dead_with_a_reason(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="flaky")
    async def flaky(event: Event, tx: Tx) -> None:
        raise ConnectionError("upstream down")

    outcome = await runner(app, store, state, max_attempts=5).run(await claimed(store, attempts=4))
    assert (outcome.kind, outcome.dead, outcome.reason) == ("fail", True, "failed 5 of 5 attempts")
    assert outcome.error is not None and "upstream down" in outcome.error


async def test_handler_max_attempts_overrides_the_policy(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="once", max_attempts=2)
    async def once(event: Event, tx: Tx) -> None:
        raise ValueError("no")

    r = runner(app, store, state, max_attempts=10)
    first = await r.run(await claimed(store))
    assert (first.dead, first.delay) == (False, 1.0)
    second = await r.run(await claimed(store, attempts=1))
    assert (second.dead, second.reason) == (True, "failed 2 of 2 attempts")


async def test_attempts_beyond_the_limit_go_dead_without_running(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()
    ran: list[int] = []

    @app.handler(TOPIC, name="h")
    async def h(event: Event, tx: Tx) -> None:
        ran.append(event.id)

    outcome = await runner(app, store, state, max_attempts=3).run(await claimed(store, attempts=3))
    assert (outcome.kind, outcome.dead, outcome.reason) == ("fail", True, "exceeded 3 attempts")
    assert ran == []
    assert store.transactions == []


async def test_no_handler_for_the_topic_is_dead(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    outcome = await runner(App(), store, state).run(await claimed(store, "nobody.listens"))
    assert (outcome.kind, outcome.dead, outcome.reason) == ("fail", True, "no handler")
    assert outcome.error is not None and "'nobody.listens'" in outcome.error


# --- fan-out ---------------------------------------------------------------------------


async def test_already_handled_handlers_are_skipped(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()
    ran: list[str] = []

    @app.handler(TOPIC, name="a")
    async def a(event: Event, tx: Tx) -> None:
        ran.append("a")

    @app.handler(TOPIC, name="b")
    async def b(event: Event, tx: Tx) -> None:
        ran.append("b")

    row = await claimed(store, handled=["a"], attempts=1)
    assert row.handled == frozenset({"a"})
    outcome = await runner(app, store, state).run(row)
    assert ran == ["b"]
    assert (outcome.kind, outcome.ledger) == ("ack", [("b", row.id)])


async def test_every_handler_already_handled_acks_without_running(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="a")
    async def a(event: Event, tx: Tx) -> None:
        raise AssertionError("must not run")

    outcome = await runner(app, store, state).run(await claimed(store, handled=["a"]))
    assert (outcome.kind, outcome.ledger) == ("ack", [])
    assert store.transactions == []


async def test_fan_out_records_the_success_and_retries_the_failure(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="email")
    async def email(event: Event, tx: Tx) -> None:
        pass

    @app.handler(TOPIC, name="ledger")
    async def ledger(event: Event, tx: Tx) -> None:
        await tx.execute("insert into entries values (1)")
        raise KeyError("account")

    row = await claimed(store)
    outcome = await runner(app, store, state).run(row)
    assert (outcome.kind, outcome.dead, outcome.delay) == ("fail", False, 1.0)
    assert outcome.ledger == [("email", row.id)]
    assert outcome.error is not None
    assert outcome.error.startswith("ledger: KeyError") and "email" not in outcome.error
    assert txs(store, "ledger")[0].rolled_back


# --- time limits -----------------------------------------------------------------------


async def test_handler_over_its_timeout_fails_and_rolls_back(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="slow", timeout=2.0)
    async def slow(event: Event, tx: Tx) -> None:
        await tx.execute("select pg_sleep(0)")
        await trio.sleep(30)

    start = trio.current_time()
    outcome = await runner(app, store, state).run(await claimed(store))
    assert trio.current_time() - start == pytest.approx(2.0)
    assert outcome.kind == "fail"
    assert outcome.error == "slow: timed out after 2s"
    assert txs(store, "slow")[0].rolled_back


async def test_handler_over_handler_max_fails_and_rolls_back(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="slow")
    async def slow(event: Event, tx: Tx) -> None:
        await tx.execute("select 1")
        await trio.sleep(30)

    start = trio.current_time()
    outcome = await runner(app, store, state, handler_max=5.0).run(await claimed(store))
    assert trio.current_time() - start == pytest.approx(5.0)
    assert outcome.kind == "fail"
    assert outcome.error is not None and "SPECTRAL_HANDLER_MAX (5s)" in outcome.error
    assert txs(store, "slow")[0].rolled_back
    assert state.in_flight == {}


async def test_handler_max_bounds_the_whole_turn(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="first")
    async def first(event: Event, tx: Tx) -> None:
        await trio.sleep(3)

    @app.handler(TOPIC, name="second")
    async def second(event: Event, tx: Tx) -> None:
        await trio.sleep(3)

    row = await claimed(store)
    start = trio.current_time()
    outcome = await runner(app, store, state, handler_max=5.0).run(row)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert outcome.kind == "fail"
    assert outcome.ledger == [("first", row.id)]
    assert outcome.error == "second: exceeded SPECTRAL_HANDLER_MAX (5s)"


async def test_outside_cancellation_rolls_back_and_propagates(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="slow")
    async def slow(event: Event, tx: Tx) -> None:
        await tx.execute("select 1")
        await trio.sleep_forever()

    row = await claimed(store)
    finished = False
    with trio.move_on_after(1) as scope:
        await runner(app, store, state).run(row)
        finished = True
    assert scope.cancelled_caught and not finished
    assert txs(store, "slow")[0].rolled_back
    assert state.in_flight == {}


# --- the ledger and the claim ----------------------------------------------------------


async def test_already_handled_from_tx_counts_as_success(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()
    after: list[str] = []

    @app.handler(TOPIC, name="once")
    async def once(event: Event, tx: Tx) -> None:
        await tx.execute("insert into t values (1)")
        after.append("ran on")

    row = await claimed(store)
    store.handled.add(("once", row.id))  # another worker committed it meanwhile
    outcome = await runner(app, store, state).run(row)
    assert (outcome.kind, outcome.ledger, outcome.error) == ("ack", [], None)
    assert after == []
    assert txs(store, "once")[0].rollback_calls == 1


async def test_already_handled_error_raised_by_the_handler_is_a_success(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="h")
    async def h(event: Event, tx: Tx) -> None:
        raise AlreadyHandledError("done elsewhere")

    outcome = await runner(app, store, state).run(await claimed(store))
    assert (outcome.kind, outcome.ledger) == ("ack", [])


async def test_lost_claim_gives_a_lost_outcome_and_stops_the_turn(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()
    ran: list[str] = []

    @app.handler(TOPIC, name="first")
    async def first(event: Event, tx: Tx) -> None:
        await tx.execute("insert into t values (1)")

    @app.handler(TOPIC, name="second")
    async def second(event: Event, tx: Tx) -> None:
        ran.append("second")

    row = await claimed(store)
    store.lose_claim(row.id)
    outcome = await runner(app, store, state).run(row)
    assert outcome.kind == "lost"
    assert ran == []
    assert not txs(store, "first")[0].committed


# --- outcomes become a settlement ------------------------------------------------------


def test_outcomes_add_to_a_settlement() -> None:
    def row(i: int) -> ClaimedRow:
        return ClaimedRow(i, TOPIC, {}, 1, 0, datetime.now(UTC), uuid.uuid4(), 0.0, frozenset())

    rows = [row(i) for i in range(1, 6)]
    batch = Settlement()
    Outcome(rows[0], "ack", ledger=[("a", 1)]).add_to(batch)
    Outcome(rows[1], "fail", ledger=[("a", 2)], error="e", delay=2.0).add_to(batch)
    Outcome(rows[2], "fail", error="e", dead=True, reason="r").add_to(batch)
    Outcome(rows[3], "release", error="cut", charge=False).add_to(batch)
    Outcome(rows[4], "lost").add_to(batch)
    assert batch.ledger == [("a", 1), ("a", 2)]
    assert batch.ack == [(1, rows[0].token)]
    assert batch.fail == [(2, rows[1].token, 2.0, "e", False, None, False),
                          (3, rows[2].token, 0.0, "e", True, "r", False)]
    assert batch.release == [(4, rows[3].token, False, "cut")]
    assert len(batch) == 4 and batch.ids() == {1, 2, 3, 4}


# --- bugs ------------------------------------------------------------------------------


async def test_committed_handler_is_not_blamed_when_a_later_one_exceeds_handler_max(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="write", max_attempts=1)
    async def write(event: Event, tx: Tx) -> None:
        await tx.execute("insert into t values (1)")

    @app.handler(TOPIC, name="slow")
    async def slow(event: Event, tx: Tx) -> None:
        await trio.sleep(30)

    outcome = await runner(app, store, state, handler_max=5.0).run(await claimed(store))
    assert txs(store, "write")[0].committed
    assert outcome.error == "slow: exceeded SPECTRAL_HANDLER_MAX (5s)"
    assert not outcome.dead


async def test_handler_max_rolls_back_a_handler_that_uses_a_nursery(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="fan")
    async def fan(event: Event, tx: Tx) -> None:
        await tx.execute("select 1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep_forever()

    outcome = await runner(app, store, state, handler_max=5.0).run(await claimed(store))
    assert outcome.kind == "fail"
    assert txs(store, "fan")[0].rolled_back, "the transaction (and its pooled connection) leaks"


async def test_error_text_has_no_nul_characters(
    autojump_clock: object, store: FakeStore, state: RuntimeState,
) -> None:
    app = App()

    @app.handler(TOPIC, name="parse")
    async def parse(event: Event, tx: Tx) -> None:
        raise ValueError("bad field 'ab\x00cd'")

    outcome = await runner(app, store, state).run(await claimed(store))
    assert outcome.error is not None and "\x00" not in outcome.error


# --- tracing ---------------------------------------------------------------------------


@pytest.mark.parametrize(("recording", "traceparent", "spans"), [
    (False, None, 0),  # the API alone and nothing to pass on: no span entered
    (False, "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", 1),  # the producer's context goes on
    (True, None, 1),  # an SDK records every turn
])
async def test_a_turn_enters_a_span_only_when_it_records_or_passes_context_on(
    autojump_clock: object, store: FakeStore, state: RuntimeState, monkeypatch: pytest.MonkeyPatch,
    recording: bool, traceparent: str | None, spans: int,
) -> None:
    from contextlib import contextmanager

    from spectral import tracing

    entered: list[int] = []
    real = tracing.turn_span

    @contextmanager
    def counting(**kwargs: object):  # type: ignore[no-untyped-def]
        entered.append(1)
        with real(**kwargs) as span:  # type: ignore[arg-type]
            yield span

    monkeypatch.setattr(tracing, "available", lambda: True)
    monkeypatch.setattr(tracing, "recording", lambda: recording)
    monkeypatch.setattr(tracing, "turn_span", counting)
    app = App()

    @app.handler(TOPIC, name="h")
    async def h(event: Event, tx: Tx) -> None:
        pass

    row = (await claimed(store))._replace(traceparent=traceparent)
    outcome = await runner(app, store, state).run(row)
    assert outcome.kind == "ack"
    assert len(entered) == spans
