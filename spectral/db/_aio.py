"""The asyncio side of the seam: each function is one unit of database work.

Every function here is an asyncio coroutine that the trio side calls exactly once through
the bridge (one hop per unit of work, see STACK.md). Cleanup that must happen — returning
a connection to the pool, rolling back — happens inside the same coroutine, where asyncio
runs it even when the trio caller is cancelled. Driver errors leave translated.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal

import asyncpg

from ..rules import NO_EXTRAS, PublishExtras
from ._errors import translated
from ._queries import DEPLOYMENTS, OBSERVE, OUTBOX, PRUNE, PUBLISH, RECONCILE, WORKERS

Record = Any  # asyncpg.Record; the trio side copies what it needs into its own types

log = logging.getLogger("spectral.db")

#: Seconds a cleanup (commit, rollback, release, close) may take before it is abandoned.
CLEANUP_TIMEOUT = 5.0

#: Server-side bounds for every pooled session: a stuck statement or an abandoned
#: transaction cannot hold locks forever.
SESSION_SETTINGS = {
    "application_name": "spectral",
    "idle_in_transaction_session_timeout": "600000",
}


#: Set while a unit runs only Spectral's own statements: they leave no session state
#: behind (no SET, LISTEN, cursor or advisory lock), so the pool may skip its reset query.
_OWN_STATEMENTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "spectral_own_statements", default=False
)


@contextmanager
def _own_statements() -> Iterator[None]:
    """Mark the connections this block releases as running Spectral's statements only."""
    token = _OWN_STATEMENTS.set(True)
    try:
        yield
    finally:
        _OWN_STATEMENTS.reset(token)


async def _reset(conn: asyncpg.Connection) -> None:
    # asyncpg has already rolled back and dropped listeners; this is the rest of its
    # default reset, one round trip, needed after user SQL (handlers, actors) only.
    if not _OWN_STATEMENTS.get():
        await conn.execute(conn.get_reset_query())


