"""The pruner against a real PostgreSQL: retention boundaries, the ledger, batching, lost
workers, the shared schedule (two pruners, one pass) and the kill switch."""

from __future__ import annotations

import dataclasses

import trio

import spectral
from spectral.actors.pruner import Pruner, PruneSettings
from spectral.db import Store, open_database
from spectral.state import RuntimeState

from .test_worker_turns import FAST, _generation, running, wait_until

HOUR = 3600.0
QUICK = PruneSettings(interval=0.5, batch=1000, pause=0.0, retain_done=HOUR,
                      retain_dead=24 * HOUR, retain_workers=24 * HOUR,
                      retain_records=24 * HOUR, lost_after=HOUR)


async def _rows(store: Store, gen: int, n: int, status: str, *, age: float,
                handlers: tuple[str, ...] = ("a", "b")) -> list[int]:
    """``n`` rows in ``status``, finished (done_at / dead_at) ``age`` seconds ago, created
    a day before that, each with a ledger row per handler."""
    ids = [int(r["id"]) for r in await store.fetch(
        "INSERT INTO core.outbox (generation, topic, payload, status, attempts, created_at,"
        " done_at, dead_at, claim_token, claim_expires_at)"
        " SELECT $1, 't.x', '{}', $3, 1, now() - make_interval(secs => $4 + 86400),"
        "   CASE WHEN $3 = 'DONE' THEN now() - make_interval(secs => $4) END,"
        "   CASE WHEN $3 = 'DEAD' THEN now() - make_interval(secs => $4) END,"
        "   CASE WHEN $3 = 'CLAIMED' THEN gen_random_uuid() END,"
        "   CASE WHEN $3 = 'CLAIMED' THEN now() + interval '1 hour' END"
        " FROM generate_series(1, $2) RETURNING id", gen, n, status, age)]
    await store.execute(
        "INSERT INTO core.event_handled (handler, event_id)"
        " SELECT h, id FROM unnest($1::bigint[]) AS id, unnest($2::text[]) AS h",
        ids, list(handlers))
    return ids


async def _left(store: Store, ids: list[int]) -> tuple[int, int]:
    rows = await store.fetchval("SELECT count(*) FROM core.outbox WHERE id = ANY($1)", ids)
    ledger = await store.fetchval(
        "SELECT count(*) FROM core.event_handled WHERE event_id = ANY($1)", ids)
    return int(rows), int(ledger)


async def _all_gone(store: Store, ids: list[int]) -> bool:
    return await _left(store, ids) == (0, 0)


