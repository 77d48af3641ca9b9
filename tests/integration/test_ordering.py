"""Per-key ordering against the real database: what the claim takes, what holds a key,
what unblocks it, concurrent claimers, the plan, and keyed turns in a running worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
import trio

import spectral
from spectral.db import Ack, Fail, Settlement, Store
from spectral.db._queries import OUTBOX
from spectral.errors import InvalidKeyError

from .test_worker_turns import running, wait_until

TOPIC = "order.event"


async def _gen(store: Store) -> int:
    return int((await store.allocate_generation("test", None, None))["generation"])


async def _pub(store: Store, gen: int, key: str | None, n: int = 0) -> int:
    return int(await store.fetchval(
        "SELECT core.publish($1, $2::jsonb, generation => $3, key => $4)",
        TOPIC, json.dumps({"n": n}), gen, key,
    ))


async def _claim(store: Store, gen: int, limit: int = 100) -> dict[int, Any]:
    return {r.id: r for r in await store.claim(gen, limit, "w", 60.0)}


async def _ack(store: Store, *rows: Any) -> None:
    await store.settle(Settlement(ack=[Ack(r.id, r.token) for r in rows]))


async def _dead(store: Store, row: Any, *, skip: bool = False) -> None:
    await store.settle(Settlement(fail=[Fail(row.id, row.token, 0.0, "boom", True, "r", skip)]))


async def test_the_claim_takes_only_the_oldest_unfinished_event_of_each_key(store: Store) -> None:
    gen = await _gen(store)
    a1, b1, a2, free1, b2, a3 = [
        await _pub(store, gen, k) for k in ("A", "B", "A", None, "B", "A")
    ]
    first = await _claim(store, gen)
    assert set(first) == {a1, b1, free1}
    assert first[a1].key == "A" and first[free1].key is None
    # While A's head is claimed nothing else of A (or B) is taken.
    assert await _claim(store, gen) == {}
    await _ack(store, first[a1])
    second = await _claim(store, gen)
    assert set(second) == {a2}
    await _ack(store, first[b1], second[a2])
    assert set(await _claim(store, gen)) == {b2, a3}


async def test_a_failing_event_holds_only_its_own_key_while_it_retries(store: Store) -> None:
    gen = await _gen(store)
    a1, a2, b1 = [await _pub(store, gen, k) for k in ("A", "A", "B")]
    rows = await _claim(store, gen)
    assert set(rows) == {a1, b1}
    # a1 fails and retries in 30 s: a2 waits behind it; B goes on.
    await store.settle(Settlement(fail=[Fail(a1, rows[a1].token, 30.0, "e", False, None)]))
    await _ack(store, rows[b1])
    b2 = await _pub(store, gen, "B")
    assert set(await _claim(store, gen)) == {b2}
    assert (await store.get_event(a2))["status"] == "PENDING"


async def test_a_dead_event_blocks_its_key_until_it_is_requeued(store: Store) -> None:
    gen = await _gen(store)
    a1, a2 = await _pub(store, gen, "A"), await _pub(store, gen, "A")
    rows = await _claim(store, gen)
    await _dead(store, rows[a1])
    assert await _claim(store, gen) == {}
    blocked = await store.blocked_keys()
    assert [(b["key"], b["head_id"], b["waiting"]) for b in blocked] == [("A", a1, 1)]
    assert await store.requeue_ids([a1]) == [a1]
    again = await _claim(store, gen)
    assert set(again) == {a1}  # the requeued head runs first, then a2
    await _ack(store, again[a1])
    assert set(await _claim(store, gen)) == {a2}
    assert await store.blocked_keys() == []


async def test_skipping_a_dead_head_lets_its_key_move_on(store: Store) -> None:
    gen = await _gen(store)
    a1, a2 = await _pub(store, gen, "A"), await _pub(store, gen, "A")
    await _dead(store, (await _claim(store, gen))[a1])
    assert await store.skip_ids([a1, a2]) == [a1]  # a2 is not DEAD: unchanged
    assert set(await _claim(store, gen)) == {a2}
    row = await store.get_event(a1)
    assert row["status"] == "DEAD" and row["skipped_at"] is not None


async def test_a_skip_policy_dead_event_releases_its_key_in_the_settle(store: Store) -> None:
    gen = await _gen(store)
    a1, a2 = await _pub(store, gen, "A"), await _pub(store, gen, "A")
    await _dead(store, (await _claim(store, gen))[a1], skip=True)
    assert set(await _claim(store, gen)) == {a2}
    assert await store.blocked_keys() == []


async def test_a_newer_generations_event_waits_for_the_older_generations_event_of_its_key(
    store: Store,
) -> None:
    old = await _gen(store)
    new = await _gen(store)
    k_old = await _pub(store, old, "K")
    k_new, other = await _pub(store, new, "K"), await _pub(store, new, "L")
    assert set(await _claim(store, new)) == {other}
    rows = await _claim(store, old)
    assert set(rows) == {k_old}
    await _ack(store, rows[k_old])
    assert set(await _claim(store, new)) == {k_new}


async def test_an_earlier_id_committed_later_waits_for_the_running_event_of_its_key(
    store: Store,
) -> None:
    """Concurrent producers on one key: the order is the order rows become visible, and
    the key still runs one event at a time."""
    gen = await _gen(store)
    sql = "SELECT core.publish('order.event', '{}', key => 'K', generation => $1)"
    t1, t2 = await store.open_transaction(), await store.open_transaction()
    early = await t1.query("fetchval", sql, (gen,))
    late = await t2.query("fetchval", sql, (gen,))
    assert early < late
    await t2.commit()
    rows = await _claim(store, gen)
    assert set(rows) == {late}
    await t1.commit()
    assert await _claim(store, gen) == {}  # the earlier id waits: `late` is running
    await _ack(store, rows[late])
    assert set(await _claim(store, gen)) == {early}


async def trio_asyncio_run(fn: Any, *args: Any) -> Any:
    import trio_asyncio

    return await trio_asyncio.aio_as_trio(fn)(*args)


async def test_a_key_another_claimer_is_taking_is_left_for_the_next_claim(store: Store) -> None:
    """The claim's per-key lock: while another transaction holds key K's lock, K's head is
    skipped (not waited for) and other keys are claimed; after it, K's head is taken."""
    gen = await _gen(store)
    k, other = await _pub(store, gen, "K"), await _pub(store, gen, "L")
    holder = await store.open_transaction()
    await holder.query("execute", "SELECT pg_advisory_xact_lock(1936024420, hashtext('K'))", ())
    with trio.fail_after(5):
        assert set(await _claim(store, gen)) == {other}
    await holder.rollback()
    assert set(await _claim(store, gen)) == {k}


