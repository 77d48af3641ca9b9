"""The reconciler against a real PostgreSQL: sweeps, the shared schedule, the kill switch."""

from __future__ import annotations

import json
from datetime import datetime

import trio

import spectral
from spectral.actors.reconciler import Reconciler, ReconcileSettings
from spectral.db import Ack, Store
from spectral.state import RuntimeState

from .test_worker_turns import FAST, _generation, _is, running, wait_until

QUICK = ReconcileSettings(interval=0.3, grace=0.2, stale_after=1.0, retire_grace=0.5)


async def _register(store: Store, worker_id: str, generation: int, *, age: float = 0.0,
                    state: str = "running") -> None:
    await store.execute(
        "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid,"
        " state, last_seen) VALUES ($1, $2, 'test', 't', 'h', 1, $3,"
        " clock_timestamp() - make_interval(secs => $4))",
        worker_id, generation, state, age,
    )


async def test_a_lost_wakeup_is_handled_within_interval_plus_grace(store: Store) -> None:
    """NOTIFY off (trigger disabled) and a poll interval of a minute: only the reconciler
    can wake the claimer."""
    await store.execute("ALTER TABLE core.outbox DISABLE TRIGGER outbox_notify")
    app = spectral.App(service="t")
    handled: list[int] = []

    @app.handler("stuck.row", name="h")
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        handled.append(event.id)

    settings = FAST.with_changes(poll_interval=60.0, reconcile_interval=0.5,
                                 reconcile_grace=0.5, claim_ttl=120.0)
    gen = await _generation(store)
    async with running(app, store, gen, settings) as state:
        await trio.sleep(0.3)  # the claimer's first poll found nothing; it now sleeps 60 s
        event_id = await store.publish("stuck.row", "{}", generation=gen)
        t0 = trio.current_time()
        await wait_until(lambda: _is(store, event_id, "DONE"), seconds=10)
        elapsed = trio.current_time() - t0

        # The pass that woke the claimer publishes its totals when all its sweeps are done,
        # which may be just after the row is.
        async def counted() -> bool:
            block = state.reconcile or {}
            return bool(block.get("unblocked_total", {}).get("lost_wakeups", 0) >= 1)

        await wait_until(counted, seconds=5)
    assert handled == [event_id]
    # interval + grace + slack for a loaded machine: far below the 60 s poll.
    assert elapsed < 0.5 + 0.5 + 3.0
    assert state.reconcile is not None and state.reconcile["unblocked_total"]["lost_wakeups"] >= 1


async def test_claims_of_a_dead_worker_are_released_before_the_claim_ttl(store: Store) -> None:
    gen = await _generation(store)
    await _register(store, "crashed", gen, age=30)
    event_id = await store.publish("t.x", "{}", generation=gen)
    [row] = await store.claim(gen, 10, "crashed", 3600)  # a claim TTL of an hour
    state = RuntimeState("reconciler-1", gen)
    reconciler = Reconciler(store, state, spectral.App(), QUICK)
    report = await reconciler.run_once()
    assert report is not None and report.unblocked["orphaned_claims"] == 1
    current = await store.get_event(event_id)
    assert current is not None
    assert current["status"] == "PENDING" and current["attempts"] == 1
    assert "crashed is gone" in current["last_error"]
    # The dead worker's late acknowledgement is fenced off.
    from spectral.db import Settlement

    settled = await store.settle(Settlement(ack=[Ack(event_id, row.token)]))
    assert settled.acked == set()


async def test_claims_of_a_live_worker_are_left_alone(store: Store) -> None:
    gen = await _generation(store)
    await _register(store, "alive", gen)
    event_id = await store.publish("t.x", "{}", generation=gen)
    await store.claim(gen, 10, "alive", 3600)
    report = await Reconciler(store, RuntimeState("r", gen), spectral.App(), QUICK).run_once()
    assert report is not None and report.unblocked["orphaned_claims"] == 0
    assert await _is(store, event_id, "CLAIMED")


async def test_one_pass_per_interval_across_two_workers(store: Store) -> None:
    gen = await _generation(store)
    settings = ReconcileSettings(interval=0.5, grace=10, stale_after=60)
    a = Reconciler(store, RuntimeState("a", gen), spectral.App(), settings)
    b = Reconciler(store, RuntimeState("b", gen), spectral.App(), settings)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        await trio.sleep(2.6)
        nursery.cancel_scope.cancel()
    passes = await store.fetchval("SELECT count(*) FROM core.reconcile_passes")
    # 2.6 s at one pass per 0.5 s (the gap is 0.4 s at least): 4 to 6 passes, not 10.
    assert 3 <= passes <= 7, passes
    # Each worker's counter matches its own records, except for at most one pass the
    # cancel cut off after its record was begun (documented: it stays in the record).
    by_worker = {row["worker_id"]: row["count"] for row in await store.fetch(
        "SELECT worker_id, count(*) FROM core.reconcile_passes GROUP BY worker_id")}
    for worker_id, worker in (("a", a), ("b", b)):
        recorded = by_worker.get(worker_id, 0)
        assert recorded - 1 <= worker.passes <= recorded, (worker_id, worker.passes, by_worker)
    assert a.skipped + b.skipped >= 2


