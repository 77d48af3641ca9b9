"""Connects cancelled at any moment leave the trio-asyncio loop running.

asyncpg's SSL negotiation over TCP leaves an unretrieved ConnectionError behind when its
connect is cancelled while the transport opens; trio-asyncio's default handler would raise
it and stop the loop (and every actor in it). Heartbeat and listener reconnects, a
cancelled claim waiting for a new pool connection, or the CancelRequest of a cancelled
query all cancel connects. A connection released with its transaction still open (a turn
cut off during its BEGIN) is reported the same way, as a message."""

from __future__ import annotations

import logging
import random

import asyncpg
import pytest
import trio
import trio.lowlevel

from spectral.db import open_database
from spectral.db.store import hop


async def test_the_loop_survives_connects_cancelled_at_random_moments(db_url: str) -> None:
    rng = random.Random(12)
    async with open_database(db_url, pool_size=1) as store:
        completed = 0
        for _ in range(400):
            with trio.move_on_after(rng.uniform(0, 0.004)):
                conn = await store.connect("spectral-test")
                await conn.aclose()
                completed += 1
            await trio.lowlevel.checkpoint()
        # The loop still runs queries; the orphaned errors would have stopped it.
        assert await store.fetchval("SELECT 41 + 1") == 42
    assert completed < 400, "every connect finished: the test cancelled none"


async def test_a_connection_released_inside_a_transaction_leaves_the_loop_running(
    db_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # A turn cut off while its BEGIN was in flight leaves the transaction half-started;
    # releasing that connection makes asyncpg roll it back and report it through the
    # loop's exception handler, with a message and no exception. trio-asyncio's default
    # handler raises every report into the loop's nursery, which stopped the worker.
    async def release_mid_transaction(pool: asyncpg.Pool) -> bool:
        conn = await pool.acquire()
        await conn.transaction().start()  # unmanaged, as a turn's transaction is
        await pool.release(conn)
        async with pool.acquire() as again:
            return bool(again.is_in_transaction())

    caplog.set_level(logging.WARNING, logger="spectral.db")
    async with open_database(db_url, pool_size=1) as store:
        still_open = await hop(release_mid_transaction, store._pool)
        await trio.sleep(0.05)  # where the loop's nursery would have failed
        assert await store.fetchval("SELECT 41 + 1") == 42
    assert still_open is False  # asyncpg rolled it back before reuse
    assert any("Resetting connection with an active transaction" in r.getMessage()
               for r in caplog.records if r.name == "spectral.db")