async def test_keys_are_validated_in_python_and_in_sql_alike(store: Store) -> None:
    gen = await _gen(store)
    for bad in ("", "x" * 257, "a\nb", "tab\there"):
        with pytest.raises(InvalidKeyError):
            spectral.events.check_key(bad)
        with pytest.raises(InvalidKeyError, match="invalid key"):
            await _pub(store, gen, bad)
    assert await store.fetchval("SELECT count(*) FROM core.outbox") == 0
    assert spectral.events.check_key("x" * 256) == "x" * 256
    assert await _pub(store, gen, "ключ/42 ok") > 0


async def test_old_calls_of_core_publish_keep_working(store: Store) -> None:
    gen = await _gen(store)
    ids = [
        await store.fetchval("SELECT core.publish('a.b', '{}')"),
        await store.fetchval("SELECT core.publish('a.b', '{}', now())"),
        await store.fetchval("SELECT core.publish('a.b', '{}', NULL, $1)", gen),
        await store.fetchval("SELECT core.publish(topic => 'a.b', payload => '{}', generation => $1)", gen),
    ]
    rows = await store.fetch("SELECT key, generation FROM core.outbox ORDER BY id")
    assert len(set(ids)) == 4
    assert [(r["key"], r["generation"]) for r in rows] == [(None, gen)] * 4


async def _claim_and_finish(
    conn: asyncpg.Connection, gen: int, limit: int, worker: str, errors: list[str]
) -> int:
    """One claim, its rows marked DONE at once; a refused double claim goes to ``errors``.
    Returns how many rows it claimed."""
    try:
        rows = await conn.fetch(OUTBOX.claim, gen, limit, worker, 60.0)
    except asyncpg.UniqueViolationError as exc:
        errors.append(str(exc))
        return 0
    if rows:
        await conn.execute(
            "UPDATE core.outbox SET status = 'DONE', claim_token = NULL,"
            " claim_expires_at = NULL WHERE id = ANY($1::bigint[])",
            [r["id"] for r in rows])
    return len(rows)


async def _held_claims(db_url: str, gen: int, claimers: int, rounds: int) -> list[str]:
    """Claim with ``claimers`` connections at once, acknowledging each batch right away;
    a unique index on (key) of CLAIMED rows makes a double claim of one key an error."""
    errors: list[str] = []

    async def claimer(i: int) -> None:
        conn = await asyncpg.connect(db_url)
        try:
            for _ in range(rounds):
                await _claim_and_finish(conn, gen, 3, f"w{i}", errors)
        finally:
            await conn.close()

    await asyncio.gather(*(claimer(i) for i in range(claimers)))
    return errors


