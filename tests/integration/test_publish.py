"""Publishing inside the producer's own transaction, from Python and from SQL.

Bad input is refused with a typed, one-line error and writes nothing, whichever way it
comes in: ``spectral.publish`` (asyncio), ``spectral.publish_trio`` or ``core.publish``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest
import trio
import trio_asyncio

import spectral
from spectral.db import asyncio_loop
from spectral.db._errors import translate
from spectral.errors import (
    ConfigurationError,
    InvalidEventError,
    InvalidPayloadError,
    InvalidTopicError,
    NoGenerationError,
    PayloadTooLargeError,
)

CHANNEL = "spectral_outbox_v1"
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _no_generation_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SPECTRAL_GENERATION", raising=False)
    yield


def with_conn(url: str, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``body(conn)`` on a fresh asyncpg connection under asyncio (a producer's view)."""

    async def main() -> T:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await body(conn)
        finally:
            await conn.close()

    return asyncio.run(main())


def allocate(url: str, count: int = 1) -> list[int]:
    async def body(conn: asyncpg.Connection) -> list[int]:
        rows = await conn.fetch(
            "INSERT INTO core.deployments (reference)"
            " SELECT 'test-' || i FROM generate_series(1, $1) AS i RETURNING generation",
            count,
        )
        return [r["generation"] for r in rows]

    return with_conn(url, body)


def outbox(url: str) -> list[dict[str, Any]]:
    async def body(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        rows = await conn.fetch(
            "SELECT id, generation, topic, payload::text AS payload, status, attempts,"
            " available_at, claim_token, available_at <= now() AS due"
            " FROM core.outbox ORDER BY id"
        )
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]

    return with_conn(url, body)


def one_line(exc: BaseException) -> str:
    """The error's message, checked to be one line (PostgreSQL's own message for a
    server error: asyncpg's ``str()`` appends the HINT on a line of its own)."""
    message = exc.message if isinstance(exc, asyncpg.PostgresError) else str(exc)
    assert message, type(exc).__name__
    assert "\n" not in message and "\r" not in message, message
    return message


# --- from Python (asyncio), in the caller's transaction ---------------------------------


def test_a_committed_publish_writes_one_pending_row_with_the_callers_writes(db_url: str) -> None:
    [generation] = allocate(db_url)

    async def body(conn: asyncpg.Connection) -> int:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        async with conn.transaction():
            await conn.execute("INSERT INTO orders VALUES (42)")
            return await spectral.publish(conn, "orders.created", {"order_id": 42, "ok": True})

    event_id = with_conn(db_url, body)
    [row] = outbox(db_url)
    assert row["id"] == event_id
    assert row["generation"] == generation
    assert row["topic"] == "orders.created"
    assert row["payload"] == {"order_id": 42, "ok": True}
    assert (row["status"], row["attempts"], row["claim_token"], row["due"]) == (
        "PENDING", 0, None, True,
    )


def test_a_rolled_back_publish_leaves_no_row_and_neither_do_the_callers_writes(db_url: str) -> None:
    allocate(db_url)

    class Boom(Exception):
        pass

    async def body(conn: asyncpg.Connection) -> int:
        await conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        with pytest.raises(Boom):
            async with conn.transaction():
                await conn.execute("INSERT INTO orders VALUES (42)")
                await spectral.publish(conn, "orders.created", {"order_id": 42})
                raise Boom
        return int(await conn.fetchval("SELECT count(*) FROM orders"))

    assert with_conn(db_url, body) == 0
    assert outbox(db_url) == []


def test_only_a_commit_notifies_and_the_notification_carries_the_generation(db_url: str) -> None:
    rolled_back_gen, committed_gen = allocate(db_url, 2)

    async def main() -> tuple[list[str], list[str]]:
        producer = await asyncpg.connect(db_url, timeout=10)
        listener = await asyncpg.connect(db_url, timeout=10)
        got: asyncio.Queue[str] = asyncio.Queue()
        try:
            await listener.add_listener(CHANNEL, lambda _c, _pid, _ch, payload: got.put_nowait(payload))
            tr = producer.transaction()
            await tr.start()
            await spectral.publish(producer, "orders.created", {"n": 1}, generation=rolled_back_gen)
            await tr.rollback()
            async with producer.transaction():
                await spectral.publish(producer, "orders.created", {"n": 2})
                await asyncio.sleep(0.1)
                before_commit = [got.get_nowait() for _ in range(got.qsize())]
            # Notifications arrive in commit order: a rolled-back one would come first.
            received = [await asyncio.wait_for(got.get(), 5)]
            await asyncio.sleep(0.05)
            received += [got.get_nowait() for _ in range(got.qsize())]
            return before_commit, received
        finally:
            await listener.close()
            await producer.close()

    before_commit, received = asyncio.run(main())
    assert before_commit == []
    assert received == [str(committed_gen)]
    assert [r["generation"] for r in outbox(db_url)] == [committed_gen]