#: What asyncpg's TCP connection set-up leaves in a future nobody awaits when the connect
#: (or the CancelRequest connection of a cancelled query) is cancelled at the wrong moment.
_ORPHANED_CONNECT_ERROR = "unexpected connection_lost() call"


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The trio-asyncio loop's exception handler: drop one known orphan, log reports that
    carry no exception, defer the rest.

    trio-asyncio's default handler raises every report into the loop's nursery, which
    stops the loop and everything running in it.

    - asyncpg's SSL negotiation (sslmode=prefer, the default over TCP) sets
      ``ConnectionError('unexpected connection_lost() call')`` on a future of its own
      when the connect it belongs to was cancelled while the transport was being opened;
      that connect already ended with the cancellation, so the error is noise.
    - A report with a message and no exception is a warning about something the library
      has dealt with: asyncpg's "Resetting connection with an active transaction" when a
      connection comes back to the pool inside a transaction (a turn cut off during its
      BEGIN), which it rolls back before the connection is reused. It is logged, as plain
      asyncio does; stopping the worker for it would cut every other turn short.
    """
    exc = context.get("exception")
    if isinstance(exc, ConnectionError) and str(exc) == _ORPHANED_CONNECT_ERROR:
        return
    if exc is None and context.get("message"):
        log.warning("asyncio: %s", context["message"])
        return
    loop.default_exception_handler(context)


async def _no_reset(conn: asyncpg.Connection) -> None:
    # Behind a transaction pooler the next statement may reach another server session:
    # there is no session of ours to reset (and RESET ALL would reach someone else's).
    return None


def connect_options(
    pooler: str, application_name: str, settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    """asyncpg connect arguments for ``pooler`` ('none', 'session' or 'transaction'),
    with the session ``settings`` of one kind of connection.

    Poolers refuse startup parameters they do not know, so behind one only
    ``application_name`` is sent (the idle-in-transaction bound is then set per turn
    transaction, see :data:`POOLED_IDLE_TIMEOUT`; ``settings`` are left out). Behind a
    transaction pooler the statement cache is off: a prepared statement lives in one
    server session, and the next transaction may run in another.
    """
    options: dict[str, Any] = {"server_settings": {"application_name": application_name}}
    if pooler == "none" and application_name == "spectral":
        options["server_settings"] = SESSION_SETTINGS
    if pooler == "none" and settings:
        options["server_settings"] = {**options["server_settings"], **settings}
    if pooler == "transaction":
        options["statement_cache_size"] = 0
    return options


#: The claims' session commits without waiting for its WAL to reach the disk: about half
#: of an idle claim's round trip on a server that syncs its WAL. A claim lost to a server
#: crash is the same as a worker crash before it: the row is PENDING again, the turns'
#: own commits (synchronous) flush the claim with them, and every later change to the row
#: is fenced by a claim token that no longer matches (docs/explanation/architecture.md).
CLAIM_SETTINGS = {"synchronous_commit": "off"}

#: Behind a pooler: the idle-in-transaction bound (ms) each turn transaction sets locally.
POOLED_IDLE_TIMEOUT = SESSION_SETTINGS["idle_in_transaction_session_timeout"]


@translated
async def create_pool(url: str, min_size: int, max_size: int, pooler: str = "none") -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, timeout=10,
        max_inactive_connection_lifetime=300,
        reset=_no_reset if pooler == "transaction" else _reset,
        **connect_options(pooler, "spectral"),
    )


async def close_pool(pool: asyncpg.Pool, seconds: float) -> None:
    try:
        await asyncio.wait_for(pool.close(), seconds)
    except Exception:
        pool.terminate()


@translated
async def connect(url: str, application_name: str, pooler: str = "none") -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10, **connect_options(pooler, application_name))


@translated
async def begin_and_fetchval(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> Any:
    """Open a transaction left open on ``conn`` (closing the connection ends it) and run
    ``sql`` in it: a transaction-scoped lock held this way survives a transaction pooler."""
    await conn.transaction().start()
    return await conn.fetchval(sql, *args)


async def close_connection(conn: asyncpg.Connection, seconds: float) -> None:
    try:
        await asyncio.wait_for(conn.close(), seconds)
    except Exception:
        conn.terminate()


# --- generic one-shot queries (admin, CLI, inspection) -------------------------------


@translated
async def fetch(pool: asyncpg.Pool, sql: str, args: Sequence[Any]) -> list[Record]:
    return list(await pool.fetch(sql, *args))


@translated
async def fetchval(pool: asyncpg.Pool, sql: str, args: Sequence[Any]) -> Any:
    return await pool.fetchval(sql, *args)


@translated
async def execute(pool: asyncpg.Pool, sql: str, args: Sequence[Any]) -> str:
    return str(await pool.execute(sql, *args))


# --- workers ---------------------------------------------------------------------------


class Session:
    """A connection of its own for one stream of Spectral's statements (the claims, the
    acknowledgements), opened on first use and reopened after any failure.

    Borrowing a pooled connection costs more CPU than a claim of 50 rows (asyncpg's
    acquire and release are several asyncio tasks and callbacks, each a round through
    the bridged loop); these statements run back to back all day, so each stream keeps
    one connection. Outside the pool, so a small pool cannot be starved by them.
    """

    def __init__(self, url: str, pooler: str, settings: dict[str, str] | None = None) -> None:
        self.url = url
        self.pooler = pooler
        # Session settings sent at connect (not behind a pooler: see connect_options).
        self.settings = settings or {}
        self.conn: asyncpg.Connection | None = None
        # One statement at a time (a connection runs one); uncontended in a worker,
        # where one task claims and one acknowledges.
        self.lock = asyncio.Lock()


async def _session_fetch(session: Session, sql: str, args: Sequence[Any]) -> list[Record]:
    async with session.lock:
        conn = session.conn
        if conn is None or conn.is_closed():
            conn = session.conn = await asyncpg.connect(
                session.url, timeout=10,
                **connect_options(session.pooler, "spectral-claimer", session.settings))
        try:
            return list(await conn.fetch(sql, *args))
        except BaseException:
            # Broken, or left mid-statement by a cancellation: never reuse it.
            session.conn = None
            conn.terminate()
            raise


async def close_sessions(sessions: Sequence[Session], seconds: float) -> None:
    """Close each session's connection within ``seconds`` (never raises)."""
    for session in sessions:
        conn, session.conn = session.conn, None
        if conn is None:
            continue
        if session.lock.locked():
            conn.terminate()  # a statement is in flight: do not wait for it
        else:
            await close_connection(conn, seconds)


