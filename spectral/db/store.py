"""The trio side of the seam: typed, trio-flavoured database operations.

Nothing outside ``spectral.db`` sees asyncpg objects or calls across the bridge. Each
method is one hop to one coroutine of :mod:`spectral.db._aio`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, ParamSpec, TypeVar

import trio
import trio_asyncio

from ..errors import AlreadyHandledError, ClaimLostError, DatabaseError, SpectralError
from ..rules import NO_EXTRAS, PublishExtras
from . import _aio
from ._aio import QueryMode
from ._queries import (
    DASHBOARD,
    DEPLOYMENTS,
    OBSERVE,
    OUTBOX,
    PRUNE,
    PUBLISH,
    RECONCILE,
    SWITCHES,
    TESTING,
    WORKERS,
)
from .rows import (
    Deployment,
    LiveCount,
    NewDeployment,
    PruneKind,
    PrunePass,
    ReconcilePass,
    Worker,
)

P = ParamSpec("P")
T = TypeVar("T")

#: DEAD rows counted exactly by the queue views; beyond, the count says "at least".
DEAD_COUNT_CAP = 10_000

CLEANUP_TIMEOUT = _aio.CLEANUP_TIMEOUT


async def hop(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one asyncio coroutine function from trio: one bridge crossing."""
    return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)  # type: ignore[no-any-return]


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Enter the process's trio-asyncio loop, or reuse the one already running.

    Error handling: trio-asyncio runs the body inside its own nurseries, which wrap any
    exception in nested exception groups. A group holding one exception is unwrapped, so
    ``except DatabaseUnavailableError`` around :func:`spectral.open_database` works
    (``except*`` handlers match the bare exception as well). A loop opened here ignores
    the one asyncio error a cancelled connect leaves behind (``_aio.loop_exception_handler``).
    """
    if trio_asyncio.current_loop.get(None) is None:
        try:
            async with trio_asyncio.open_loop() as loop:
                loop.set_exception_handler(_aio.loop_exception_handler)
                yield
        except BaseExceptionGroup as group:
            sole = sole_exception(group)
            if sole is None:
                raise
            raise sole from None
    else:
        yield


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner


class ClaimedRow(NamedTuple):
    """A row this worker claimed; ``token`` fences every later change to it.

    A named tuple, not a frozen dataclass: one is built per claimed row, and a tuple is
    built several times faster.
    """

    id: int
    topic: str
    payload: dict[str, Any]
    generation: int
    attempts: int
    created_at: datetime
    token: uuid.UUID
    wait_seconds: float
    handled: frozenset[str]
    key: str | None = None
    traceparent: str | None = None
    created_epoch: float | None = None  # created_at as epoch seconds (database clock)


class Ack(NamedTuple):
    """A turn that succeeded: the row becomes DONE."""

    id: int
    token: uuid.UUID


class Fail(NamedTuple):
    """A turn that failed: one attempt charged; PENDING after ``delay`` s, or DEAD."""

    id: int
    token: uuid.UUID
    delay: float  # seconds before the retry
    error: str  # stored as last_error
    dead: bool
    reason: str | None  # dead_reason when dead
    skip: bool = False  # when dead: the row's key moves on instead of waiting for it


class Release(NamedTuple):
    """A claim given back: PENDING now, charged an attempt or not."""

    id: int
    token: uuid.UUID
    charge: bool
    error: str | None  # None keeps the previous last_error


class Handled(NamedTuple):
    """A ledger row for a handler that succeeded without opening a transaction."""

    handler: str
    event_id: int


@dataclass
class Settlement:
    """A batch of turn outcomes, written in one statement by :meth:`Store.settle`.

    Ledger rows land only for rows whose fenced change matched their claim token.
    """

    ledger: list[Handled] = field(default_factory=list)
    ack: list[Ack] = field(default_factory=list)
    fail: list[Fail] = field(default_factory=list)
    release: list[Release] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ack) + len(self.fail) + len(self.release)

    def ids(self) -> set[int]:
        return {a.id for a in self.ack} | {f.id for f in self.fail} | {r.id for r in self.release}

    def tokens(self) -> dict[int, uuid.UUID]:
        """The claim token of every row in the batch."""
        found = {a.id: a.token for a in self.ack}
        found.update({f.id: f.token for f in self.fail})
        found.update({r.id: r.token for r in self.release})
        return found

    def only(self, event_id: int) -> Settlement:
        """The part of this batch that concerns one row (to isolate a refused outcome)."""
        return Settlement(
            [h for h in self.ledger if h.event_id == event_id],
            [a for a in self.ack if a.id == event_id],
            [f for f in self.fail if f.id == event_id],
            [r for r in self.release if r.id == event_id],
        )


@dataclass(frozen=True)
class Settled:
    """What :meth:`Store.settle` changed; ids it did not change had lost their claim."""

    acked: set[int]
    failed: set[int]
    released: set[int]

    def lost(self, batch: Settlement) -> set[int]:
        return batch.ids() - self.acked - self.failed - self.released


def _pass_row(row: Any, result: str) -> dict[str, Any] | None:
    """A reconcile or prune pass record with its jsonb columns decoded."""
    if row is None:
        return None
    return {**dict(row), result: json.loads(row[result]), "errors": json.loads(row["errors"])}


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    return tuple([row[i] for row in rows] for i in range(width))


class Store:
    """Spectral's database, seen from trio. Built by :func:`spectral.db.open_database`."""

    def __init__(
        self, pool: Any, url: str, *, pooler: str = "none", listen_url: str | None = None,
        handler_role: str | None = None,
    ) -> None:
        self._pool = pool
        self._url = url
        self._pooler = pooler
        self._listen_url = listen_url
        # Set in each turn transaction after Spectral's statements ('' leaves it alone).
        idle = _aio.POOLED_IDLE_TIMEOUT if pooler != "none" else ""
        self._turn_local = (idle, handler_role or "") if idle or handler_role else None
        # Claims and acknowledgements each on a connection of their own (see _aio.Session).
        self._claims = _aio.Session(url, pooler, _aio.CLAIM_SETTINGS)
        self._settles = _aio.Session(url, pooler)

    async def close_sessions(self, seconds: float) -> None:
        """Close the claim and acknowledgement connections (one hop; never raises)."""
        await hop(_aio.close_sessions, (self._claims, self._settles), seconds)

    @property
    def url(self) -> str:
        """The database URL, password included: never log it (see ``urls.redact``)."""
        return self._url

    @property
    def pooler(self) -> str:
        """'none', 'session' or 'transaction': what the database URL reaches."""
        return self._pooler

    @property
    def can_listen(self) -> bool:
        """Whether LISTEN sticks: not through a transaction pooler without a direct
        listen URL (a notification would reach whichever session ran last)."""
        return self._listen_url is not None or self._pooler != "transaction"

    # --- producers -------------------------------------------------------------------

    async def publish(
        self, topic: str, payload_json: str, *, available_at: datetime | None = None,
        generation: int | None = None, extras: PublishExtras = NO_EXTRAS,
    ) -> int:
        """Publish one already-checked event in its own transaction; returns its id."""
        value = await hop(
            _aio.fetchval, self._pool, PUBLISH.publish,
            (topic, payload_json, available_at, generation, extras.key,
             extras.idempotency_key, extras.traceparent),
        )
        return int(value)

    # --- workers ---------------------------------------------------------------------

    async def claim(
        self, generation: int, limit: int, worker_id: str, ttl: float
    ) -> list[ClaimedRow]:
        records = await hop(_aio.claim, self._claims, generation, limit, worker_id, ttl)
        loads = json.loads
        return [
            ClaimedRow(  # positional, in the field order: the cheapest way to build one
                r["id"], r["topic"], loads(r["payload"]), r["generation"], r["attempts"],
                r["created_at"], r["claim_token"], r["wait_seconds"], frozenset(r["handled"]),
                r["key"], r["traceparent"], r["created_epoch"],
            )
            for r in records
        ]

    async def settle(self, batch: Settlement) -> Settled:
        args = (*_columns(batch.ack, 2), *_columns(batch.fail, 6), *_columns(batch.release, 4),
                *_columns(batch.ledger, 2), [f.skip for f in batch.fail])
        acked, failed, released = await hop(_aio.settle, self._settles, args)
        return Settled(acked, failed, released)

    async def reap(self, limit: int) -> list[tuple[int, int, str | None]]:
        records = await hop(_aio.reap, self._pool, limit)
        return [(r["id"], r["generation"], r["claimed_by"]) for r in records]

    async def open_turn(self, event_id: int, token: uuid.UUID, handler: str) -> TurnTx:
        """A lazily opened transaction for one handler's turn on one event."""
        return TurnTx(self._pool, event_id, token, handler, self._turn_local)

    async def open_transaction(self) -> TurnTx:
        """A lazily opened plain transaction (reconcile sweeps): no claim, no ledger."""
        return TurnTx(self._pool, None, None, "", self._turn_local)

    # --- the reconciler --------------------------------------------------------------

    async def _switch_override(self, key: str) -> bool | None:
        value = await self.fetchval(SWITCHES.override, key)
        return None if value is None else value == "true"

    async def _set_switch(self, key: str, enabled: bool | None) -> None:
        await self.execute(SWITCHES.set_override, key,
                           None if enabled is None else str(enabled).lower())

    async def reconcile_enabled_override(self) -> bool | None:
        return await self._switch_override("reconcile_enabled")

    async def set_reconcile_enabled(self, enabled: bool | None) -> None:
        await self._set_switch("reconcile_enabled", enabled)

    async def begin_reconcile_pass(
        self, worker_id: str, generation: int, min_gap: float
    ) -> tuple[int, datetime] | None:
        return await hop(_aio.begin_reconcile_pass, self._pool, worker_id, generation, min_gap)

    async def finish_reconcile_pass(
        self, pass_id: int, unblocked: dict[str, int], errors: list[str]
    ) -> None:
        await self.execute(RECONCILE.finish_pass, pass_id, json.dumps(unblocked), json.dumps(errors))

    async def last_reconcile_pass(self) -> ReconcilePass | None:
        rows = await self.fetch(RECONCILE.last_pass)
        return _pass_row(rows[0] if rows else None, "unblocked")  # type: ignore[return-value]

    async def sweep_lost_wakeups(self, grace: float, stale: float) -> dict[int, int]:
        rows = await self.fetch(RECONCILE.lost_wakeups, grace, stale)
        return {int(r["generation"]): int(r["n"]) for r in rows}

    async def sweep_orphaned_claims(self, stale: float) -> list[tuple[int, int, str | None]]:
        rows = await self.fetch(RECONCILE.orphaned_claims, stale)
        return [(r["id"], r["generation"], r["claimed_by"]) for r in rows]

    async def sweep_parked_heads(self) -> list[tuple[int, int]]:
        rows = await self.fetch(RECONCILE.parked_heads)
        return [(r["id"], r["generation"]) for r in rows]

    async def sweep_retired_generations(
        self, grace: float, stale: float, policy: str
    ) -> tuple[list[int], int | None, dict[int, list[int]]]:
        return await hop(_aio.retire_generations, self._pool, grace, stale, policy)

    async def stale_workers(self, stale: float) -> list[dict[str, Any]]:
        return await self.fetch(RECONCILE.stale_workers, stale)

    # --- the pruner ------------------------------------------------------------------

    async def begin_prune_pass(self, worker_id: str, min_gap: float, lease: float) -> int | None:
        return await hop(_aio.begin_prune_pass, self._pool, worker_id, min_gap, lease)

    async def finish_prune_pass(
        self, pass_id: int, pruned: dict[str, int], errors: list[str]
    ) -> None:
        await self.execute(PRUNE.finish_pass, pass_id, json.dumps(pruned), json.dumps(errors))

    async def prune_enabled_override(self) -> bool | None:
        return await self._switch_override("prune_enabled")

    async def set_prune_enabled(self, enabled: bool | None) -> None:
        await self._set_switch("prune_enabled", enabled)

    async def last_prune_pass(self) -> PrunePass | None:
        rows = await self.fetch(PRUNE.last_pass)
        return _pass_row(rows[0] if rows else None, "pruned")  # type: ignore[return-value]

    async def prune(self, kind: PruneKind, retention: float, limit: int) -> tuple[int, int]:
        """Delete one batch of ``kind`` older than ``retention`` seconds (see prune.sql);
        returns (rows deleted, ledger rows deleted with them)."""
        return await hop(_aio.prune_batch, self._pool, getattr(PRUNE, kind), retention, limit)

    async def mark_lost_workers(self, after: float) -> list[tuple[str, int]]:
        rows = await self.fetch(PRUNE.mark_lost, after)
        return [(r["worker_id"], r["generation"]) for r in rows]

    async def would_prune(
        self, *, done: float, dead: float, workers: float, records: float, lost_after: float,
        cap: int,
    ) -> dict[str, int]:
        rows = await self.fetch(PRUNE.would_prune, done, dead, workers, records, lost_after, cap)
        return {k: int(v) for k, v in rows[0].items()}

    # --- observation -----------------------------------------------------------------

    async def snapshot(self, stale_after: float, blocked_shown: int = 20) -> dict[str, Any]:
        """The queue snapshot's rows in one hop: ``outbox`` (as :meth:`outbox_counts`),
        ``workers`` (by generation and state), ``deployments`` (the newest 5),
        ``schema_version``, ``last_reconcile_pass``, ``last_prune_pass``, ``tables`` (as
        :meth:`table_health`), ``horizon`` (as :meth:`xmin_horizon`), ``blocked_keys``
        (the first ``blocked_shown`` keys held by a DEAD event), ``blocked_key_count`` and
        ``oldest_due`` (the oldest due event's age per generation)."""
        raw = await hop(_aio.snapshot, self._pool, stale_after, DEAD_COUNT_CAP, blocked_shown)
        out: dict[str, Any] = {
            key: [dict(r) for r in raw[key]]
            for key in ("outbox", "workers", "deployments", "tables", "blocked_keys", "oldest_due")
        }
        out["blocked_key_count"] = int(raw["blocked_key_count"])
        out["schema_version"] = int(raw["schema_version"])
        out["last_reconcile_pass"] = _pass_row(raw["last_reconcile_pass"], "unblocked")
        out["last_prune_pass"] = _pass_row(raw["last_prune_pass"], "pruned")
        horizon = dict(raw["horizon"])
        if horizon["oldest_xact"] is not None:
            horizon["oldest_xact"] = json.loads(horizon["oldest_xact"])
        out["horizon"] = horizon
        return out

    async def table_health(self) -> list[dict[str, Any]]:
        return await self.fetch(OBSERVE.table_health)

    async def xmin_horizon(self) -> dict[str, Any]:
        row = (await self.fetch(OBSERVE.xmin_horizon))[0]
        row["oldest_xact"] = None if row["oldest_xact"] is None else json.loads(row["oldest_xact"])
        return row

    # --- deployments -----------------------------------------------------------------

    async def newest_generation(self) -> int | None:
        return await hop(_aio.newest_generation, self._pool)

    async def deployed_at(self, generation: int) -> datetime | None:
        """When ``generation`` was deployed; None when it is unknown."""
        return await self.fetchval(OBSERVE.deployed_at, generation)  # type: ignore[no-any-return]

    async def generation_exists(self, generation: int) -> bool:
        return bool(await self.fetchval(DEPLOYMENTS.generation_exists, generation))

    async def allocate_generation(
        self, reference: str, deployed_by: str | None, tag: str | None
    ) -> NewDeployment:
        rows = await self.fetch(DEPLOYMENTS.allocate_generation, reference, deployed_by, tag)
        return rows[0]  # type: ignore[return-value]

    async def latest_deployments(self, limit: int = 5) -> list[Deployment]:
        return await self.fetch(DEPLOYMENTS.latest_deployments, limit)  # type: ignore[return-value]

    # --- operators -------------------------------------------------------------------

    async def requeue_ids(self, ids: Sequence[int]) -> list[int]:
        return [r["id"] for r in await self.fetch(OUTBOX.requeue_ids, list(ids))]

    async def skip_ids(self, ids: Sequence[int]) -> list[int]:
        """Let the keys of DEAD rows move on (the rows stay DEAD); returns the ids changed."""
        return [r["id"] for r in await self.fetch(OUTBOX.skip_ids, list(ids))]

    async def blocked_keys(self, limit: int = 20) -> list[dict[str, Any]]:
        """Keys held by a DEAD row: key, head_id, topic, generation, dead_reason, waiting."""
        return await self.fetch(OUTBOX.blocked_keys, limit)

    async def requeue_topic(self, topic: str, generation: int | None) -> list[int]:
        return [r["id"] for r in await self.fetch(OUTBOX.requeue_topic, topic, generation)]

    async def requeue_retired(self, generation: int, to_generation: int) -> list[int]:
        ids = [r["id"] for r in await self.fetch(OUTBOX.requeue_retired, generation, to_generation)]
        if ids:
            await self.execute(RECONCILE.record_handover, generation, to_generation, "manual", len(ids))
        return ids

    async def outbox_counts(self) -> list[LiveCount]:
        """PENDING, CLAIMED and DEAD rows by generation (DEAD up to :data:`DEAD_COUNT_CAP`),
        from their partial indexes: DONE rows are never counted (see :meth:`table_health`)."""
        return await self.fetch(OBSERVE.live_counts, DEAD_COUNT_CAP)  # type: ignore[return-value]

    async def all_outbox_counts(self) -> list[dict[str, Any]]:
        """Every row by generation and status, DONE included: a full count whose cost grows
        with the table (the dashboard's table, looked at by people, not by probes)."""
        return await self.fetch(OUTBOX.counts)

    async def get_event(self, event_id: int) -> dict[str, Any] | None:
        rows = await self.fetch(OUTBOX.get_event, event_id)
        return rows[0] if rows else None

    async def workers(self, stale_after: float) -> list[Worker]:
        return await self.fetch(WORKERS.list_workers, stale_after)  # type: ignore[return-value]

    async def can_set_role(self, role: str) -> bool | None:
        """Whether the login role may switch to ``role``; None when ``role`` does not exist."""
        value = await self.fetchval(WORKERS.can_set_role, role)
        return None if value is None else bool(value)

    async def max_payload_bytes(self) -> int:
        return int(await self.fetchval(PUBLISH.max_payload_bytes))

    async def set_max_payload_bytes(self, cap: int) -> None:
        await self.fetchval(PUBLISH.set_max_payload_bytes, cap)

    # --- deploy records and the dashboard ------------------------------------------

    async def begin_record(
        self, generation: int, target: str, old_process: str | None, *, environment: str,
        reference: str, deployed_by: str | None, staging_evidence: str | None,
        override_reason: str | None,
    ) -> tuple[int, datetime]:
        rows = await self.fetch(DEPLOYMENTS.begin_record, generation, target, old_process,
                                environment, reference, deployed_by, staging_evidence,
                                override_reason)
        return int(rows[0]["id"]), rows[0]["started_at"]

    async def finish_record(
        self, rollout_id: int, *, status: str, reason: str, new_process: str | None,
        verdict: str, checks: list[dict[str, str]], migrations: list[str],
    ) -> datetime:
        """Finish rollout ``rollout_id``: a rolled-back generation is retired at once."""
        await self.fetchval(DEPLOYMENTS.finish_rollout, rollout_id, status, reason, new_process)
        return await self.fetchval(DEPLOYMENTS.finish_record, rollout_id, verdict,  # type: ignore[no-any-return]
                                   json.dumps(checks), json.dumps(migrations))

    async def record_refused(
        self, generation: int | None, target: str, *, environment: str, reference: str | None,
        deployed_by: str | None, reason: str, checks: list[dict[str, str]],
    ) -> dict[str, Any]:
        rows = await self.fetch(DEPLOYMENTS.record_refused, generation, target, environment,
                                reference, deployed_by, reason, json.dumps(checks))
        return rows[0]

    async def deploy_history(self, environment: str | None, limit: int) -> list[dict[str, Any]]:
        rows = await self.fetch(DEPLOYMENTS.deploy_history, environment, limit)
        for row in rows:
            row["checks"] = json.loads(row["checks"])
            row["migrations_applied"] = json.loads(row["migrations_applied"])
        return rows

    async def rollout_record(self, rollout_id: int) -> dict[str, Any]:
        rows = await self.fetch(DEPLOYMENTS.rollout_record, rollout_id)
        row = rows[0]
        row["checks"] = json.loads(row["checks"])
        row["migrations_applied"] = json.loads(row["migrations_applied"])
        return row

    async def migrations_since_previous_rollout(self, rollout_id: int) -> list[str]:
        rows = await self.fetch(DEPLOYMENTS.migrations_since, rollout_id)
        return [f"{r['version']:04d}_{r['name']}" for r in rows]

    async def generation_reference(self, generation: int) -> str | None:
        return await self.fetchval(DEPLOYMENTS.generation_reference, generation)  # type: ignore[no-any-return]

    async def in_flight(self, outside_generation: int | None, stale_after: float) -> list[dict[str, Any]]:
        """Pre-flight: claimed rows and live workers by generation, except ``outside_generation``."""
        return await self.fetch(DEPLOYMENTS.in_flight, outside_generation, stale_after)

    async def dead_rows(self, limit: int) -> list[dict[str, Any]]:
        return await self.fetch(DASHBOARD.dead_rows, limit)

    async def dead_topics(self) -> list[dict[str, Any]]:
        return await self.fetch(DASHBOARD.dead_topics)

    async def throughput(self, minutes: int) -> list[dict[str, Any]]:
        """Events acknowledged per minute over the last ``minutes`` minutes, oldest first."""
        return await self.fetch(DASHBOARD.throughput, minutes)

    # --- spectral.testing ------------------------------------------------------------

    async def unfinished(self, generation: int, within: float) -> int:
        """Rows of ``generation`` claimed, or due within ``within`` seconds (``wait_idle``)."""
        return int(await self.fetchval(TESTING.unfinished, generation, within))

    async def event_state(self, event_id: int) -> dict[str, Any] | None:
        """Status, attempts, last error and the handlers that committed, or None."""
        rows = await self.fetch(TESTING.event_state, event_id)
        return rows[0] if rows else None

    # --- generic, for the query files of other modules --------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await hop(_aio.fetch, self._pool, sql, args)]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await hop(_aio.fetchval, self._pool, sql, args)

    async def execute(self, sql: str, *args: Any) -> str:
        return await hop(_aio.execute, self._pool, sql, args)

    # --- dedicated connections -------------------------------------------------------

    async def connect(self, application_name: str) -> Connection:
        """A dedicated connection outside the pool (heartbeat), so handlers cannot starve it."""
        return Connection(await hop(_aio.connect, self._url, application_name, self._pooler))

    async def listen(
        self, channel: str, on_notify: Callable[[str], None], on_terminate: Callable[[], None]
    ) -> Connection:
        """A dedicated connection LISTENing on ``channel`` (a pool would UNLISTEN it), to
        the direct listen URL when one is configured."""
        url, pooler = (self._listen_url, "none") if self._listen_url else (self._url, self._pooler)
        return Connection(await hop(_aio.listen, url, channel, on_notify, on_terminate, pooler))