async def test_publish_trio_joins_the_callers_transaction(db_url: str) -> None:
    [generation] = await trio.to_thread.run_sync(allocate, db_url)
    async with asyncio_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(db_url, timeout=10)
        try:
            tr = conn.transaction()
            await trio_asyncio.aio_as_trio(tr.start)()
            await spectral.publish_trio(conn, "orders.cancelled", {"n": 1})
            await trio_asyncio.aio_as_trio(tr.rollback)()

            tr = conn.transaction()
            await trio_asyncio.aio_as_trio(tr.start)()
            event_id = await spectral.publish_trio(conn, "orders.created", {"n": 2})
            await trio_asyncio.aio_as_trio(tr.commit)()

            with pytest.raises(InvalidTopicError):
                await spectral.publish_trio(conn, "orders..created", {"n": 3})
        finally:
            await trio_asyncio.aio_as_trio(conn.close)()
    rows = await trio.to_thread.run_sync(outbox, db_url)
    assert [(r["id"], r["generation"], r["topic"], r["payload"]) for r in rows] == [
        (event_id, generation, "orders.created", {"n": 2}),
    ]


def test_available_at_delays_the_event(db_url: str) -> None:
    allocate(db_url)
    later = datetime.now(UTC) + timedelta(hours=1)

    async def body(conn: asyncpg.Connection) -> int:
        return await spectral.publish(conn, "reminders.due", {}, available_at=later)

    with_conn(db_url, body)
    [row] = outbox(db_url)
    assert row["available_at"] == later
    assert row["due"] is False


# --- generation stamping ----------------------------------------------------------------