async def test_kill_switch_off_stops_passes_and_on_resumes_them_without_a_restart(
    store: Store,
) -> None:
    gen = await _generation(store)
    settings = ReconcileSettings(interval=0.2, grace=10, stale_after=60)
    reconciler = Reconciler(store, RuntimeState("k", gen), spectral.App(), settings)
    await store.set_reconcile_enabled(False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reconciler.run)
        await trio.sleep(1.0)
        assert reconciler.passes == 0
        assert await store.fetchval("SELECT count(*) FROM core.reconcile_passes") == 0
        assert reconciler._state.reconcile is not None
        assert reconciler._state.reconcile["enabled"] is False
        await store.set_reconcile_enabled(True)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert reconciler.passes >= 2


async def test_a_failing_user_sweep_does_not_stop_the_others(store: Store) -> None:
    gen = await _generation(store)
    await store.execute(
        "CREATE TABLE stages (id int, state text, updated_at timestamptz DEFAULT now() - interval '1 hour')"
    )
    await store.execute("INSERT INTO stages (id, state) SELECT g, 'waiting' FROM generate_series(1, 3) g")
    await _register(store, "gone", gen, age=30)
    await store.publish("t.x", "{}", generation=gen)
    await store.claim(gen, 10, "gone", 3600)
    app = spectral.App()
    seen_cutoffs: list[datetime] = []

    @app.sweep("broken")
    async def broken(tx: spectral.Tx, cutoff: datetime) -> int:
        await tx.execute("UPDATE stages SET state = 'broken'")
        raise RuntimeError("webhook API down")

    @app.sweep("webhooks", grace=60)
    async def webhooks(tx: spectral.Tx, cutoff: datetime) -> int:
        seen_cutoffs.append(cutoff)
        done = await tx.fetch(
            "UPDATE stages SET state = 'advanced' WHERE state = 'waiting' AND updated_at < $1"
            " RETURNING id", cutoff,
        )
        return len(done)

    state = RuntimeState("r", gen)
    report = await Reconciler(store, state, app, QUICK).run_once()
    assert report is not None
    assert report.unblocked["webhooks"] == 3
    assert report.unblocked["orphaned_claims"] == 1
    assert "broken" not in report.unblocked
    assert any("webhook API down" in e for e in report.errors)
    # The failing sweep's writes were rolled back; the good one's committed.
    states = await store.fetch("SELECT DISTINCT state FROM stages")
    assert states == [{"state": "advanced"}]
    last = await store.last_reconcile_pass()
    assert last is not None and last["unblocked"]["webhooks"] == 3
    assert len(seen_cutoffs) == 1


async def test_a_fresh_reconciler_finds_stuck_work_left_by_earlier_processes(store: Store) -> None:
    """Restart safety: nothing lives in memory; the database tells the reconciler all."""
    gen = await _generation(store)
    await _register(store, "old-process", gen, age=600)
    ids = [await store.publish("t.x", json.dumps({"i": i}), generation=gen) for i in range(5)]
    await store.claim(gen, 3, "old-process", 3600)
    await store.execute(
        "UPDATE core.outbox SET available_at = now() - interval '10 minutes' WHERE status = 'PENDING'"
    )
    await _register(store, "live", gen)
    report = await Reconciler(store, RuntimeState("fresh", gen), spectral.App(), QUICK).run_once()
    assert report is not None
    assert report.unblocked["orphaned_claims"] == 3
    assert report.unblocked["lost_wakeups"] == 2
    assert report.unblocked["stale_workers"] == 1
    statuses = {r["status"] for r in await store.fetch(
        "SELECT status FROM core.outbox WHERE id = ANY($1::bigint[])", ids)}
    assert statuses == {"PENDING"}


async def _retire_setup(store: Store) -> tuple[int, int, list[int]]:
    old = await _generation(store)
    new = await _generation(store)
    await store.execute("UPDATE core.deployments SET deployed_at = now() - interval '1 hour'")
    await _register(store, "old-w", old, age=600, state="exited")
    await _register(store, "new-w", new)
    ids = [await store.publish("t.x", "{}", generation=old) for _ in range(4)]
    return old, new, ids


