"""The publish contract's optional parts from every producer: ordering keys, idempotent
publish (under 50 concurrent producers), and a stored trace context."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import trio

import spectral
from spectral.errors import InvalidKeyError, InvalidTraceparentError

from .test_publish import allocate, with_conn

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _rows(url: str) -> list[dict[str, Any]]:
    async def body(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        rows = await conn.fetch("SELECT id, topic, key, idempotency_key, traceparent"
                                " FROM core.outbox ORDER BY id")
        return [dict(r) for r in rows]

    return with_conn(url, body)


def test_publish_stores_the_key_idempotency_key_and_traceparent(db_url: str) -> None:
    allocate(db_url)

    async def body(conn: asyncpg.Connection) -> list[int]:
        async with conn.transaction():
            return [
                await spectral.publish(conn, "order.paid", {"n": 1}, key="order-42",
                                       idempotency_key="pay-1", traceparent=TRACEPARENT),
                await spectral.publish(conn, "order.paid", {"n": 2}),
            ]

    first, second = with_conn(db_url, body)
    rows = _rows(db_url)
    assert [(r["id"], r["key"], r["idempotency_key"], r["traceparent"]) for r in rows] == [
        (first, "order-42", "pay-1", TRACEPARENT), (second, None, None, None)]


def test_a_repeated_idempotency_key_returns_the_first_id_and_inserts_nothing(db_url: str) -> None:
    allocate(db_url)

    async def body(conn: asyncpg.Connection) -> list[int]:
        ids = [await spectral.publish(conn, "order.paid", {"n": i}, idempotency_key="pay-1")
               for i in range(3)]
        # Same key on another topic is another event; SQL producers get the same rule.
        ids.append(await spectral.publish(conn, "order.refunded", {}, idempotency_key="pay-1"))
        ids.append(await conn.fetchval(
            "SELECT core.publish('order.paid', '{}', idempotency_key => 'pay-1')"))
        return ids

    a, b, c, other, from_sql = with_conn(db_url, body)
    assert a == b == c == from_sql
    assert other != a
    assert [(r["topic"], r["idempotency_key"]) for r in _rows(db_url)] == [
        ("order.paid", "pay-1"), ("order.refunded", "pay-1")]


def test_a_rolled_back_first_publish_does_not_block_a_later_one(db_url: str) -> None:
    allocate(db_url)

    async def body(conn: asyncpg.Connection) -> tuple[int, int]:
        tr = conn.transaction()
        await tr.start()
        rolled = await spectral.publish(conn, "order.paid", {}, idempotency_key="pay-1")
        await tr.rollback()
        return rolled, await spectral.publish(conn, "order.paid", {}, idempotency_key="pay-1")

    rolled, kept = with_conn(db_url, body)
    assert [r["id"] for r in _rows(db_url)] == [kept]
    assert kept != rolled


def test_fifty_concurrent_producers_with_one_idempotency_key_create_one_event(db_url: str) -> None:
    allocate(db_url)

    async def main() -> list[int]:
        conns = [await asyncpg.connect(db_url) for _ in range(50)]
        start = asyncio.Event()

        async def producer(i: int, conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await start.wait()
                event_id = await spectral.publish(conn, "order.paid", {"producer": i},
                                                  idempotency_key="pay-42")
                await asyncio.sleep(0.001 * (i % 5))  # commit in a scattered order
                return event_id

        try:
            tasks = [asyncio.create_task(producer(i, c)) for i, c in enumerate(conns)]
            await asyncio.sleep(0.05)
            start.set()
            return list(await asyncio.gather(*tasks))
        finally:
            for c in conns:
                await c.close()

    ids = asyncio.run(main())
    rows = _rows(db_url)
    assert len(rows) == 1
    assert set(ids) == {rows[0]["id"]}


async def test_publish_trio_passes_the_key_and_idempotency_key_through(db_url: str) -> None:
    import trio_asyncio

    from spectral.db import asyncio_loop

    await trio.to_thread.run_sync(allocate, db_url)
    async with asyncio_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(db_url)
        try:
            event_id = await spectral.publish_trio(conn, "order.paid", {}, key="k-trio",
                                                   idempotency_key="i-trio")
            again = await spectral.publish_trio(conn, "order.paid", {}, idempotency_key="i-trio")
        finally:
            await trio_asyncio.aio_as_trio(conn.close)()
    assert event_id == again
    rows = await trio.to_thread.run_sync(_rows, db_url)
    assert [(r["key"], r["idempotency_key"]) for r in rows] == [("k-trio", "i-trio")]


def test_bad_keys_and_traceparents_are_refused_before_any_io(db_url: str) -> None:
    allocate(db_url)

    async def body(conn: asyncpg.Connection) -> list[str]:
        messages = []
        for kwargs, error in (
            ({"key": ""}, InvalidKeyError), ({"key": "a\x00b"}, InvalidKeyError),
            ({"idempotency_key": "x" * 300}, InvalidKeyError), ({"key": 42}, InvalidKeyError),
            ({"traceparent": "nope"}, InvalidTraceparentError),
        ):
            with pytest.raises(error) as info:
                await spectral.publish(conn, "order.paid", {}, **kwargs)
            messages.append(str(info.value))
        with pytest.raises(asyncpg.PostgresError, match="invalid traceparent"):
            await conn.fetchval("SELECT core.publish('a.b', '{}', traceparent => 'zz')")
        return messages

    messages = with_conn(db_url, body)
    assert all("\n" not in m for m in messages)
    assert "idempotency key" in messages[2]
    assert _rows(db_url) == []


async def test_an_actor_publishes_with_a_key(db_url: str) -> None:
    from spectral.actors.user import ActorContext
    from spectral.db import open_database

    await trio.to_thread.run_sync(allocate, db_url)
    async with open_database(db_url, pool_size=1) as store:
        ctx = ActorContext("a", "w", 1, trio.Event(), store, 1000)
        first = await ctx.publish("order.paid", {}, key="k-actor", idempotency_key="once")
        again = await ctx.publish("order.paid", {}, key="k-actor", idempotency_key="once")
    assert first == again
    rows = await trio.to_thread.run_sync(_rows, db_url)
    assert [(r["key"], r["idempotency_key"]) for r in rows] == [("k-actor", "once")]