async def staging_pass(url: str, reference: str) -> dict[str, Any] | None:
    """The newest passed staging rollout of ``reference`` in the database at ``url``,
    read on a read-only session (the staging gate's evidence), or None."""
    async with asyncio_loop():
        rows = await hop(_aio.read_only_fetch, url, DEPLOYMENTS.staging_pass, (reference,))
    if not rows:
        return None
    row = dict(rows[0])
    row["checks"] = json.loads(row["checks"])
    return row


class Connection:
    """A dedicated connection (listener or heartbeat), closed with :meth:`aclose`."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def ping(self) -> None:
        await hop(_aio.ping, self._conn)

    async def register_worker(self, *args: Any) -> None:
        await hop(_aio.register_worker, self._conn, args)

    async def beat(self, worker_id: str, state: str) -> bool:
        """Refresh the worker row; False when the row is gone (deleted by an operator)."""
        return await hop(_aio.beat, self._conn, worker_id, state) is not None

    async def mark_exited(self, worker_id: str) -> None:
        await hop(_aio.mark_exited, self._conn, worker_id)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await hop(_aio.conn_fetchval, self._conn, sql, args)

    async def try_deploy_lock(self) -> bool:
        """Take the database's deploy lock in a transaction left open until :meth:`aclose`;
        False when another rollout holds it."""
        return bool(await hop(_aio.begin_and_fetchval, self._conn, DEPLOYMENTS.try_deploy_lock, ()))

    async def aclose(self) -> None:
        """Close within :data:`CLEANUP_TIMEOUT`, shielded from cancellation (the close
        bounds its own time, see _aio)."""
        with trio.CancelScope(shield=True):
            await hop(_aio.close_connection, self._conn, CLEANUP_TIMEOUT)


class TurnTx:
    """The transaction of one handler's turn, opened on its first statement.

    The first statement also checks the claim token and inserts the ``core.event_handled``
    row in the same hop; :meth:`commit` commits the handler's writes with that row.

    It remembers what happened to it, whatever the handler does with the exceptions it
    raised: :attr:`lost` (the claim was gone), :attr:`already_handled` (the ledger has the
    handler), :attr:`failure` (a statement failed, the first one included, so the
    transaction was aborted or never opened). A turn with any of these is never a success
    with new effects, and once one happened no further statement runs.
    """

    def __init__(
        self, pool: Any, event_id: int | None, token: uuid.UUID | None, handler: str,
        local: tuple[str, str] | None = None,
    ) -> None:
        self._pool = pool
        self._local = local  # (idle ms, handler role) set after Spectral's statements
        self._event_id = event_id
        self._token = token
        self._handler = handler
        self._conn: Any = None
        self._tr: Any = None
        self._closed = False
        self.lost = False
        self.already_handled = False
        self.failure: str | None = None

    @property
    def opened(self) -> bool:
        """Whether the handler touched the database (a transaction is open)."""
        return self._conn is not None

    def _refuse_reuse(self) -> None:
        if self.failure is not None:
            raise DatabaseError(
                f"this turn's transaction was aborted by an earlier error ({self.failure}); "
                "no further statement runs"
            )
        if self._closed:
            raise DatabaseError("this turn's transaction is finished; it cannot be used again")

    async def query(self, mode: QueryMode, sql: str, args: Sequence[Any]) -> Any:
        self._refuse_reuse()
        if self._conn is None:
            try:
                conn, tr, result = await hop(
                    _aio.turn_begin, self._pool, self._event_id, self._token, self._handler,
                    mode, sql, args, self._local,
                )
            except SpectralError as exc:  # the first statement failed: nothing is open
                self.failure = str(exc)
                raise
            if conn is None:
                self._closed = True
                if result == _aio.TurnOutcome.ALREADY_HANDLED:
                    self.already_handled = True
                    raise AlreadyHandledError(
                        f"handler {self._handler} already handled event {self._event_id}"
                    )
                self.lost = True
                raise ClaimLostError(f"event {self._event_id}: claim lost before the turn began")
            self._conn, self._tr = conn, tr
            return result
        try:
            return await hop(_aio.turn_query, self._conn, mode, sql, args)
        except SpectralError as exc:  # every server-side error aborts the transaction
            self.failure = str(exc)
            raise

    async def publish(
        self, topic: str, payload_json: str, available_at: datetime | None,
        generation: int | None, extras: PublishExtras = NO_EXTRAS,
    ) -> int:
        if self._conn is None:
            # Open the transaction with a no-op so the publish joins the turn's writes.
            await self.query("execute", "SELECT 1", ())
        self._refuse_reuse()
        try:
            return await hop(
                _aio.publish, self._conn, topic, payload_json, available_at, generation, extras
            )
        except SpectralError as exc:  # refused by core.publish: the transaction is aborted
            self.failure = str(exc)
            raise

    async def commit(self) -> None:
        """Commit (shielded, bounded): the handler's writes and its ledger row together.

        Raises:
            DatabaseError: a statement of the turn failed (COMMIT of an aborted
                transaction is a silent ROLLBACK: it is never reported as success).
        """
        if self.failure is not None:
            await self.rollback()
            raise DatabaseError(
                f"the handler's transaction was aborted by an earlier error ({self.failure}); "
                "its writes were rolled back"
            )
        if self._conn is None or self._closed:
            return
        self._closed = True
        # Shielded with no trio deadline: the commit bounds its own time (see _aio).
        with trio.CancelScope(shield=True):
            await hop(_aio.turn_commit, self._pool, self._conn, self._tr, CLEANUP_TIMEOUT * 2)

    async def rollback(self) -> None:
        """Roll back and return the connection (shielded, bounded); idempotent."""
        if self._conn is None or self._closed:
            self._closed = True
            return
        self._closed = True
        # Shielded with no trio deadline: the rollback bounds its own time (see _aio).
        with trio.CancelScope(shield=True):
            await hop(_aio.turn_rollback, self._pool, self._conn, self._tr, CLEANUP_TIMEOUT)