class CountingStore:
    """The real store, with every prune statement recorded (kind, limit)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.statements: list[tuple[str, int]] = []

    async def prune(self, kind: str, retention: float, limit: int) -> tuple[int, int]:
        self.statements.append((kind, limit))
        return await self._store.prune(kind, retention, limit)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


async def test_done_rows_past_retention_go_with_their_ledger_rows_and_younger_ones_stay(
    store: Store,
) -> None:
    gen = await _generation(store)
    old = await _rows(store, gen, 30, "DONE", age=HOUR + 60)
    young = await _rows(store, gen, 20, "DONE", age=HOUR - 60)
    report = await Pruner(store, RuntimeState("p", gen), QUICK).run_once()
    assert report is not None
    assert (report.pruned["done"], report.pruned["ledger"]) == (30, 60)
    assert await _left(store, old) == (0, 0)
    assert await _left(store, young) == (20, 40)


async def test_dead_rows_are_kept_for_their_retention_counted_from_when_they_died(
    store: Store,
) -> None:
    gen = await _generation(store)
    long_dead = await _rows(store, gen, 5, "DEAD", age=24 * HOUR + 60)
    # Created two days ago, but DEAD only now (the trigger stamps dead_at on the UPDATE).
    [recent] = await _rows(store, gen, 1, "PENDING", age=24 * HOUR + 60)
    await store.execute("UPDATE core.outbox SET status = 'DEAD' WHERE id = $1", recent)
    dead_at = await store.fetchval(
        "SELECT now() - dead_at < interval '1 minute' FROM core.outbox WHERE id = $1", recent)
    assert dead_at is True
    report = await Pruner(store, RuntimeState("p", gen), QUICK).run_once()
    assert report is not None and report.pruned["dead"] == 5
    assert await _left(store, long_dead) == (0, 0)
    assert await _left(store, [recent]) == (1, 2)


async def test_a_requeued_dead_row_loses_its_dead_at_and_is_never_pruned(store: Store) -> None:
    gen = await _generation(store)
    [event_id] = await _rows(store, gen, 1, "DEAD", age=30 * 24 * HOUR)
    assert await store.requeue_ids([event_id]) == [event_id]
    assert await store.fetchval(
        "SELECT dead_at FROM core.outbox WHERE id = $1", event_id) is None
    await Pruner(store, RuntimeState("p", gen), QUICK).run_once()
    assert await _left(store, [event_id]) == (1, 2), "its ledger still guards its handlers"


async def test_unfinished_rows_and_their_ledger_rows_are_never_pruned_however_old(
    store: Store,
) -> None:
    gen = await _generation(store)
    pending = await _rows(store, gen, 3, "PENDING", age=90 * 24 * HOUR)
    claimed = await _rows(store, gen, 3, "CLAIMED", age=90 * 24 * HOUR)
    settings = dataclasses.replace(QUICK, retain_done=1.0, retain_dead=1.0)
    report = await Pruner(store, RuntimeState("p", gen), settings).run_once()
    assert report is not None and report.pruned["done"] == report.pruned["dead"] == 0
    assert await _left(store, pending + claimed) == (6, 12)


async def test_a_dead_row_locked_by_a_requeue_in_progress_is_skipped(
    store: Store, db_url: str,
) -> None:
    gen = await _generation(store)
    [event_id] = await _rows(store, gen, 1, "DEAD", age=30 * 24 * HOUR)
    async with open_database(db_url, pool_size=1) as other:
        tx = await other.open_transaction()
        await tx.query("execute", "SELECT 1 FROM core.outbox WHERE id = $1 FOR UPDATE",
                       (event_id,))
        try:
            report = await Pruner(store, RuntimeState("p", gen), QUICK).run_once()
        finally:
            await tx.rollback()
    assert report is not None and report.pruned["dead"] == 0
    assert await _left(store, [event_id]) == (1, 2)


async def test_a_pass_deletes_in_batches_until_a_batch_comes_back_short(store: Store) -> None:
    gen = await _generation(store)
    old = await _rows(store, gen, 2500, "DONE", age=2 * HOUR, handlers=("a",))
    counting = CountingStore(store)
    settings = dataclasses.replace(QUICK, batch=1000)
    report = await Pruner(counting, RuntimeState("p", gen), settings).run_once()  # type: ignore[arg-type]
    assert report is not None and report.pruned["done"] == 2500
    assert [s for s in counting.statements if s[0] == "done"] == [("done", 1000)] * 3
    assert await _left(store, old) == (0, 0)


async def test_a_pass_stops_at_its_budget_and_the_next_pass_goes_on(store: Store) -> None:
    gen = await _generation(store)
    await _rows(store, gen, 300, "DONE", age=2 * HOUR, handlers=("a",))
    settings = dataclasses.replace(QUICK, batch=100, budget=0.0)  # one batch per kind
    first = await Pruner(store, RuntimeState("p", gen), settings).run_once()
    assert first is not None and first.pruned["done"] == 100
    await store.execute("UPDATE core.prune_passes SET started_at = started_at - interval '1 hour'")
    second = await Pruner(store, RuntimeState("p", gen), settings).run_once()
    assert second is not None and second.pruned["done"] == 100


async def test_two_pruners_run_one_pass_between_them(store: Store, db_url: str) -> None:
    gen = await _generation(store)
    await _rows(store, gen, 50, "DONE", age=2 * HOUR)
    reports: list[object] = []
    async with open_database(db_url, pool_size=2) as other:
        a = Pruner(store, RuntimeState("a", gen), QUICK)
        b = Pruner(other, RuntimeState("b", gen), QUICK)

        async def one(p: Pruner) -> None:
            reports.append(await p.run_once())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, a)
            nursery.start_soon(one, b)
    assert sorted(r is None for r in reports) == [False, True]
    assert a.passes + b.passes == 1 and a.skipped + b.skipped == 1
    assert await store.fetchval("SELECT count(*) FROM core.prune_passes") == 1
    assert await store.fetchval(
        "SELECT (pruned->>'done')::int FROM core.prune_passes WHERE finished_at IS NOT NULL"
    ) == 50


async def test_a_running_pass_elsewhere_blocks_a_new_one_past_the_interval(store: Store) -> None:
    gen = await _generation(store)
    # A pass started 10 s ago elsewhere and still running (no finished_at).
    await store.execute("INSERT INTO core.prune_passes (worker_id, started_at)"
                        " VALUES ('elsewhere', clock_timestamp() - interval '10 seconds')")
    settings = dataclasses.replace(QUICK, interval=1.0)
    assert await Pruner(store, RuntimeState("p", gen), settings).run_once() is None
    # A pass unfinished for longer than the budget plus a minute crashed: it blocks no more.
    await store.execute("UPDATE core.prune_passes SET started_at = started_at - interval '1 hour'")
    assert await Pruner(store, RuntimeState("p", gen), settings).run_once() is not None


async def test_silent_workers_become_lost_and_old_records_go(store: Store) -> None:
    gen = await _generation(store)
    await store.execute(
        "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid,"
        " state, last_seen) VALUES"
        " ('killed', $1, 't', 's', 'h', 1, 'running', clock_timestamp() - interval '2 hours'),"
        " ('stale', $1, 't', 's', 'h', 2, 'running', clock_timestamp() - interval '5 minutes'),"
        " ('gone', $1, 't', 's', 'h', 3, 'exited', clock_timestamp() - interval '2 days'),"
        " ('long-lost', $1, 't', 's', 'h', 4, 'lost', clock_timestamp() - interval '2 days'),"
        " ('exited', $1, 't', 's', 'h', 5, 'exited', clock_timestamp() - interval '2 hours')",
        gen)
    await store.execute(
        "INSERT INTO core.reconcile_passes (worker_id, generation, started_at) VALUES"
        " ('w', $1, clock_timestamp() - interval '3 days'),"
        " ('w', $1, clock_timestamp() - interval '2 days'),"
        " ('w', $1, clock_timestamp() - interval '1 minute')", gen)
    await store.execute(
        "INSERT INTO core.generation_handovers (from_generation, to_generation, policy, rows, at)"
        " VALUES (1, 2, 'adopt', 5, clock_timestamp() - interval '2 days'),"
        "        (1, 2, 'adopt', 5, clock_timestamp())")
    report = await Pruner(store, RuntimeState("p", gen), QUICK).run_once()
    assert report is not None
    assert report.pruned["lost_workers"] == 1
    assert report.pruned["workers"] == 2
    assert report.pruned["reconcile_passes"] == 2
    assert report.pruned["handovers"] == 1
    states = {r["worker_id"]: r["state"] for r in await store.fetch(
        "SELECT worker_id, state FROM core.workers")}
    assert states == {"killed": "lost", "stale": "running", "exited": "exited"}
    stale = {r["worker_id"]: r["stale"] for r in await store.workers(60.0)}
    assert stale == {"killed": False, "stale": True, "exited": False}, "a lost worker is not stale"
    assert await store.fetchval("SELECT count(*) FROM core.reconcile_passes") == 1


async def test_a_lost_worker_that_beats_again_is_running(store: Store, db_url: str) -> None:
    gen = await _generation(store)
    await store.execute(
        "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid,"
        " state, last_seen) VALUES ('paused', $1, 't', 's', 'h', 1, 'running',"
        " clock_timestamp() - interval '2 hours')", gen)
    await Pruner(store, RuntimeState("p", gen), QUICK).run_once()
    conn = await store.connect("test")
    try:
        assert await conn.beat("paused", "running")
    finally:
        await conn.aclose()
    assert await store.fetchval(
        "SELECT state FROM core.workers WHERE worker_id = 'paused'") == "running"


async def test_the_runtime_prunes_by_default_and_not_with_the_kill_switch(store: Store) -> None:
    app = spectral.App(service="t")
    gen = await _generation(store)
    kept = await _rows(store, gen, 10, "DONE", age=2 * HOUR)
    off = FAST.with_changes(prune_enabled=False, prune_interval=0.2, retain_done=HOUR)
    async with running(app, store, gen, off) as state:
        await trio.sleep(1.0)
    assert state.prune is not None and state.prune["enabled"] is False
    assert await _left(store, kept) == (10, 20)
    assert await store.fetchval("SELECT count(*) FROM core.prune_passes") == 0

    on = off.with_changes(prune_enabled=True)
    async with running(app, store, gen, on) as state:
        await wait_until(lambda: _all_gone(store, kept))

        async def counted() -> bool:
            # The pass publishes its counters after its last statement, not with it.
            return state.prune is not None and state.prune["pruned_total"]["done"] >= 10

        await wait_until(counted)
    assert await _left(store, kept) == (0, 0)
    assert state.prune is not None and state.prune["pruned_total"]["done"] == 10


async def test_the_live_switch_off_stops_passes_and_on_resumes_them_without_a_restart(
    store: Store,
) -> None:
    gen = await _generation(store)
    kept = await _rows(store, gen, 10, "DONE", age=2 * HOUR)
    pruner = Pruner(store, RuntimeState("p", gen), dataclasses.replace(QUICK, interval=0.2))
    await store.set_prune_enabled(False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pruner.run)
        await trio.sleep(1.0)
        assert pruner.passes == 0
        assert await store.fetchval("SELECT count(*) FROM core.prune_passes") == 0
        assert await _left(store, kept) == (10, 20)
        assert pruner._state.prune is not None and pruner._state.prune["enabled"] is False
        await store.set_prune_enabled(True)

        async def pruned() -> bool:
            # The pass counts itself after its last statement: wait for that too, or the
            # cancel below could cut it off between its deletes and its count.
            return pruner.passes >= 1 and await _all_gone(store, kept)

        await wait_until(pruned)
        nursery.cancel_scope.cancel()
    assert pruner.passes >= 1
    assert pruner._state.prune is not None and pruner._state.prune["enabled"] is True


async def test_the_live_switch_on_overrides_a_process_that_starts_with_pruning_off(
    store: Store,
) -> None:
    app = spectral.App(service="t")
    gen = await _generation(store)
    kept = await _rows(store, gen, 10, "DONE", age=2 * HOUR)
    off = FAST.with_changes(prune_enabled=False, prune_interval=0.2, retain_done=HOUR)
    await store.set_prune_enabled(True)
    async with running(app, store, gen, off):
        await wait_until(lambda: _all_gone(store, kept))
    await store.set_prune_enabled(None)
    assert await store.prune_enabled_override() is None