@translated
async def claim(
    session: Session, generation: int, limit: int, worker_id: str, ttl: float
) -> list[Record]:
    return await _session_fetch(session, OUTBOX.claim, (generation, limit, worker_id, ttl))


@translated
async def settle(session: Session, args: Sequence[Any]) -> tuple[set[int], set[int], set[int]]:
    """Record a batch of turn outcomes in one statement; returns the ids that matched."""
    changed: dict[str, set[int]] = {"a": set(), "f": set(), "r": set()}
    for kind, event_id in await _session_fetch(session, OUTBOX.settle, args):
        changed[kind].add(event_id)
    return changed["a"], changed["f"], changed["r"]


@translated
async def reap(pool: asyncpg.Pool, limit: int) -> list[Record]:
    return list(await pool.fetch(OUTBOX.reap, limit))


@translated
async def register_worker(conn: asyncpg.Connection, args: Sequence[Any]) -> None:
    await conn.execute(WORKERS.register_worker, *args)


@translated
async def beat(conn: asyncpg.Connection, worker_id: str, state: str) -> str | None:
    value = await conn.fetchval(WORKERS.beat, worker_id, state)
    return None if value is None else str(value)


@translated
async def mark_exited(conn: asyncpg.Connection, worker_id: str) -> None:
    await conn.execute(WORKERS.mark_exited, worker_id)


# --- a handler's transaction -----------------------------------------------------------


class TurnOutcome(enum.Enum):
    """What ``turn_begin`` returns instead of a connection when the turn cannot begin."""

    ALREADY_HANDLED = "already-handled"
    CLAIM_LOST = "claim-lost"


#: How a handler's statement runs (the method of the connection it maps to).
QueryMode = Literal["execute", "executemany", "fetch", "fetchrow", "fetchval"]


async def _run(conn: asyncpg.Connection, mode: QueryMode, sql: str, args: Sequence[Any]) -> Any:
    if mode == "execute":
        return await conn.execute(sql, *args)
    if mode == "fetch":
        return list(await conn.fetch(sql, *args))
    if mode == "fetchrow":
        return await conn.fetchrow(sql, *args)
    if mode == "fetchval":
        return await conn.fetchval(sql, *args)
    if mode == "executemany":
        return await conn.executemany(sql, args)
    raise ValueError(f"unknown query mode {mode!r}")


@translated
async def turn_begin(
    pool: asyncpg.Pool,
    event_id: int | None,
    token: Any,
    handler: str,
    mode: QueryMode,
    sql: str,
    args: Sequence[Any],
    local: tuple[str, str] | None = None,
) -> tuple[Any, Any, Any]:
    """Open a handler's transaction and run its first statement, in one hop.

    ``local`` is (idle-in-transaction ms, handler role), '' for none: set with SET LOCAL
    semantics after Spectral's own statements, before the handler's (see
    ``OUTBOX.turn_local``); None sends nothing.

    Returns ``(connection, transaction, result)``, or ``(None, None, outcome)`` with a
    :class:`TurnOutcome` when the claim was lost or the ledger already has the handler.
    On any error the transaction is rolled back and the connection returned.
    """
    conn = await pool.acquire()
    tr = conn.transaction()
    try:
        await tr.start()
        if event_id is None:
            # A plain transaction (a reconcile sweep): no claim to check, no ledger row.
            if local is not None:
                await conn.execute(OUTBOX.turn_local, *local)
            return conn, tr, await _run(conn, mode, sql, args)
        if await conn.fetchval(OUTBOX.turn_begin, event_id, token) is None:
            refused = TurnOutcome.CLAIM_LOST
        elif await conn.fetchval(OUTBOX.turn_ledger, handler, event_id) is None:
            refused = TurnOutcome.ALREADY_HANDLED
        else:
            if local is not None:
                await conn.execute(OUTBOX.turn_local, *local)
            return conn, tr, await _run(conn, mode, sql, args)
    except BaseException:
        await _abandon(pool, conn, tr)
        raise
    # Released here, outside the try: a failure while returning the connection must not
    # lead _abandon to release it a second time.
    await _abandon(pool, conn, tr)
    return None, None, refused


