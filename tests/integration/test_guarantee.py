"""Regression tests of "effects once, nothing lost" against a real PostgreSQL.

Each test reproduces a hole found in review: a swallowed error counted as success, a stale
worker's ledger rows, handlers re-run after a row came back, a poison event crashing the
worker, one refused outcome stranding a batch, and claims taken from a live worker.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from collections.abc import Awaitable, Callable

import pytest
import trio

import spectral
from spectral.actors.claimer import Claimer
from spectral.actors.reconciler import Reconciler, ReconcileSettings
from spectral.db import Ack, Fail, Handled, Release, Settlement, Store
from spectral.runtime import run_workers
from spectral.state import RuntimeState
from spectral.turns import RetryPolicy, TurnRunner

from .test_worker_turns import FAST, _generation, _publish, _status, running, wait_until


async def _row(store: Store, event_id: int) -> dict[str, object]:
    row = await store.get_event(event_id)
    assert row is not None
    return row


async def _ledger(store: Store, event_id: int) -> list[str]:
    rows = await store.fetch(
        "SELECT handler FROM core.event_handled WHERE event_id = $1 ORDER BY handler", event_id
    )
    return [r["handler"] for r in rows]


def _settled(store: Store, event_id: int, *statuses: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await _status(store, event_id) in statuses

    return check


# --- 1. a swallowed error in the first statement ------------------------------------------


async def test_a_handler_that_swallows_the_error_of_its_first_statement_fails_the_turn(
    store: Store,
) -> None:
    await store.execute("CREATE TABLE effects (event_id bigint)")
    app = spectral.App(service="t")

    @app.handler("swallow.first", name="swallow", max_attempts=2)
    async def swallow(event: spectral.Event, tx: spectral.Tx) -> None:
        try:
            await tx.execute("INSERT INTO effects VALUES ($1 / 0)", event.id)
        except spectral.DatabaseError:
            pass  # swallowed: nothing was written, so this is no success

    gen = await _generation(store)
    event_id = await _publish(store, "swallow.first", {}, gen)
    async with running(app, store, gen):
        await wait_until(_settled(store, event_id, "DEAD"))
    row = await _row(store, event_id)
    assert row["attempts"] == 2
    assert "its transaction failed" in str(row["last_error"])
    assert "division by zero" in str(row["last_error"])
    assert await _ledger(store, event_id) == []
    assert await store.fetchval("SELECT count(*) FROM effects") == 0


async def test_no_statement_runs_after_a_swallowed_failure_of_the_first_one(store: Store) -> None:
    """A second statement must not open a fresh transaction that commits half a handler."""
    await store.execute("CREATE TABLE effects (what text)")
    app = spectral.App(service="t")
    seen: list[str] = []

    @app.handler("swallow.then.write", name="h", max_attempts=1)
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        try:
            await tx.execute("INSERT INTO effects VALUES ('first' || (1 / 0)::text)")
        except spectral.DatabaseError:
            pass
        try:
            await tx.execute("INSERT INTO effects VALUES ('second')")
        except spectral.DatabaseError as exc:
            seen.append(str(exc))

    gen = await _generation(store)
    event_id = await _publish(store, "swallow.then.write", {}, gen)
    async with running(app, store, gen):
        await wait_until(_settled(store, event_id, "DEAD"))
    assert await store.fetchval("SELECT count(*) FROM effects") == 0
    assert len(seen) == 1 and "no further statement runs" in seen[0]
    assert await _ledger(store, event_id) == []


async def test_a_handler_that_swallows_a_lost_claim_writes_no_ledger_row(store: Store) -> None:
    app = spectral.App(service="t")
    state = RuntimeState("swallower", 0)

    @app.handler("swallow.lost", name="h")
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        # Someone takes the claim away before the first statement.
        await store.execute("UPDATE core.outbox SET claim_token = gen_random_uuid() WHERE id = $1",
                            event.id)
        try:
            await tx.execute("SELECT 1")
        except Exception:
            pass  # a broad except swallows ClaimLostError too

    gen = await _generation(store)
    state.generation = gen
    event_id = await _publish(store, "swallow.lost", {}, gen)
    [row] = await store.claim(gen, 1, "swallower", 30)
    runner = TurnRunner(app, store, state, handler_max=5, policy=RetryPolicy(),
                        max_payload_bytes=262_144)
    outcome = await runner.run(row)
    assert outcome.kind == "lost" and outcome.ledger == []
    batch = Settlement()
    outcome.add_to(batch)
    await store.settle(batch)
    assert await _ledger(store, event_id) == []
    assert await _status(store, event_id) == "CLAIMED"


# --- 2. a stale worker's ledger rows -------------------------------------------------------


@pytest.mark.parametrize("kind", ["ack", "fail", "release"])
async def test_ledger_rows_land_only_with_an_outcome_whose_claim_matched(
    store: Store, kind: str,
) -> None:
    gen = await _generation(store)
    event_id = await _publish(store, "t.x", {}, gen)
    [stale] = await store.claim(gen, 1, "worker-a", 30)
    await store.execute(
        "UPDATE core.outbox SET claim_expires_at = now() - interval '1 second' WHERE id = $1",
        event_id,
    )
    assert [r[0] for r in await store.reap(10)] == [event_id]
    [owner] = await store.claim(gen, 1, "worker-b", 30)

    batch = Settlement(ledger=[Handled("mailer", event_id)])
    if kind == "ack":
        batch.ack.append(Ack(event_id, stale.token))
    elif kind == "fail":
        batch.fail.append(Fail(event_id, stale.token, 1.0, "late failure", False, None))
    else:
        batch.release.append(Release(event_id, stale.token, False, "late release"))
    settled = await store.settle(batch)
    assert settled.lost(batch) == {event_id}
    assert await _ledger(store, event_id) == []

    # The owner's settlement writes both the acknowledgement and its ledger row.
    mine = Settlement(ledger=[Handled("mailer", event_id)], ack=[Ack(event_id, owner.token)])
    assert (await store.settle(mine)).acked == {event_id}
    assert await _ledger(store, event_id) == ["mailer"]


# --- 3. rows that come back never re-run a handler that succeeded --------------------------


async def _back_by_requeue(store: Store, event_id: int, token: object) -> None:
    await store.execute("UPDATE core.outbox SET status = 'DEAD', claim_token = NULL, "
                        "claim_expires_at = NULL WHERE id = $1", event_id)
    assert await store.requeue_ids([event_id]) == [event_id]


async def _back_by_release(store: Store, event_id: int, token: object) -> None:
    batch = Settlement(release=[Release(event_id, token, False, "drain")])  # type: ignore[arg-type]
    assert (await store.settle(batch)).released == {event_id}


async def _back_by_reaper(store: Store, event_id: int, token: object) -> None:
    await store.execute("UPDATE core.outbox SET claim_expires_at = now() - interval '1 s' "
                        "WHERE id = $1", event_id)
    assert [r[0] for r in await store.reap(10)] == [event_id]


async def _back_by_reconciler(store: Store, event_id: int, token: object) -> None:
    # The claiming worker is unknown to core.workers: an orphan.
    assert [r[0] for r in await store.sweep_orphaned_claims(60)] == [event_id]


@pytest.mark.parametrize("path", [_back_by_requeue, _back_by_release, _back_by_reaper,
                                  _back_by_reconciler], ids=["requeue", "drain-release",
                                                             "reaper", "reconciler"])
async def test_a_row_that_comes_back_is_claimed_with_its_ledger(
    store: Store, path: Callable[[Store, int, object], Awaitable[None]],
) -> None:
    gen = await _generation(store)
    event_id = await _publish(store, "t.x", {}, gen)
    [first] = await store.claim(gen, 1, "worker-a", 30)
    assert first.handled == frozenset() and first.attempts == 0
    # A handler committed its effects and ledger row during the first claim.
    await store.execute("INSERT INTO core.event_handled (handler, event_id) VALUES ('mailer', $1)",
                        event_id)
    await path(store, event_id, first.token)
    [again] = await store.claim(gen, 1, "worker-b", 30)
    assert again.id == event_id
    assert again.handled == frozenset({"mailer"})


async def test_a_requeued_fan_out_row_does_not_rerun_the_handler_that_succeeded(
    store: Store,
) -> None:
    app = spectral.App(service="t")
    mails: list[int] = []
    broken = [True]
    handled_by: list[frozenset[str]] = []

    @app.handler("order.paid", name="mailer")
    async def mailer(event: spectral.Event, tx: spectral.Tx) -> None:
        mails.append(event.id)  # an outside effect: no transaction

    @app.handler("order.paid", name="ledger", max_attempts=1)
    async def ledger(event: spectral.Event, tx: spectral.Tx) -> None:
        handled_by.append(event.handled_by)
        if broken[0]:
            raise RuntimeError("downstream is broken")
        await tx.execute("SELECT 1")

    gen = await _generation(store)
    event_id = await _publish(store, "order.paid", {}, gen)
    async with running(app, store, gen):
        await wait_until(_settled(store, event_id, "DEAD"))
        broken[0] = False
        assert await store.requeue_ids([event_id]) == [event_id]
        await wait_until(_settled(store, event_id, "DONE"))
    assert mails == [event_id]
    assert handled_by == [frozenset(), frozenset({"mailer"})]
    assert await _ledger(store, event_id) == ["ledger", "mailer"]


async def test_a_turn_released_at_the_drain_deadline_keeps_the_ledger_of_its_finished_handlers(
    store: Store,
) -> None:
    app = spectral.App(service="t")
    mails: list[int] = []
    started = trio.Event()

    @app.handler("order.paid", name="mailer")
    async def mailer(event: spectral.Event, tx: spectral.Tx) -> None:
        mails.append(event.id)

    @app.handler("order.paid", name="slow")
    async def slow(event: spectral.Event, tx: spectral.Tx) -> None:
        if event.attempt == 1 and not started.is_set():
            started.set()
            await trio.sleep(30)

    settings = FAST.with_changes(handler_max=20.0, drain_timeout=0.3, claim_ttl=60.0)
    gen = await _generation(store)
    event_id = await _publish(store, "order.paid", {}, gen)
    state = RuntimeState("drain-ledger", gen)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_workers, app, settings, store, state)
        await started.wait()
        state.begin_drain(settings.drain_timeout)
    row = await _row(store, event_id)
    assert row["status"] == "PENDING" and row["attempts"] == 0
    assert await _ledger(store, event_id) == ["mailer"]
    async with running(app, store, gen):
        await wait_until(_settled(store, event_id, "DONE"))
    assert mails == [event_id]


# --- 4. a poison event is harmless -----------------------------------------------------------


def _exit_3() -> None:
    sys.exit(3)


def _keyboard() -> None:
    raise KeyboardInterrupt


def _mixed_group() -> None:
    raise BaseExceptionGroup("poison", [ValueError("bad value"), SystemExit(3)])


def _generator_exit() -> None:
    raise GeneratorExit


@pytest.mark.parametrize("poison", [_exit_3, _keyboard, _mixed_group, _generator_exit],
                         ids=["sys.exit", "KeyboardInterrupt", "mixed-group", "GeneratorExit"])
async def test_a_poison_handler_fails_its_turn_and_goes_dead_while_siblings_run(
    store: Store, poison: Callable[[], None],
) -> None:
    await store.execute("CREATE TABLE effects (event_id bigint)")
    app = spectral.App(service="t")
    calls: list[int] = []
    sibling_started = trio.Event()

    @app.handler("poison", name="poison", max_attempts=3)
    async def bad(event: spectral.Event, tx: spectral.Tx) -> None:
        calls.append(event.attempt)
        await sibling_started.wait()
        poison()

    @app.handler("fine", name="fine")
    async def fine(event: spectral.Event, tx: spectral.Tx) -> None:
        sibling_started.set()
        await trio.sleep(0.3)
        await tx.execute("INSERT INTO effects VALUES ($1)", event.id)

    gen = await _generation(store)
    sibling = await _publish(store, "fine", {}, gen)
    poisoned = await _publish(store, "poison", {}, gen)
    async with running(app, store, gen) as state:
        await wait_until(_settled(store, poisoned, "DEAD"))
        await wait_until(_settled(store, sibling, "DONE"))
        # The runtime is still serving: a new event is handled.
        later = await _publish(store, "fine", {}, gen)
        await wait_until(_settled(store, later, "DONE"))
        assert not state.draining.is_set()
    row = await _row(store, poisoned)
    assert calls == [1, 2, 3]
    assert row["attempts"] == 3 and row["dead_reason"] == "failed 3 of 3 attempts"
    name = {"_exit_3": "SystemExit", "_keyboard": "KeyboardInterrupt",
            "_mixed_group": "BaseExceptionGroup", "_generator_exit": "GeneratorExit"}
    assert name[poison.__name__] in str(row["last_error"])
    sib = await _row(store, sibling)
    assert sib["attempts"] == 0
    assert await store.fetchval("SELECT count(*) FROM effects") == 2


async def test_a_handler_whose_nursery_mixes_an_error_with_its_own_timeout_fails_the_turn(
    store: Store,
) -> None:
    app = spectral.App(service="t")

    async def cleanup_fails() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")  # noqa: B012 - the poison under test

    @app.handler("grouped", name="grouped", max_attempts=2, timeout=0.2)
    async def grouped(event: spectral.Event, tx: spectral.Tx) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cleanup_fails)
            await trio.sleep_forever()

    gen = await _generation(store)
    event_id = await _publish(store, "grouped", {}, gen)
    async with running(app, store, gen):
        await wait_until(_settled(store, event_id, "DEAD"))
    row = await _row(store, event_id)
    assert row["attempts"] == 2
    assert "cleanup failed" in str(row["last_error"])


# --- 5. one refused outcome does not strand its batch ------------------------------------------


class _RefusedDelay(RetryPolicy):
    """A retry delay PostgreSQL cannot add to a timestamp (the settings refuse such values
    at start; this stands for any value the database refuses)."""

    def delay(self, attempt: int, rng: random.Random) -> float:
        return 1e300


async def test_one_refused_outcome_does_not_hold_back_the_rest_of_its_batch(
    store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    app = spectral.App(service="t")
    gate = trio.Event()

    @app.handler("ok", name="ok")
    async def ok(event: spectral.Event, tx: spectral.Tx) -> None:
        await gate.wait()

    @app.handler("bad", name="bad", max_attempts=5)
    async def bad(event: spectral.Event, tx: spectral.Tx) -> None:
        await gate.wait()
        raise RuntimeError("fails")

    gen = await _generation(store)
    ok_ids = [await _publish(store, "ok", {}, gen) for _ in range(10)]
    bad_id = await _publish(store, "bad", {}, gen)
    state = RuntimeState("isolating", gen)
    turns = TurnRunner(app, store, state, handler_max=10, policy=_RefusedDelay(max_attempts=5),
                       max_payload_bytes=262_144)
    claimer = Claimer(store, state, turns, concurrency=20, batch_size=50, claim_ttl=300,
                      poll_interval=0.05, reconnect_budget=5)
    caplog.set_level(logging.ERROR, "spectral.claimer")
    async with trio.open_nursery() as nursery:
        await nursery.start(claimer.run)
        await wait_until(lambda: _count(store, "CLAIMED", 11))
        gate.set()  # every turn finishes at once: one settle batch
        await wait_until(lambda: _count(store, "DONE", 10))
        # Each refused retry became a charged release; the last attempt's failure is
        # DEAD, which needs no retry time, so the row ends dead-lettered.
        await wait_until(_settled(store, bad_id, "DEAD"))
        state.begin_drain(1)
    assert all([await _status(store, i) == "DONE" for i in ok_ids])
    row = await _row(store, bad_id)
    assert row["attempts"] == 5 and row["dead_reason"] == "failed 5 of 5 attempts"
    messages = [r.getMessage() for r in caplog.records]
    assert any("settling them one by one" in m for m in messages)
    assert any(f"outcome of event {bad_id} refused" in m for m in messages)


async def _count(store: Store, status: str, n: int) -> bool:
    return bool(await store.fetchval("SELECT count(*) FROM core.outbox WHERE status = $1",
                                     status) == n)


# --- 6. one safety rule for taking a claim away ------------------------------------------------


async def test_the_reconciler_respects_the_claiming_workers_own_heartbeat_interval(
    store: Store,
) -> None:
    gen = await _generation(store)
    event_id = await _publish(store, "t.x", {}, gen)
    # A worker beating every 30 s, last seen 40 s ago: silent for less than two beats.
    await store.execute(
        "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid, "
        "state, started_at, last_seen, heartbeat_seconds) VALUES ('slow-beater', $1, 'test', 't', "
        "'h', 1, 'running', now(), now() - interval '40 seconds', 30)", gen)
    await store.claim(gen, 1, "slow-beater", 300)
    # A reconciler whose own workers beat every 5 s (stale after 10 s) must not release it.
    state = RuntimeState("reconciler", gen)
    settings = ReconcileSettings(interval=1, grace=1, stale_after=10)
    reconciler = Reconciler(store, state, spectral.App(service="t"), settings)
    report = await reconciler.run_once()
    assert report is not None and report.unblocked["orphaned_claims"] == 0
    assert await _status(store, event_id) == "CLAIMED"
    # Past two of its own beats (61 s), it is gone and the claim is released.
    await store.execute("UPDATE core.workers SET last_seen = now() - interval '61 seconds' "
                        "WHERE worker_id = 'slow-beater'")
    assert [r[0] for r in await store.sweep_orphaned_claims(10)] == [event_id]


async def test_a_worker_that_cannot_write_its_heartbeat_fences_itself(
    store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    """Heartbeat writes blocked (a lock on core.workers): after 1.5 beats the worker stops
    claiming and cancels its turns, releasing them uncharged; it resumes once it beats."""
    app = spectral.App(service="t")
    starts: list[float] = []

    @app.handler("long", name="long")
    async def long(event: spectral.Event, tx: spectral.Tx) -> None:
        starts.append(trio.current_time())
        await trio.sleep(6 if len(starts) == 1 else 0)

    settings = FAST.with_changes(heartbeat_interval=1.0, handler_max=8.0, claim_ttl=30.0)
    assert math.isclose(settings.fence_after, 1.5)
    gen = await _generation(store)
    event_id = await _publish(store, "long", {}, gen)
    caplog.set_level(logging.INFO, "spectral.claimer")
    async with running(app, store, gen, settings):
        await wait_until(lambda: _count(store, "CLAIMED", 1))
        # Another session locks core.workers against writes: the next beat blocks.
        lock = await store.open_transaction()
        await lock.query("execute", "LOCK TABLE core.workers IN EXCLUSIVE MODE", ())
        try:
            await wait_until(_settled(store, event_id, "PENDING"), seconds=6)
            row = await _row(store, event_id)
            assert row["attempts"] == 0
            assert "lost its heartbeat" in str(row["last_error"])
            # Fenced: the row is due, yet nobody claims it while the beat is blocked.
            await trio.sleep(0.5)
            assert await _status(store, event_id) == "PENDING"
        finally:
            await lock.rollback()
        await wait_until(_settled(store, event_id, "DONE"), seconds=5)
    assert len(starts) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("fencing this worker" in m for m in messages)
    assert any("claiming resumes" in m for m in messages)
