"""The worker runtime in-process against a real PostgreSQL: turns, retries, DEAD rows,
fencing and the ledger. (Process-level behaviour lives in tests/acceptance.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

import spectral
from spectral.config import Settings
from spectral.db import Ack, Handled, Settlement, Store
from spectral.runtime import run_workers
from spectral.state import RuntimeState

FAST = Settings(
    poll_interval=0.05, handler_max=1.0, claim_ttl=30.0, drain_timeout=2.0,
    heartbeat_interval=1.0, reap_interval=0.2, retry_base=0.05, retry_max=0.1,
    max_attempts=3, concurrency=8, batch_size=50,
)


async def _generation(store: Store) -> int:
    return int((await store.allocate_generation("test", None, None))["generation"])


async def _publish(store: Store, topic: str, payload: dict[str, object], generation: int) -> int:
    return await store.publish(topic, json.dumps(payload), generation=generation)


@asynccontextmanager
async def running(app: spectral.App, store: Store, generation: int,
                  settings: Settings = FAST) -> AsyncIterator[RuntimeState]:
    state = RuntimeState(f"test-worker-{generation}", generation)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_workers, app, settings, store, state)
        yield state
        state.begin_drain(settings.drain_timeout)


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while True:
            if await check():
                return
            await trio.sleep(0.02)


async def _status(store: Store, event_id: int) -> str:
    row = await store.get_event(event_id)
    assert row is not None
    return str(row["status"])


async def test_handler_writes_commit_with_the_ledger_row(store: Store) -> None:
    await store.execute("CREATE TABLE receipts (order_id int)")
    app = spectral.App(service="t")

    @app.handler("order.created", name="receipt")
    async def receipt(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("INSERT INTO receipts VALUES ($1)", event.payload["order_id"])

    gen = await _generation(store)
    ids = [await _publish(store, "order.created", {"order_id": i}, gen) for i in range(20)]
    async with running(app, store, gen):
        await wait_until(lambda: _all_done(store, ids))
    assert await store.fetchval("SELECT count(*) FROM receipts") == 20
    assert await store.fetchval(
        "SELECT count(*) FROM core.event_handled WHERE handler = 'receipt'"
    ) == 20


async def _all_done(store: Store, ids: list[int]) -> bool:
    n = await store.fetchval(
        "SELECT count(*) FROM core.outbox WHERE id = ANY($1::bigint[]) AND status = 'DONE'", ids
    )
    return bool(n == len(ids))


async def test_failing_handler_retries_with_backoff_then_goes_dead(store: Store) -> None:
    app = spectral.App(service="t")
    calls: list[int] = []

    @app.handler("poison", name="poison", max_attempts=3)
    async def poison(event: spectral.Event, tx: spectral.Tx) -> None:
        calls.append(event.attempt)
        raise RuntimeError("boom")

    gen = await _generation(store)
    event_id = await _publish(store, "poison", {}, gen)
    async with running(app, store, gen):
        await wait_until(lambda: _is(store, event_id, "DEAD"))
    row = await store.get_event(event_id)
    assert row is not None
    assert calls == [1, 2, 3]
    assert row["attempts"] == 3
    assert "RuntimeError: boom" in row["last_error"]
    assert row["dead_reason"] == "failed 3 of 3 attempts"


async def _is(store: Store, event_id: int, status: str) -> bool:
    return await _status(store, event_id) == status


async def test_handler_over_handler_max_is_cancelled_and_poison_does_not_slow_others(
    store: Store,
) -> None:
    app = spectral.App(service="t")
    fast_done: list[int] = []

    @app.handler("slow", name="slow", max_attempts=2)
    async def slow(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("SELECT 1")
        await trio.sleep(60)

    @app.handler("fast", name="fast")
    async def fast(event: spectral.Event, tx: spectral.Tx) -> None:
        fast_done.append(event.id)

    gen = await _generation(store)
    slow_id = await _publish(store, "slow", {}, gen)
    fast_ids = [await _publish(store, "fast", {"i": i}, gen) for i in range(50)]
    settings = FAST.with_changes(handler_max=3.0)
    start = trio.current_time()
    async with running(app, store, gen, settings):
        await wait_until(lambda: _all_done(store, fast_ids))
        fast_elapsed = trio.current_time() - start
        await wait_until(lambda: _is(store, slow_id, "DEAD"))
    row = await store.get_event(slow_id)
    assert row is not None
    assert "exceeded SPECTRAL_HANDLER_MAX" in row["last_error"] or "timed out" in row["last_error"]
    assert row["attempts"] == 2
    # The 50 fast events did not wait for the poison event's HANDLER_MAX.
    assert fast_elapsed < settings.handler_max
    assert sorted(fast_done) == fast_ids
    # The slow handler's transaction was rolled back: no ledger row.
    assert await store.fetchval(
        "SELECT count(*) FROM core.event_handled WHERE event_id = $1", slow_id
    ) == 0


async def test_fan_out_retry_does_not_rerun_the_handler_that_succeeded(store: Store) -> None:
    app = spectral.App(service="t")
    runs = {"a": 0, "b": 0}

    @app.handler("fan", name="a")
    async def a(event: spectral.Event, tx: spectral.Tx) -> None:
        runs["a"] += 1
        await tx.execute("SELECT 1")

    @app.handler("fan", name="b")
    async def b(event: spectral.Event, tx: spectral.Tx) -> None:
        runs["b"] += 1
        if event.attempt == 1:
            raise ValueError("first time fails")

    gen = await _generation(store)
    event_id = await _publish(store, "fan", {}, gen)
    async with running(app, store, gen):
        await wait_until(lambda: _is(store, event_id, "DONE"))
    assert runs == {"a": 1, "b": 2}
    handlers = await store.fetch(
        "SELECT handler FROM core.event_handled WHERE event_id = $1 ORDER BY handler", event_id
    )
    assert [h["handler"] for h in handlers] == ["a", "b"]


async def test_topic_without_handler_goes_dead_and_can_be_requeued(store: Store) -> None:
    app = spectral.App(service="t")
    gen = await _generation(store)
    event_id = await _publish(store, "nobody.listens", {}, gen)
    async with running(app, store, gen):
        await wait_until(lambda: _is(store, event_id, "DEAD"))
    row = await store.get_event(event_id)
    assert row is not None and row["dead_reason"] == "no handler"
    assert await store.requeue_ids([event_id]) == [event_id]
    assert await _status(store, event_id) == "PENDING"


async def test_late_acknowledgement_after_the_claim_was_reaped_changes_nothing(
    store: Store,
) -> None:
    gen = await _generation(store)
    event_id = await _publish(store, "t.x", {}, gen)
    [first] = await store.claim(gen, 10, "worker-a", 30)
    await store.execute(
        "UPDATE core.outbox SET claim_expires_at = now() - interval '1 second' WHERE id = $1",
        event_id,
    )
    assert [r[0] for r in await store.reap(100)] == [event_id]
    [second] = await store.claim(gen, 10, "worker-b", 30)
    assert second.token != first.token and second.attempts == 1

    late = Settlement(ack=[Ack(event_id, first.token)], ledger=[Handled("h", event_id)])
    settled = await store.settle(late)
    assert settled.acked == set()
    assert settled.lost(late) == {event_id}
    row = await store.get_event(event_id)
    assert row is not None
    assert row["status"] == "CLAIMED" and row["claimed_by"] == "worker-b"
    assert row["claim_token"] == second.token
    # Nor did the stale worker's ledger row land: the owner's run must not find "already handled".
    assert await store.fetchval("SELECT count(*) FROM core.event_handled WHERE event_id = $1",
                                event_id) == 0

    # The current owner's acknowledgement still works.
    settled = await store.settle(Settlement(ack=[Ack(event_id, second.token)]))
    assert settled.acked == {event_id}


async def test_a_turn_whose_claim_was_lost_applies_nothing(store: Store) -> None:
    await store.execute("CREATE TABLE effects (event_id bigint)")
    gen = await _generation(store)
    event_id = await _publish(store, "t.x", {}, gen)
    [row] = await store.claim(gen, 10, "worker-a", 30)
    await store.execute(
        "UPDATE core.outbox SET status = 'PENDING', claim_token = NULL, claim_expires_at = NULL"
        " WHERE id = $1", event_id,
    )
    turn = await store.open_turn(row.id, row.token, "h")
    tx = spectral.Tx(turn, gen, 1000)
    try:
        await tx.execute("INSERT INTO effects VALUES ($1)", event_id)
    except spectral.SpectralError as exc:
        assert "claim lost" in str(exc)
    else:
        raise AssertionError("a turn on a lost claim must not run its statements")
    assert await store.fetchval("SELECT count(*) FROM effects") == 0
    assert await store.fetchval("SELECT count(*) FROM core.event_handled") == 0


async def test_the_ledger_lets_one_of_two_concurrent_turns_commit(store: Store) -> None:
    """Two turns of the same handler on the same event (e.g. a reaped claim re-run while
    the first worker still runs): the second waits on the ledger row, then finds the
    handler already handled and applies nothing."""
    await store.execute("CREATE TABLE effects (event_id bigint)")
    gen = await _generation(store)
    event_id = await _publish(store, "t.x", {}, gen)
    [row] = await store.claim(gen, 10, "worker-a", 30)
    first = spectral.Tx(await store.open_turn(row.id, row.token, "h"), gen, 1000)
    await first.execute("INSERT INTO effects VALUES ($1)", event_id)
    second_turn = await store.open_turn(row.id, row.token, "h")
    second = spectral.Tx(second_turn, gen, 1000)
    outcome: list[str] = []

    async def run_second() -> None:
        try:
            await second.execute("INSERT INTO effects VALUES ($1)", event_id)
            outcome.append("ran")
        except spectral.AlreadyHandledError:
            outcome.append("already handled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_second)
        await trio.sleep(0.2)
        assert outcome == []  # blocked on the first turn's uncommitted ledger row
        await first._turn.commit()
    assert outcome == ["already handled"]
    assert await store.fetchval("SELECT count(*) FROM effects") == 1


async def test_follow_up_events_published_in_a_turn_commit_with_it(store: Store) -> None:
    app = spectral.App(service="t")

    @app.handler("first", name="first")
    async def first(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.publish("second", {"from": event.id})
        if event.attempt == 1:
            raise RuntimeError("roll back the follow-up")

    seen: list[dict[str, object]] = []

    @app.handler("second", name="second")
    async def second(event: spectral.Event, tx: spectral.Tx) -> None:
        seen.append(event.payload)

    gen = await _generation(store)
    event_id = await _publish(store, "first", {}, gen)
    async with running(app, store, gen):
        await wait_until(lambda: _is(store, event_id, "DONE"))
        await wait_until(lambda: _count_topic(store, "second", "DONE", 1))
    assert seen == [{"from": event_id}]
    assert await _count_topic(store, "second", None, 1)


async def _count_topic(store: Store, topic: str, status: str | None, n: int) -> bool:
    count = await store.fetchval(
        "SELECT count(*) FROM core.outbox WHERE topic = $1 AND ($2::text IS NULL OR status = $2)",
        topic, status,
    )
    return bool(count == n)


async def test_workers_claim_only_their_own_generation(store: Store) -> None:
    app = spectral.App(service="t")
    handled: list[int] = []

    @app.handler("g.e", name="h")
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        handled.append(event.generation)

    old = await _generation(store)
    new = await _generation(store)
    old_id = await _publish(store, "g.e", {}, old)
    new_id = await _publish(store, "g.e", {}, new)
    async with running(app, store, new):
        await wait_until(lambda: _is(store, new_id, "DONE"))
        await trio.sleep(0.3)
    assert handled == [new]
    assert await _status(store, old_id) == "PENDING"


async def test_drain_lets_in_flight_turns_commit(store: Store) -> None:
    await store.execute("CREATE TABLE effects (event_id bigint)")
    app = spectral.App(service="t")
    started = trio.Event()

    @app.handler("slowish", name="h")
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        started.set()
        await trio.sleep(0.3)
        await tx.execute("INSERT INTO effects VALUES ($1)", event.id)

    gen = await _generation(store)
    event_id = await _publish(store, "slowish", {}, gen)
    state = RuntimeState("drain-test", gen)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_workers, app, FAST, store, state)
        await started.wait()
        state.begin_drain(FAST.drain_timeout)
    assert await _status(store, event_id) == "DONE"
    assert await store.fetchval("SELECT count(*) FROM effects") == 1
    worker = await store.fetch("SELECT state FROM core.workers WHERE worker_id = 'drain-test'")
    assert worker == [{"state": "exited"}]


async def test_turn_cut_off_by_the_drain_deadline_is_released_without_an_attempt(
    store: Store,
) -> None:
    app = spectral.App(service="t")
    started = trio.Event()

    @app.handler("stuck", name="h")
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("SELECT 1")
        started.set()
        await trio.sleep(30)

    settings = FAST.with_changes(handler_max=20.0, drain_timeout=0.3, claim_ttl=60.0)
    gen = await _generation(store)
    event_id = await _publish(store, "stuck", {}, gen)
    state = RuntimeState("drain-cut", gen)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_workers, app, settings, store, state)
        await started.wait()
        t0 = trio.current_time()
        state.begin_drain(settings.drain_timeout)
    assert trio.current_time() - t0 < 3
    row = await store.get_event(event_id)
    assert row is not None
    assert row["status"] == "PENDING" and row["attempts"] == 0
    assert row["claim_token"] is None
    assert "drain deadline" in row["last_error"]


async def test_a_handler_that_swallows_a_database_error_does_not_count_as_done(
    store: Store,
) -> None:
    """PostgreSQL turns the COMMIT of an aborted transaction into a ROLLBACK: the turn must
    fail and retry, not report DONE with its writes gone."""
    await store.execute("CREATE TABLE effects (event_id bigint PRIMARY KEY)")
    app = spectral.App(service="t")

    @app.handler("swallow", name="swallow", max_attempts=5)
    async def swallow(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("INSERT INTO effects VALUES ($1)", event.id)
        if event.attempt == 1:
            try:
                await tx.execute("SELECT 1 / 0")
            except spectral.DatabaseError:
                pass  # swallowed: the transaction is aborted all the same

    gen = await _generation(store)
    event_id = await _publish(store, "swallow", {}, gen)
    async with running(app, store, gen):
        await wait_until(lambda: _is(store, event_id, "DONE"))
    row = await store.get_event(event_id)
    assert row is not None and row["attempts"] == 1
    assert "its transaction failed" in row["last_error"] and "rolled back" in row["last_error"]
    assert await store.fetchval("SELECT count(*) FROM effects") == 1


async def test_publish_trio_with_a_tx_joins_the_turn(store: Store) -> None:
    app = spectral.App(service="t")
    seen: list[int] = []

    @app.handler("first.t", name="first")
    async def first(event: spectral.Event, tx: spectral.Tx) -> None:
        await spectral.publish_trio(tx, "second.t", {"from": event.id})

    @app.handler("second.t", name="second")
    async def second(event: spectral.Event, tx: spectral.Tx) -> None:
        seen.append(int(event.payload["from"]))

    gen = await _generation(store)
    event_id = await _publish(store, "first.t", {}, gen)
    async with running(app, store, gen):
        await wait_until(lambda: _count_topic(store, "second.t", "DONE", 1))
    assert seen == [event_id]


async def test_a_handler_that_swallows_a_refused_publish_does_not_count_as_done(
    store: Store,
) -> None:
    await store.execute("CREATE TABLE effects (event_id bigint)")
    app = spectral.App(service="t")

    @app.handler("pub.swallow", name="h", max_attempts=5)
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("INSERT INTO effects VALUES ($1)", event.id)
        if event.attempt == 1:
            try:
                await tx.publish("next.step", {}, generation=999)  # not allocated
            except spectral.NoGenerationError:
                pass

    gen = await _generation(store)
    event_id = await _publish(store, "pub.swallow", {}, gen)
    async with running(app, store, gen):
        await wait_until(lambda: _is(store, event_id, "DONE"))
    row = await store.get_event(event_id)
    assert row is not None and row["attempts"] == 1
    assert await store.fetchval("SELECT count(*) FROM effects") == 1


async def test_session_settings_a_handler_changes_do_not_leak_to_the_next_turn(
    db_url: str,
) -> None:
    """The pool skips its reset query after Spectral's own statements only: a handler's
    SET must still be reset before its connection serves another turn."""
    from spectral.db import open_database

    app = spectral.App(service="t")
    seen: list[str] = []

    @app.handler("leak.set", name="setter")
    async def setter(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("SET application_name = 'leaked-by-handler'")

    @app.handler("leak.show", name="shower")
    async def shower(event: spectral.Event, tx: spectral.Tx) -> None:
        seen.append(str(await tx.fetchval("SHOW application_name")))

    async with open_database(db_url, pool_size=1) as store:  # one connection: reused
        gen = await _generation(store)
        first = await _publish(store, "leak.set", {}, gen)
        settings = FAST.with_changes(concurrency=1, pool_size=1)
        async with running(app, store, gen, settings):
            await wait_until(lambda: _is(store, first, "DONE"))
            for _ in range(3):
                await _publish(store, "leak.show", {}, gen)
            await wait_until(lambda: _count_topic(store, "leak.show", "DONE", 3))
    assert seen == ["spectral"] * 3