def test_generation_stamping_explicit_then_SPECTRAL_GENERATION_then_newest(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, newest = allocate(db_url, 3)

    async def body(conn: asyncpg.Connection) -> list[int]:
        ids = [await spectral.publish(conn, "orders.created", {})]
        ids.append(await spectral.publish(conn, "orders.created", {}, generation=first))
        monkeypatch.setenv("SPECTRAL_GENERATION", str(second))
        ids.append(await spectral.publish(conn, "orders.created", {}))
        ids.append(await spectral.publish(conn, "orders.created", {}, generation=first))
        monkeypatch.setenv("SPECTRAL_GENERATION", " ")
        ids.append(await spectral.publish(conn, "orders.created", {}))
        return ids

    ids = with_conn(db_url, body)
    assert [(r["id"], r["generation"]) for r in outbox(db_url)] == list(
        zip(ids, [newest, first, second, first, newest], strict=True)
    )


def test_a_malformed_SPECTRAL_GENERATION_is_a_configuration_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocate(db_url)
    monkeypatch.setenv("SPECTRAL_GENERATION", "latest")

    async def body(conn: asyncpg.Connection) -> None:
        await spectral.publish(conn, "orders.created", {})

    with pytest.raises(ConfigurationError) as info:
        with_conn(db_url, body)
    assert one_line(info.value).startswith("SPECTRAL_GENERATION: ")
    assert outbox(db_url) == []


def test_without_any_deployment_publish_raises_NoGenerationError(db_url: str) -> None:
    async def body(conn: asyncpg.Connection) -> list[BaseException]:
        raised: list[BaseException] = []
        try:
            await spectral.publish(conn, "orders.created", {})
        except NoGenerationError as exc:
            raised.append(exc)
        # The same from SQL, translated for Python producers.
        try:
            await conn.fetchval("SELECT core.publish('orders.created', '{}')")
        except asyncpg.PostgresError as exc:
            raised.append(exc)
        return raised

    from_python, from_sql = with_conn(db_url, body)
    assert isinstance(from_python, NoGenerationError)
    assert "no deployment generation in service" in one_line(from_python)
    assert from_python.__cause__ is None and from_python.__suppress_context__
    assert isinstance(from_sql, asyncpg.PostgresError)
    one_line(from_sql)
    assert isinstance(translate(from_sql), NoGenerationError)
    assert outbox(db_url) == []


# --- bad input from Python --------------------------------------------------------------

BAD_PYTHON_INPUT: list[tuple[str, Any, Any, type[InvalidEventError]]] = [
    ("topic-empty", "", {"x": 1}, InvalidTopicError),
    ("topic-129-chars", "a" * 129, {"x": 1}, InvalidTopicError),
    ("topic-space", "orders created", {"x": 1}, InvalidTopicError),
    ("topic-leading-dot", ".orders", {"x": 1}, InvalidTopicError),
    ("topic-trailing-dot", "orders.", {"x": 1}, InvalidTopicError),
    ("topic-double-dot", "orders..created", {"x": 1}, InvalidTopicError),
    ("topic-trailing-newline", "orders.created\n", {"x": 1}, InvalidTopicError),
    ("topic-not-a-string", 42, {"x": 1}, InvalidTopicError),
    ("topic-none", None, {"x": 1}, InvalidTopicError),
    ("payload-list", "orders.created", [1, 2], InvalidPayloadError),
    ("payload-string", "orders.created", "text", InvalidPayloadError),
    ("payload-number", "orders.created", 7, InvalidPayloadError),
    ("payload-null", "orders.created", None, InvalidPayloadError),
    ("payload-set", "orders.created", {"s": {1, 2}}, InvalidPayloadError),
    ("payload-nan", "orders.created", {"x": float("nan")}, InvalidPayloadError),
    ("payload-over-cap", "orders.created", {"x": "a" * 262_144}, PayloadTooLargeError),
]


def test_bad_input_raises_a_typed_one_line_error_and_writes_nothing(db_url: str) -> None:
    allocate(db_url)

    async def body(conn: asyncpg.Connection) -> dict[str, BaseException]:
        raised: dict[str, BaseException] = {}
        await conn.execute("CREATE TABLE mine (case_name text)")
        for name, topic, payload, _ in BAD_PYTHON_INPUT:
            async with conn.transaction():
                try:
                    await spectral.publish(conn, topic, payload)
                except Exception as exc:  # checked below, per case
                    raised[name] = exc
                # Refused before any I/O: the caller's transaction is intact and commits.
                await conn.execute("INSERT INTO mine VALUES ($1)", name)
        assert await conn.fetchval("SELECT count(*) FROM mine") == len(BAD_PYTHON_INPUT)
        return raised

    raised = with_conn(db_url, body)
    for name, _, _, error in BAD_PYTHON_INPUT:
        assert type(raised.get(name)) is error, name
        one_line(raised[name])
    assert outbox(db_url) == []


async def test_bad_input_through_publish_trio_is_refused_too(db_url: str) -> None:
    await trio.to_thread.run_sync(allocate, db_url)
    raised: dict[str, BaseException] = {}
    async with asyncio_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(db_url, timeout=10)
        try:
            for name, topic, payload, _ in BAD_PYTHON_INPUT:
                try:
                    await spectral.publish_trio(conn, topic, payload)
                except Exception as exc:  # checked below, per case
                    raised[name] = exc
        finally:
            await trio_asyncio.aio_as_trio(conn.close)()
    for name, _, _, error in BAD_PYTHON_INPUT:
        assert type(raised.get(name)) is error, name
        one_line(raised[name])
    assert await trio.to_thread.run_sync(outbox, db_url) == []


def test_the_database_cap_is_authoritative_over_the_local_check(db_url: str) -> None:
    allocate(db_url)

    async def body(conn: asyncpg.Connection) -> None:
        await spectral.publish(
            conn, "orders.created", {"x": "a" * 300_000}, max_payload_bytes=10_000_000
        )

    with pytest.raises(PayloadTooLargeError) as info:
        with_conn(db_url, body)
    assert "the cap is 262144 bytes" in one_line(info.value)
    assert outbox(db_url) == []


def test_a_lowered_cap_is_enforced_by_publish_core_publish_and_the_table(db_url: str) -> None:
    allocate(db_url)
    big = {"x": "a" * 2000}
    errors: dict[str, BaseException] = {}

    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT core.set_max_payload_bytes(1000)")
        # A payload under the new cap still goes through.
        async with conn.transaction():
            await spectral.publish(conn, "orders.small", {"x": "a" * 900})
        try:
            await spectral.publish(conn, "orders.created", big)
        except PayloadTooLargeError as exc:
            errors["publish"] = exc
        try:
            await conn.fetchval("SELECT core.publish('orders.created', $1::jsonb)", json.dumps(big))
        except asyncpg.PostgresError as exc:
            errors["core.publish"] = exc
        try:
            await conn.execute(
                "INSERT INTO core.outbox (generation, topic, payload)"
                " VALUES (1, 'orders.created', $1::jsonb)",
                json.dumps(big),
            )
        except asyncpg.PostgresError as exc:
            errors["insert"] = exc

    with_conn(db_url, body)
    assert set(errors) == {"publish", "core.publish", "insert"}
    assert "the cap is 1000 bytes" in one_line(errors["publish"])
    sql_error = errors["core.publish"]
    assert isinstance(sql_error, asyncpg.PostgresError)
    assert sql_error.sqlstate == "22023"
    assert "the cap is 1000 bytes" in one_line(sql_error)
    insert_error = errors["insert"]
    assert isinstance(insert_error, asyncpg.CheckViolationError)
    translated = translate(insert_error)
    assert isinstance(translated, PayloadTooLargeError)
    assert one_line(translated).startswith("payload too large")
    assert [r["topic"] for r in outbox(db_url)] == ["orders.small"]


@pytest.mark.parametrize(("values", "error"), [
    pytest.param("(1, 'orders..created', '{}')", InvalidTopicError, id="topic"),
    pytest.param("(1, 'orders.created', '[1]')", InvalidPayloadError, id="payload"),
])
def test_direct_inserts_are_held_to_the_same_rules(
    db_url: str, values: str, error: type[InvalidEventError]
) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute(f"INSERT INTO core.outbox (generation, topic, payload) VALUES {values}")

    with pytest.raises(asyncpg.CheckViolationError) as info:
        with_conn(db_url, body)
    assert isinstance(translate(info.value), error)
    assert outbox(db_url) == []


# --- from SQL ---------------------------------------------------------------------------


BAD_SQL_INPUT: list[tuple[str, str | None, str | None, str, type[InvalidEventError]]] = [
    ("topic-empty", "", "{}", "invalid topic", InvalidTopicError),
    ("topic-129-chars", "a" * 129, "{}", "invalid topic", InvalidTopicError),
    ("topic-space", "orders created", "{}", "invalid topic", InvalidTopicError),
    ("topic-leading-dot", ".orders", "{}", "invalid topic", InvalidTopicError),
    ("topic-trailing-dot", "orders.", "{}", "invalid topic", InvalidTopicError),
    ("topic-double-dot", "orders..created", "{}", "invalid topic", InvalidTopicError),
    ("topic-newline", "orders\ncreated", "{}", "invalid topic", InvalidTopicError),
    ("topic-carriage-return", "orders\r\ncreated", "{}", "invalid topic", InvalidTopicError),
    ("topic-null", None, "{}", "invalid topic", InvalidTopicError),
    ("payload-array", "orders.created", "[1, 2]", "invalid payload", InvalidPayloadError),
    ("payload-string", "orders.created", '"text"', "invalid payload", InvalidPayloadError),
    ("payload-number", "orders.created", "3", "invalid payload", InvalidPayloadError),
    ("payload-json-null", "orders.created", "null", "invalid payload", InvalidPayloadError),
    ("payload-sql-null", "orders.created", None, "invalid payload", InvalidPayloadError),
    ("payload-over-cap", "orders.created", json.dumps({"x": "a" * 262_144}), "payload too large",
     PayloadTooLargeError),
]


def test_core_publish_refuses_bad_input_with_sqlstate_22023_in_one_line(db_url: str) -> None:
    allocate(db_url)

    async def body(conn: asyncpg.Connection) -> dict[str, BaseException]:
        raised: dict[str, BaseException] = {}
        for name, topic, payload, _, _ in BAD_SQL_INPUT:
            try:
                await conn.fetchval("SELECT core.publish($1::text, $2::jsonb)", topic, payload)
            except asyncpg.PostgresError as exc:
                raised[name] = exc
        return raised

    raised = with_conn(db_url, body)
    for name, _, _, prefix, error in BAD_SQL_INPUT:
        exc = raised.get(name)
        assert isinstance(exc, asyncpg.PostgresError), name
        assert exc.sqlstate == "22023", name
        assert one_line(exc).startswith(prefix), name
        # Python producers get the same refusal as a typed error.
        assert type(translate(exc)) is error, name
    assert outbox(db_url) == []


def test_core_publish_from_plain_sql_returns_the_id(db_url: str) -> None:
    [generation] = allocate(db_url)

    async def body(conn: asyncpg.Connection) -> Any:
        return await conn.fetchval(
            "SELECT core.publish('orders.created', '{\"order_id\": 7}')"
        )

    event_id = with_conn(db_url, body)
    assert isinstance(event_id, int)
    [row] = outbox(db_url)
    assert (row["id"], row["generation"], row["payload"], row["status"]) == (
        event_id, generation, {"order_id": 7}, "PENDING",
    )


def test_SET_spectral_generation_stamps_that_generation(db_url: str) -> None:
    allocate(db_url, 3)

    async def body(conn: asyncpg.Connection) -> list[int]:
        await conn.execute("SET spectral.generation = '2'")
        ids = [await conn.fetchval("SELECT core.publish('orders.created', '{}')")]
        async with conn.transaction():
            await conn.execute("SET LOCAL spectral.generation = '1'")
            ids.append(await conn.fetchval("SELECT core.publish('orders.created', '{}')"))
        ids.append(await conn.fetchval("SELECT core.publish('orders.created', '{}')"))
        await conn.execute("RESET spectral.generation")
        ids.append(await conn.fetchval("SELECT core.publish('orders.created', '{}')"))
        return ids

    ids = with_conn(db_url, body)
    assert [(r["id"], r["generation"]) for r in outbox(db_url)] == list(zip(ids, [2, 1, 2, 3], strict=True))