async def test_concurrent_claimers_never_hold_two_events_of_one_key(db_url: str, store: Store) -> None:
    gen = await _gen(store)
    await store.execute(
        "CREATE UNIQUE INDEX one_claim_per_key ON core.outbox (key) WHERE status = 'CLAIMED'"
    )
    await store.execute(
        "SELECT core.publish('order.event', '{}', generation => $1, key => 'k' || (i % 5))"
        " FROM generate_series(1, 400) AS i", gen,
    )
    errors = await trio_asyncio_run(_held_claims, db_url, gen, 6, 120)
    assert errors == []
    done = await store.fetch(
        "SELECT key, array_agg(id ORDER BY updated_at, id) AS ids FROM core.outbox"
        " WHERE status = 'DONE' GROUP BY key"
    )
    assert sum(len(r["ids"]) for r in done) > 50


async def test_the_unique_claim_index_does_catch_a_double_claim(db_url: str, store: Store) -> None:
    """The check above can fail: an unkeyed-style claim of two rows of one key breaks it."""
    gen = await _gen(store)
    await store.execute(
        "CREATE UNIQUE INDEX one_claim_per_key ON core.outbox (key) WHERE status = 'CLAIMED'"
    )
    await _pub(store, gen, "K")
    await _pub(store, gen, "K")
    with pytest.raises(spectral.errors.DatabaseError):
        await store.execute(
            "UPDATE core.outbox SET status = 'CLAIMED', claim_token = gen_random_uuid(),"
            " claim_expires_at = now() + interval '1 minute'"
        )


async def test_keyed_events_run_one_at_a_time_in_order_with_fan_out(store: Store) -> None:
    """Two handlers per event, several keys, eight turns at a time: within a key no event
    starts before both handlers of the previous one finished."""
    app = spectral.App(service="t")
    log: list[tuple[str, str, int, str]] = []
    running_keys: dict[str, int] = {}
    overlaps: list[str] = []

    def handler(name: str) -> Any:
        async def fn(event: spectral.Event, tx: spectral.Tx) -> None:
            assert event.key is not None
            holder = running_keys.get(event.key)
            if holder is not None and holder != event.id:
                overlaps.append(f"{event.key}: {event.id} while {holder}")
            running_keys[event.key] = event.id
            log.append(("start", event.key, event.id, name))
            await trio.sleep(0.01)
            log.append(("end", event.key, event.id, name))
            if name == "second":
                del running_keys[event.key]
        return fn

    app.handler(TOPIC, name="first")(handler("first"))
    app.handler(TOPIC, name="second")(handler("second"))
    gen = await _gen(store)
    published: dict[str, list[int]] = {}
    for i in range(40):
        key = f"k{i % 4}"
        published.setdefault(key, []).append(await _pub(store, gen, key, i))
    async with running(app, store, gen):
        await wait_until(lambda: _all_done(store), 20)
    assert overlaps == []
    for key, ids in published.items():
        assert [e[2] for e in log if e[1] == key and e[0] == "start" and e[3] == "first"] == ids


async def _all_done(store: Store) -> bool:
    return bool(await store.fetchval(
        "SELECT count(*) = 0 FROM core.outbox WHERE status <> 'DONE'"))


async def test_a_dead_key_with_the_skip_policy_moves_on_and_block_holds(store: Store) -> None:
    app = spectral.App(service="t")
    seen: list[tuple[str, int]] = []

    @app.handler("k.block", name="blocker", max_attempts=2)
    async def blocker(event: spectral.Event, tx: spectral.Tx) -> None:
        seen.append((event.topic, event.id))
        if event.payload.get("poison"):
            raise RuntimeError("poison")

    @app.handler("k.skip", name="skipper", max_attempts=2, on_dead="skip")
    async def skipper(event: spectral.Event, tx: spectral.Tx) -> None:
        await blocker(event, tx)

    gen = await _gen(store)

    async def pub(topic: str, key: str, poison: bool) -> int:
        return await store.publish(topic, json.dumps({"poison": poison}), generation=gen,
                                   extras=spectral.events.publish_extras(key))

    b1, b2 = await pub("k.block", "B", True), await pub("k.block", "B", False)
    s1, s2 = await pub("k.skip", "S", True), await pub("k.skip", "S", False)
    async with running(app, store, gen):
        await wait_until(lambda: _status_is(store, s2, "DONE"), 10)
        await wait_until(lambda: _status_is(store, b1, "DEAD"), 10)
        await trio.sleep(0.3)  # several polls: b2 must still wait
        assert (await store.get_event(b2))["status"] == "PENDING"
        assert [b["head_id"] for b in await store.blocked_keys()] == [b1]
        assert await store.skip_ids([b1]) == [b1]
        await wait_until(lambda: _status_is(store, b2, "DONE"), 10)
    assert (await store.get_event(s1))["status"] == "DEAD"