@translated
async def turn_query(conn: asyncpg.Connection, mode: QueryMode, sql: str, args: Sequence[Any]) -> Any:
    """One statement inside an open handler transaction (a failing one aborts it)."""
    return await _run(conn, mode, sql, args)


# The cleanups below bound their own time, here on the asyncio side, and are called from
# trio shielded and without a deadline: a trio deadline would cancel the asyncio task, and
# a task cancelled before its first step never runs at all, which would leave the
# transaction open (its row locks held until the server's idle timeout) and the
# connection out of the pool for good.

@translated
async def turn_commit(
    pool: asyncpg.Pool, conn: asyncpg.Connection, tr: Any, seconds: float = CLEANUP_TIMEOUT,
) -> None:
    """Commit within ``seconds`` and return the connection; on any failure (running out
    of time raises TimeoutError) the transaction is abandoned and the error raised."""
    try:
        async with asyncio.timeout(seconds):
            await tr.commit()
    except BaseException:
        await _abandon(pool, conn, tr, seconds)
        raise
    await pool.release(conn, timeout=seconds)


async def turn_rollback(
    pool: asyncpg.Pool, conn: asyncpg.Connection, tr: Any, seconds: float = CLEANUP_TIMEOUT,
) -> None:
    await _abandon(pool, conn, tr, seconds)


async def _abandon(
    pool: asyncpg.Pool, conn: asyncpg.Connection, tr: Any, seconds: float = CLEANUP_TIMEOUT,
) -> None:
    """Roll back and return the connection, each within ``seconds``; a broken or slow
    connection is discarded instead.

    It never raises: the turn's outcome is already decided, and a rollback that fails
    leaves the server to abort the transaction when the connection goes.
    """
    try:
        if not conn.is_closed() and conn.is_in_transaction():
            async with asyncio.timeout(seconds):
                await tr.rollback()
    except BaseException:
        conn.terminate()  # broken or slow mid-rollback: the server aborts the transaction
    try:
        await pool.release(conn, timeout=seconds)
    except BaseException:
        # The pool has taken the connection back already (it discards a broken one
        # itself); terminating it now would only raise "released back to the pool".
        pass


# --- publishing and the listener -------------------------------------------------------


@translated
async def publish(
    conn: Any, topic: str, payload: str, available_at: datetime | None, generation: int | None,
    extras: PublishExtras = NO_EXTRAS,
) -> int:
    return int(await conn.fetchval(
        PUBLISH.publish, topic, payload, available_at, generation, extras.key,
        extras.idempotency_key, extras.traceparent,
    ))


@translated
async def listen(
    url: str,
    channel: str,
    on_notify: Callable[[str], None],
    on_terminate: Callable[[], None],
    pooler: str = "none",
) -> asyncpg.Connection:
    """Open a dedicated connection and LISTEN on ``channel``.

    The callbacks run on the event loop's thread (the trio thread under trio-asyncio); they
    must not raise.
    """
    conn = await asyncpg.connect(url, timeout=10, **connect_options(pooler, "spectral-listener"))
    try:
        conn.add_termination_listener(lambda _conn: on_terminate())
        await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_notify(payload))
    except BaseException:
        conn.terminate()
        raise
    return conn