async def test_a_retired_generation_s_rows_are_adopted_by_the_newest_live_one(store: Store) -> None:
    old, new, ids = await _retire_setup(store)
    report = await Reconciler(store, RuntimeState("r", new), spectral.App(), QUICK).run_once()
    assert report is not None and report.unblocked["retired_generations"] == 4
    gens = {r["generation"] for r in await store.fetch(
        "SELECT generation FROM core.outbox WHERE id = ANY($1::bigint[])", ids)}
    assert gens == {new}
    retired = await store.fetch("SELECT generation, retire_policy FROM core.deployments"
                                " WHERE retired_at IS NOT NULL")
    assert retired == [{"generation": old, "retire_policy": "adopt"}]
    handovers = await store.fetch("SELECT from_generation, to_generation, policy, rows"
                                  " FROM core.generation_handovers")
    assert handovers == [{"from_generation": old, "to_generation": new, "policy": "adopt", "rows": 4}]
    # The newest live generation itself is never retired.
    assert await store.fetchval(
        "SELECT retired_at FROM core.deployments WHERE generation = $1", new) is None


async def test_retire_policy_dead_dead_letters_and_keep_keeps(store: Store) -> None:
    old, new, ids = await _retire_setup(store)
    keep = ReconcileSettings(**{**QUICK.__dict__, "retire_policy": "keep"})
    report = await Reconciler(store, RuntimeState("r", new), spectral.App(), keep).run_once()
    assert report is not None and report.unblocked["retired_generations"] == 0
    assert await store.fetchval(
        "SELECT count(*) FROM core.outbox WHERE generation = $1 AND status = 'PENDING'", old) == 4
    await store.execute("UPDATE core.deployments SET retired_at = NULL")
    await store.execute("DELETE FROM core.reconcile_passes")
    dead = ReconcileSettings(**{**QUICK.__dict__, "retire_policy": "dead"})
    report = await Reconciler(store, RuntimeState("r", new), spectral.App(), dead).run_once()
    assert report is not None and report.unblocked["retired_generations"] == 4
    reasons = {r["dead_reason"] for r in await store.fetch(
        "SELECT dead_reason FROM core.outbox WHERE id = ANY($1::bigint[])", ids)}
    assert reasons == {f"generation {old} retired"}


async def test_a_generation_with_a_live_worker_is_not_retired(store: Store) -> None:
    old, new, ids = await _retire_setup(store)
    await _register(store, "old-still-alive", old)
    report = await Reconciler(store, RuntimeState("r", new), spectral.App(), QUICK).run_once()
    assert report is not None and report.unblocked["retired_generations"] == 0
    assert await store.fetchval("SELECT count(*) FROM core.deployments WHERE retired_at IS NOT NULL") == 0


async def test_notify_unblock_reports_each_unblocked_item_through_the_hook(store: Store) -> None:
    gen = await _generation(store)
    await _register(store, "gone", gen, age=30)
    ids = [await store.publish("t.x", "{}", generation=gen) for _ in range(2)]
    await store.claim(gen, 10, "gone", 3600)
    app = spectral.App()
    reported: list[tuple[str, int, list[int]]] = []

    @app.on_unblock
    async def hook(sweep: str, count: int, items: list[int]) -> None:
        reported.append((sweep, count, sorted(items)))

    loud = ReconcileSettings(**{**QUICK.__dict__, "notify_unblock": True})
    await Reconciler(store, RuntimeState("r", gen), app, loud).run_once()
    assert reported == [("orphaned_claims", 2, ids)]
    await store.execute("DELETE FROM core.reconcile_passes")
    reported.clear()
    await store.claim(gen, 10, "gone", 3600)
    await Reconciler(store, RuntimeState("r", gen), app, QUICK).run_once()  # notify off
    assert reported == []


async def test_a_generation_keeps_the_policy_it_was_retired_with(store: Store) -> None:
    old, new, ids = await _retire_setup(store)
    await store.execute("UPDATE core.deployments SET retired_at = now(), retire_policy = 'keep'"
                        " WHERE generation = $1", old)
    # This worker's policy is adopt, but generation `old` was retired with keep.
    report = await Reconciler(store, RuntimeState("r", new), spectral.App(), QUICK).run_once()
    assert report is not None and report.unblocked["retired_generations"] == 0
    assert await store.fetchval(
        "SELECT count(*) FROM core.outbox WHERE generation = $1 AND status = 'PENDING'", old) == 4