async def _status_is(store: Store, event_id: int, status: str) -> bool:
    row = await store.get_event(event_id)
    return row is not None and row["status"] == status



def _keyed_claim_plans(url: str) -> tuple[str, str, str]:
    """EXPLAIN of the claim over 200k finished keyed rows and a keyed backlog: custom
    plan, generic plan, and without the key index (rolled back)."""

    async def run() -> tuple[str, str, str]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute("INSERT INTO core.deployments (reference) VALUES ('v1')")
            await conn.execute(
                "INSERT INTO core.outbox (generation, topic, payload, status, done_at, key)"
                " SELECT 1, 'order.event', '{}', 'DONE', now(), 'k' || (i % 10000)"
                " FROM generate_series(1, 200000) AS i")
            await conn.execute(
                "INSERT INTO core.outbox (generation, topic, payload, key)"
                " SELECT 1, 'order.event', '{}', 'k' || (i % 1000) FROM generate_series(1, 5000) AS i")
            await conn.execute("ANALYZE core.outbox")
            args = (1, 100, "worker-1", 60.0)
            custom = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + OUTBOX.claim, *args))
            await conn.execute("PREPARE claim_stmt (bigint, integer, text, float8) AS " + OUTBOX.claim)
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            generic = "\n".join(
                r[0] for r in await conn.fetch("EXPLAIN EXECUTE claim_stmt (1, 100, 'w', 60)"))
            tr = conn.transaction()
            await tr.start()
            await conn.execute("DROP INDEX core.outbox_key_held_idx")
            without = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + OUTBOX.claim, *args))
            await tr.rollback()
            return custom, generic, without
        finally:
            await conn.close()

    return asyncio.run(run())


def test_the_keyed_claim_is_index_driven_with_200k_finished_keyed_rows(db_url: str) -> None:
    custom, generic, without = _keyed_claim_plans(db_url)
    for plan in (custom, generic):
        assert "Index Scan using outbox_due_idx" in plan, plan
        assert "outbox_key_held_idx" in plan, plan
        assert "Seq Scan" not in plan, plan
    # The check can fail: without the key index the earlier-row probe has no index of its own.
    assert "outbox_key_held_idx" not in without
    # ... and walks every earlier row by id, finished ones included, for each candidate.
    assert "Index Cond: (id < o_1.id)" in without, without


async def _race_producers_and_claimers(db_url: str, gen: int, seconds: float) -> list[str]:
    """Producers that do not serialise on their keys (transactions held open a random
    moment, so ids commit out of order) against claimers that claim and acknowledge at
    once; returns the double claims the database refused."""
    import random

    errors: list[str] = []
    stop = asyncio.Event()

    async def producer(i: int) -> None:
        rng = random.Random(i)
        conn = await asyncpg.connect(db_url)
        try:
            while not stop.is_set():
                async with conn.transaction():
                    await conn.execute(
                        "SELECT core.publish('order.event', '{}', generation => $1, key => $2)",
                        gen, f"k{rng.randrange(3)}")
                    await asyncio.sleep(rng.random() * 0.004)
        finally:
            await conn.close()

    async def claimer(i: int) -> None:
        conn = await asyncpg.connect(db_url)
        try:
            while not stop.is_set():
                await _claim_and_finish(conn, gen, 5, f"w{i}", errors)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(producer(i)) for i in range(4)]
    tasks += [asyncio.create_task(claimer(i)) for i in range(4)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return errors


async def test_unserialised_producers_and_concurrent_claimers_never_claim_one_key_twice(
    db_url: str, store: Store,
) -> None:
    gen = await _gen(store)
    await store.execute(
        "CREATE UNIQUE INDEX one_claim_per_key ON core.outbox (key) WHERE status = 'CLAIMED'")
    errors = await trio_asyncio_run(_race_producers_and_claimers, db_url, gen, 4.0)
    assert errors == []
    assert await store.fetchval("SELECT count(*) FROM core.outbox WHERE status = 'DONE'") > 100
