"""Connects cancelled at any moment leave the trio-asyncio loop running.

asyncpg's SSL negotiation over TCP leaves an unretrieved ConnectionError behind when its
connect is cancelled while the transport opens; trio-asyncio's default handler would raise
it and stop the loop (and every actor in it). Heartbeat and listener reconnects, a
cancelled claim waiting for a new pool connection, or the CancelRequest of a cancelled
query all cancel connects."""

from __future__ import annotations

import random

import trio
import trio.lowlevel

from spectral.db import open_database


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