@translated
async def ping(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT 1")


@translated
async def newest_generation(pool: asyncpg.Pool) -> int | None:
    value = await pool.fetchval(DEPLOYMENTS.newest_generation)
    return None if value is None else int(value)


# --- the reconciler --------------------------------------------------------------------


@translated
async def begin_reconcile_pass(
    pool: asyncpg.Pool, worker_id: str, generation: int, min_gap: float
) -> tuple[int, datetime] | None:
    """Start a pass if no worker started one within ``min_gap`` seconds (one transaction)."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(RECONCILE.try_lock):
            return None
        row = await conn.fetchrow(RECONCILE.begin_pass, worker_id, generation, min_gap)
        return None if row is None else (int(row["id"]), row["started_at"])


@translated
async def retire_generations(
    pool: asyncpg.Pool, grace: float, stale: float, policy: str
) -> tuple[list[int], int | None, dict[int, list[int]]]:
    """Retire dead generations and hand their PENDING rows over by ``policy``.

    Returns (generations retired now, the adopting generation, {from generation: ids}).
    """
    async with pool.acquire() as conn, conn.transaction():
        newest = await conn.fetchval(RECONCILE.newest_live_generation, stale)
        if newest is None:
            return [], None, {}
        retired = [r[0] for r in await conn.fetch(
            RECONCILE.retire_generations, grace, stale, newest, policy)]
        # Each retired generation keeps the policy it was retired with.
        moved: dict[int, list[int]] = {}
        for kind, sql, args in (("adopt", RECONCILE.adopt_retired, (newest,)),
                                ("dead", RECONCILE.dead_retired, ())):
            by_source: dict[int, list[int]] = {}
            for r in await conn.fetch(sql, *args):
                by_source.setdefault(int(r["from_generation"]), []).append(int(r["id"]))
            for source, ids in by_source.items():
                await conn.execute(RECONCILE.record_handover, source,
                                   newest if kind == "adopt" else None, kind, len(ids))
                moved.setdefault(source, []).extend(ids)
        return retired, int(newest), moved


# --- observation -----------------------------------------------------------------------


@translated
async def snapshot(
    pool: asyncpg.Pool, stale_after: float, dead_cap: int, blocked_shown: int
) -> dict[str, Any]:
    """Every query of the queue snapshot on one connection, in one hop."""
    with _own_statements():
        async with pool.acquire() as conn:
            return {
                "outbox": list(await conn.fetch(OBSERVE.live_counts, dead_cap)),
                "workers": list(await conn.fetch(OBSERVE.workers_by_generation, stale_after)),
                "deployments": list(await conn.fetch(DEPLOYMENTS.latest_deployments, 5)),
                "schema_version": await conn.fetchval(OBSERVE.schema_version),
                "last_reconcile_pass": await conn.fetchrow(RECONCILE.last_pass),
                "last_prune_pass": await conn.fetchrow(PRUNE.last_pass),
                "tables": list(await conn.fetch(OBSERVE.table_health)),
                "horizon": await conn.fetchrow(OBSERVE.xmin_horizon),
                "blocked_keys": list(await conn.fetch(OUTBOX.blocked_keys, blocked_shown)),
                "blocked_key_count": await conn.fetchval(OUTBOX.blocked_key_count),
                "oldest_due": list(await conn.fetch(OUTBOX.oldest_due)),
            }


# --- the pruner ------------------------------------------------------------------------


@translated
async def begin_prune_pass(
    pool: asyncpg.Pool, worker_id: str, min_gap: float, lease: float
) -> int | None:
    """Start a prune pass if none runs and none started within ``min_gap`` seconds."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(PRUNE.try_lock):
            return None
        value = await conn.fetchval(PRUNE.begin_pass, worker_id, min_gap, lease)
        return None if value is None else int(value)


@translated
async def prune_batch(pool: asyncpg.Pool, sql: str, retention: float, limit: int) -> tuple[int, int]:
    """One bounded delete; returns (rows deleted, ledger rows deleted with them)."""
    with _own_statements():
        if sql in (PRUNE.done, PRUNE.dead):
            row = await pool.fetchrow(sql, retention, limit)
            return int(row["rows"]), int(row["ledger"])
        return len(await pool.fetch(sql, retention, limit)), 0


@translated
async def conn_fetchval(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> Any:
    return await conn.fetchval(sql, *args)


# --- the staging gate ----------------------------------------------------------------


@translated
async def read_only_fetch(url: str, sql: str, args: Sequence[Any]) -> list[Record]:
    """One query on a read-only session of another database (the staging gate's)."""
    conn = await asyncpg.connect(url, timeout=10, server_settings={
        "application_name": "spectral-staging-gate", "default_transaction_read_only": "on"})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await close_connection(conn, 5)
