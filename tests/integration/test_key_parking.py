"""Key parking against the real database (migration 0010): rows waiting behind their
key's head are parked out of the claim's range scan and put back when the key moves on,
so one hot or blocked key does not make every claim step over its backlog."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import trio

import spectral
from spectral.actors.reconciler import Reconciler, ReconcileSettings
from spectral.db import Store
from spectral.db._queries import OUTBOX
from spectral.state import RuntimeState

from .test_ordering import (
    TOPIC,
    _ack,
    _claim,
    _claim_and_finish,
    _dead,
    _gen,
    _pub,
    trio_asyncio_run,
)

PARKED = datetime.max  # how asyncpg reads the timestamp 'infinity'


async def _available(store: Store, event_id: int) -> tuple[datetime, datetime]:
    [row] = await store.fetch(
        "SELECT available_at, created_at FROM core.outbox WHERE id = $1", event_id)
    return row["available_at"].replace(tzinfo=None), row["created_at"].replace(tzinfo=None)


async def _parked(store: Store, event_id: int) -> bool:
    available, _ = await _available(store, event_id)
    return available == PARKED


async def _put_back(store: Store, event_id: int) -> bool:
    available, created = await _available(store, event_id)
    return available == created


def _due_index_reads(plan: list[dict[str, Any]]) -> int:
    """Rows the claim read from outbox_due_idx: returned plus removed by the filter."""
    found: list[int] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Index Name") == "outbox_due_idx":
            found.append(int(node["Actual Rows"]) + int(node.get("Rows Removed by Filter", 0)))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    assert len(found) == 1, plan
    return found[0]


async def _claim_reads(db_url: str, gen: int) -> int:
    """EXPLAIN ANALYZE of one claim of 100, rolled back: how many due rows it read."""

    async def run() -> int:
        conn = await asyncpg.connect(db_url)
        try:
            tr = conn.transaction()
            await tr.start()
            raw = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + OUTBOX.claim, gen, 100, "probe", 60.0)
            await tr.rollback()
            return _due_index_reads(json.loads(raw))
        finally:
            await conn.close()

    return int(await trio_asyncio_run(run))


async def test_a_blocked_keys_backlog_is_read_by_one_claim_and_by_no_later_one(
    db_url: str, store: Store,
) -> None:
    gen = await _gen(store)
    head = await _pub(store, gen, "hot")
    [row] = (await _claim(store, gen)).values()
    await _dead(store, row)  # the key is blocked until the head is requeued or skipped
    await store.execute(
        "SELECT core.publish('order.event', '{}', generation => $1, key => 'hot')"
        " FROM generate_series(1, 2000)", gen)
    free = [await _pub(store, gen, None, n) for n in range(5)]
    parked = "SELECT count(*) FROM core.outbox WHERE key = 'hot' AND available_at = 'infinity'"
    # The claims that step over the 2,000 waiting rows park them, 500 at most per claim.
    assert set(await _claim(store, gen)) == set(free)
    assert await store.fetchval(parked) == 500
    for claims in (2, 3, 4):
        assert await _claim(store, gen) == {}
        assert await store.fetchval(parked) == 500 * claims
    assert await store.fetchval(
        "SELECT count(*) FROM core.outbox WHERE id = $1 AND available_at <> 'infinity'", head) == 1
    await store.execute("UPDATE core.outbox SET status = 'DONE', claim_token = NULL,"
                        " claim_expires_at = NULL WHERE key IS NULL")
    more = {await _pub(store, gen, None, n) for n in range(3)}
    assert await _claim_reads(db_url, gen) == 3
    # The check can fail: with the backlog put back, a claim reads all of it again.
    await store.execute(
        "UPDATE core.outbox SET available_at = created_at WHERE available_at = 'infinity'")
    assert await _claim_reads(db_url, gen) >= 2003
    assert set(await _claim(store, gen)) == more


@pytest.mark.parametrize("how", ["acknowledged", "dead-and-skipped", "skipped-later",
                                 "soft-deleted", "deleted"])
async def test_the_keys_next_row_is_put_back_when_its_head_lets_go(store: Store, how: str) -> None:
    gen = await _gen(store)
    first, second, third = [await _pub(store, gen, "K", n) for n in range(3)]
    claimed = await _claim(store, gen)
    assert set(claimed) == {first}
    await _claim(store, gen)  # a claim that sees the waiting rows parks them
    assert await _parked(store, second) and await _parked(store, third)
    head = claimed[first]
    if how == "acknowledged":
        await _ack(store, head)
    elif how == "dead-and-skipped":
        await _dead(store, head, skip=True)
    elif how == "skipped-later":
        await _dead(store, head)
        assert await _parked(store, second)  # DEAD and not skipped: the key stays held
        assert await store.skip_ids([first]) == [first]
    elif how == "soft-deleted":  # a DEAD head an operator sets aside
        await _dead(store, head)
        await store.execute("UPDATE core.outbox SET deleted_at = now() WHERE id = $1", first)
    else:
        await store.execute("DELETE FROM core.outbox WHERE id = $1", first)
    assert await _put_back(store, second)
    assert await _parked(store, third)
    assert set(await _claim(store, gen)) == {second}


async def test_a_requeued_head_keeps_its_key_and_its_acknowledgement_puts_the_next_back(
    store: Store,
) -> None:
    gen = await _gen(store)
    first, second = await _pub(store, gen, "K"), await _pub(store, gen, "K")
    [head] = (await _claim(store, gen)).values()
    await _dead(store, head)
    await _claim(store, gen)
    assert await _parked(store, second)
    assert await store.requeue_ids([first]) == [first]
    assert await _parked(store, second)
    again = await _claim(store, gen)
    assert set(again) == {first}
    await _ack(store, again[first])
    assert set(await _claim(store, gen)) == {second}


async def test_the_reconciler_puts_back_a_parked_row_that_heads_its_key(store: Store) -> None:
    gen = await _gen(store)
    lone = await _pub(store, gen, "K")
    other = await _pub(store, gen, "L")
    # A parked head cannot arise from the claim and the trigger; the sweep is the net.
    await store.execute("UPDATE core.outbox SET available_at = 'infinity' WHERE id = ANY($1)",
                        [lone, other])
    second = await _pub(store, gen, "L")  # L's head is parked; its next row stays put
    await store.execute("UPDATE core.outbox SET available_at = 'infinity' WHERE id = $1", second)
    assert await _claim(store, gen) == {}
    settings = ReconcileSettings(interval=0.5, grace=10, stale_after=60)
    report = await Reconciler(store, RuntimeState("r", gen), spectral.App(), settings).run_once()
    assert report is not None and report.unblocked["parked_heads"] == 2
    assert await _put_back(store, lone) and await _put_back(store, other)
    assert await _parked(store, second)
    assert set(await _claim(store, gen)) == {lone, other}


async def _drain_racing(db_url: str, gen: int, claimers: int, seconds: float) -> int:
    """Claimers claiming and acknowledging at once on few keys while a producer publishes
    more; returns how many rows were still unfinished when the deadline passed."""
    stop = asyncio.Event()
    errors: list[str] = []  # no unique claim index here: nothing lands in it

    async def producer() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            for i in range(300):
                await conn.execute(
                    "SELECT core.publish('order.event', '{}', generation => $1, key => $2)",
                    gen, f"k{i % 3}")
        finally:
            await conn.close()

    async def claimer(i: int) -> None:
        conn = await asyncpg.connect(db_url)
        try:
            while not stop.is_set():
                if not await _claim_and_finish(conn, gen, 2, f"w{i}", errors):
                    await asyncio.sleep(0.002)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(claimer(i)) for i in range(claimers)]
    await producer()
    conn = await asyncpg.connect(db_url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            left = int(await conn.fetchval(
                "SELECT count(*) FROM core.outbox WHERE status <> 'DONE'"))
            if left == 0:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        return int(await conn.fetchval("SELECT count(*) FROM core.outbox WHERE status <> 'DONE'"))
    finally:
        await conn.close()


async def test_racing_claims_and_acknowledgements_leave_no_key_parked_for_good(
    db_url: str, store: Store,
) -> None:
    """No reconciler runs here: a parked head would stay parked and the drain would stall."""
    gen = await _gen(store)
    left = await trio_asyncio_run(_drain_racing, db_url, gen, 4, 60.0)
    assert left == 0
    assert await store.fetchval(
        "SELECT count(*) FROM core.outbox WHERE available_at = 'infinity'") == 0
    assert await store.fetchval("SELECT count(*) FROM core.outbox WHERE status = 'DONE'") == 300


async def test_a_head_due_after_its_waiting_rows_is_claimed_by_the_claim_that_reads_them(
    store: Store,
) -> None:
    """The claim reads the head after the rows waiting behind it (its available_at is
    later than theirs, as after a retry or a delayed publish): nothing is parked behind a
    PENDING head, which the same statement then claims (changing the head while reading
    would make that claim fail)."""
    gen = await _gen(store)
    head = int(await store.fetchval(
        "SELECT core.publish($1, '{}', now() + interval '0.3 seconds', $2, key => 'K')",
        TOPIC, gen))
    waiting = [await _pub(store, gen, "K", n) for n in range(3)]
    await trio.sleep(0.4)
    assert set(await _claim(store, gen)) == {head}
    claimed = await _claim(store, gen)  # behind a running head the rows are parked now
    assert claimed == {}
    assert all([await _parked(store, w) for w in waiting])
