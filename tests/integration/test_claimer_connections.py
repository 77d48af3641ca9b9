"""The claimer's own connections: claims and acknowledgements run outside the pool, on
one connection each, and a lost one is replaced on the next call; claims commit
asynchronously, acknowledgements synchronously."""

from __future__ import annotations

import asyncio

import asyncpg
import trio

from spectral.db import Ack, Handled, Settlement, Store, _aio
from spectral.db.store import hop
from spectral.errors import DatabaseError


async def _admin(db_url: str, sql: str) -> list[asyncpg.Record]:
    """One query on a connection of the test's own (in a thread: no loop is needed)."""
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db_url)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(run()))


CLAIMER_PIDS = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'spectral-claimer' ORDER BY pid")


async def test_claims_and_acknowledgements_reuse_one_connection_each(store: Store, db_url: str) -> None:
    gen = (await store.allocate_generation("test", None, None))["generation"]
    for _ in range(6):
        await store.publish("a.b", "{}")
    pids: set[tuple[int, ...]] = set()
    for _ in range(3):
        rows = await store.claim(gen, 2, "w1", 60)
        settled = await store.settle(Settlement(
            ledger=[Handled("h", r.id) for r in rows], ack=[Ack(r.id, r.token) for r in rows]))
        assert settled.acked == {r.id for r in rows}
        pids.add(tuple(r["pid"] for r in await _admin(db_url, CLAIMER_PIDS)))
    [seen] = pids  # the same two sessions after every batch
    assert len(seen) == 2


async def test_a_terminated_claim_connection_is_replaced(store: Store, db_url: str) -> None:
    gen = (await store.allocate_generation("test", None, None))["generation"]
    first = await store.publish("a.b", "{}")
    assert [r.id for r in await store.claim(gen, 1, "w1", 60)] == [first]
    [before] = await _admin(db_url, CLAIMER_PIDS)
    await _admin(db_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'spectral-claimer' AND datname = current_database()")
    second = await store.publish("a.b", "{}")
    try:
        rows = await store.claim(gen, 1, "w1", 60)
    except DatabaseError:  # seen before the loop read the termination: the claimer retries
        rows = await store.claim(gen, 1, "w1", 60)
    assert [r.id for r in rows] == [second]
    [after] = await _admin(db_url, CLAIMER_PIDS)
    assert after["pid"] != before["pid"]


async def test_the_claimer_connections_close_with_the_database(db_url: str) -> None:
    from spectral.db import open_database

    async with open_database(db_url) as store:
        gen = (await store.allocate_generation("test", None, None))["generation"]
        await store.claim(gen, 1, "w1", 60)
        assert len(await _admin(db_url, CLAIMER_PIDS)) == 1
    assert await _admin(db_url, CLAIMER_PIDS) == []


async def _setting_on(session: _aio.Session, name: str) -> str:
    async def show() -> str:
        assert session.conn is not None
        return str(await session.conn.fetchval(f"SHOW {name}"))

    return await hop(show)


async def test_claims_commit_asynchronously_and_acknowledgements_synchronously(store: Store) -> None:
    gen = (await store.allocate_generation("test", None, None))["generation"]
    await store.publish("a.b", "{}")
    rows = await store.claim(gen, 1, "w1", 60)
    await store.settle(Settlement(ack=[Ack(r.id, r.token) for r in rows]))
    assert await _setting_on(store._claims, "synchronous_commit") == "off"
    assert await _setting_on(store._settles, "synchronous_commit") == "on"


async def test_behind_a_pooler_the_claim_session_sends_no_setting(store: Store, db_url: str) -> None:
    # A pooler refuses startup parameters it does not know: none but application_name
    # is sent, and the claim commits as the server's default says.
    gen = (await store.allocate_generation("test", None, None))["generation"]
    await store.publish("a.b", "{}")
    session = _aio.Session(db_url, "session", _aio.CLAIM_SETTINGS)
    try:
        rows = await hop(_aio.claim, session, gen, 1, "w1", 60.0)
        assert len(rows) == 1
        assert await _setting_on(session, "synchronous_commit") == "on"
    finally:
        await hop(_aio.close_sessions, (session,), 5.0)
