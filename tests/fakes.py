"""In-memory fakes of Spectral's database, for unit tests of actors, turns and handlers.

:class:`FakeStore` stands in for :class:`spectral.db.Store` wherever an actor takes a store:
it satisfies every actor's store Protocol (claimer, reaper, turns, heartbeat, listener and
user actors). It keeps a small in-memory outbox with the semantics of the SQL it replaces:
claims are fenced by their token, a failed turn charges an attempt, a lapsed claim is
reaped, a handler's transaction writes its ledger row on commit, and publishing wakes the
listeners with the generation as payload.

Its clock is trio's, so tests run on virtual time (pytest-trio's ``autojump_clock``)::

    async def test_retry_is_scheduled(autojump_clock):
        store = FakeStore()
        event_id = store.add("order.created", {"id": 1})
        ...
        assert store.row(event_id).status == "PENDING"

Failures are injected per method (:meth:`FakeStore.fail_next`) or for every call at once
(``store.reachable = False``, a database that cannot be reached). Every call is recorded
in :attr:`FakeStore.calls` with the virtual time it happened at.

Nothing here talks to PostgreSQL; the asyncio bridge is never entered.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel

from spectral.db import ClaimedRow, Settled, Settlement, TurnTx
from spectral.errors import AlreadyHandledError, ClaimLostError, DatabaseError, DatabaseUnavailableError
from spectral.state import RuntimeState

if TYPE_CHECKING:
    from spectral.actors.claimer import ClaimerStore
    from spectral.actors.heartbeat import HeartbeatStore
    from spectral.actors.listener import ListenerStore
    from spectral.actors.reaper import ReaperStore
    from spectral.actors.user import ActorStore
    from spectral.turns import TurnStore

__all__ = [
    "Call", "FakeConnection", "FakeStore", "FakeTurnTx", "FixedJitter", "OutboxRow",
    "WorkerRow", "make_state", "wait_until",
]

Responder = Callable[[str, str, Sequence[Any]], Any]


def _now() -> float:
    """The fake database clock: trio's clock inside a run, 0 outside one."""
    try:
        return trio.current_time()
    except RuntimeError:
        return 0.0


def _default_response(mode: str, sql: str, args: Sequence[Any]) -> Any:
    return {"execute": "OK", "fetch": [], "executemany": None}.get(mode)


@dataclass(frozen=True)
class Call:
    """One call the code under test made on the fake: when (trio time), what, with what."""

    time: float
    name: str
    args: tuple[Any, ...]


@dataclass
class OutboxRow:
    """One row of the fake outbox (the columns the workers read and write)."""

    id: int
    topic: str
    payload: dict[str, Any]
    generation: int
    created_at: datetime
    available_at: float  # trio time
    status: str = "PENDING"  # PENDING, CLAIMED, DONE or DEAD
    attempts: int = 0
    claims: int = 0  # times claimed; the ledger is read on every claim but the first
    claimed_by: str | None = None
    claim_token: uuid.UUID | None = None
    claim_expires_at: float | None = None  # trio time
    last_error: str | None = None
    dead_reason: str | None = None


@dataclass
class WorkerRow:
    """One row of the fake ``core.workers``; ``history`` lists every state written."""

    worker_id: str
    generation: int
    environment: str
    service: str
    hostname: str
    pid: int
    state: str
    last_seen: float  # trio time
    history: list[tuple[float, str]] = field(default_factory=list)


class FixedJitter(random.Random):
    """A ``random.Random`` whose ``uniform(a, b)`` is ``a + fraction * (b - a)``.

    Pass it as ``rng=`` to make backoff delays exact: ``FixedJitter(1.0)`` gives the full
    step (1, 2, 4, ... times the base), ``FixedJitter(0.0)`` half of it.
    """

    def __init__(self, fraction: float = 1.0) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def make_state(generation: int = 1, worker_id: str = "test-worker") -> RuntimeState:
    """A fresh :class:`RuntimeState` for one test."""
    return RuntimeState(worker_id=worker_id, generation=generation)


async def wait_until(predicate: Callable[[], bool], *, interval: float = 0.01) -> None:
    """Check ``predicate()`` every ``interval`` seconds until it holds.

    Meant for virtual time, where the steps cost nothing; bound it with
    ``trio.fail_after`` when the condition might never hold.
    """
    while True:
        if predicate():
            return
        await trio.sleep(interval)


class FakeTurnTx(TurnTx):
    """A handler's turn transaction on a :class:`FakeStore`.

    Like the real one it opens on the first statement, which checks the claim token
    (:class:`ClaimLostError`) and the ledger (:class:`AlreadyHandledError`); ``commit``
    writes the ledger row and the events published in it; ``rollback`` discards them.
    Inspect ``statements``, ``committed`` and ``rolled_back`` in tests.
    """

    def __init__(self, store: FakeStore, event_id: int, token: uuid.UUID, handler: str) -> None:
        # The real TurnTx holds a pool; this one only the fake store.
        self.store = store
        self.event_id = event_id
        self.token = token
        self.handler = handler
        self.statements: list[tuple[str, str, tuple[Any, ...]]] = []
        self.published: list[OutboxRow] = []
        self.committed = False
        self.rolled_back = False
        #: Calls of ``rollback``, including the no-op ones on an unopened transaction.
        self.rollback_calls = 0
        self._open = False
        self._finished = False
        self.lost = False
        self.already_handled = False
        self.failure: str | None = None

    @property
    def opened(self) -> bool:
        return self._open

    @property
    def finished(self) -> bool:
        """Committed, rolled back, or refused at its first statement."""
        return self._finished

    async def query(self, mode: str, sql: str, args: Sequence[Any]) -> Any:
        if self.failure is not None:
            raise DatabaseError(f"this turn's transaction was aborted ({self.failure})")
        if self._finished:
            raise DatabaseError("this turn's transaction is finished; it cannot be used again")
        try:
            await self.store._call("query", self.event_id, self.handler, mode, sql, tuple(args))
        except DatabaseError as exc:
            self.failure = str(exc)
            raise
        if not self._open:
            row = self.store.rows.get(self.event_id)
            if row is None or row.status != "CLAIMED" or row.claim_token != self.token:
                self._finished = True
                self.lost = True
                raise ClaimLostError(f"event {self.event_id}: claim lost before the turn began")
            if (self.handler, self.event_id) in self.store.handled:
                self._finished = True
                self.already_handled = True
                raise AlreadyHandledError(
                    f"handler {self.handler} already handled event {self.event_id}"
                )
        try:
            result = self.store.responder(mode, sql, args)
        except DatabaseError as exc:
            # Like PostgreSQL: a failed statement aborts the transaction (the first one
            # included: then nothing is open).
            self.failure = str(exc)
            raise
        self._open = True
        self.statements.append((mode, sql, tuple(args)))
        return result

    async def publish(
        self, topic: str, payload_json: str, available_at: datetime | None,
        generation: int | None,
    ) -> int:
        if not self._open:
            await self.query("execute", "SELECT 1", ())
        await self.store._call("tx_publish", topic, payload_json, available_at, generation)
        row = self.store._new_row(topic, payload_json, available_at, generation)
        self.published.append(row)
        return row.id

    async def commit(self) -> None:
        if self.failure is not None:
            await self.rollback()
            raise DatabaseError(f"the handler's transaction was aborted ({self.failure})")
        if not self._open or self._finished:
            return
        self._finished = True
        with trio.CancelScope(shield=True):
            await self.store._call("commit", self.event_id, self.handler)
        self.committed = True
        self.store.handled.add((self.handler, self.event_id))
        for row in self.published:
            self.store.rows[row.id] = row
        self.store._notify_rows(self.published)

    async def rollback(self) -> None:
        self.rollback_calls += 1
        if self._finished:
            return
        self._finished = True
        if not self._open:
            return
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()
        self.rolled_back = True
        self.store.calls.append(Call(_now(), "rollback", (self.event_id, self.handler)))


class FakeConnection:
    """A dedicated connection of a :class:`FakeStore`: the heartbeat's or the listener's."""

    def __init__(
        self, store: FakeStore, application_name: str,
        on_notify: Callable[[str], None] | None = None,
        on_terminate: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.application_name = application_name
        self.on_notify = on_notify
        self.on_terminate = on_terminate
        self.closed = False
        #: Set to make ``ping`` fail as if the server stopped answering.
        self.ping_error: BaseException | None = None

    def is_closed(self) -> bool:
        return self.closed

    async def _use(self, name: str, *args: Any) -> None:
        await self.store._call(name, *args)
        if self.closed:
            raise DatabaseUnavailableError("connection is closed")

    async def ping(self) -> None:
        await self._use("ping")
        if self.ping_error is not None:
            raise self.ping_error

    async def register_worker(self, *args: Any) -> None:
        await self._use("register_worker", *args)
        worker_id, generation, environment, service, hostname, pid, state, _interval = args
        now = _now()
        row = self.store.workers.get(worker_id)
        if row is None:
            row = WorkerRow(worker_id, generation, environment, service, hostname, pid, state, now)
            self.store.workers[worker_id] = row
        row.state, row.last_seen = state, now
        row.history.append((now, state))

    async def beat(self, worker_id: str, state: str) -> bool:
        await self._use("beat", worker_id, state)
        row = self.store.workers.get(worker_id)
        if row is None:
            return False
        row.state, row.last_seen = state, _now()
        row.history.append((row.last_seen, state))
        return True

    async def mark_exited(self, worker_id: str) -> None:
        await self._use("mark_exited", worker_id)
        row = self.store.workers.get(worker_id)
        if row is not None:
            row.state, row.last_seen = "exited", _now()
            row.history.append((row.last_seen, "exited"))

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()
        self.store.calls.append(Call(_now(), "aclose", (self.application_name,)))
        self.closed = True

    def terminate(self) -> None:
        """What ``pg_terminate_backend`` does: the connection drops, listeners are told."""
        if self.closed:
            return
        self.closed = True
        if self.on_terminate is not None:
            self.on_terminate()


class FakeStore:
    """An in-memory :class:`spectral.db.Store` for one test (see the module docstring).

    Args:
        generation: the generation :meth:`publish` stamps when given none.

    Attributes:
        rows: the outbox by id.
        handled: the ledger, ``(handler, event_id)`` pairs.
        workers: ``core.workers`` by worker id.
        calls: every call made, in order.
        settlements: a copy of every batch passed to :meth:`settle`.
        transactions: every turn transaction opened.
        connections: every dedicated connection opened (heartbeat and listener).
        reachable: False makes every call fail with :class:`DatabaseUnavailableError`.
        responder: ``(mode, sql, args) -> result`` for statements run in a turn's ``tx``.
    """

    def __init__(self, *, generation: int = 1) -> None:
        self.generation = generation
        self.rows: dict[int, OutboxRow] = {}
        self.handled: set[tuple[str, int]] = set()
        self.workers: dict[str, WorkerRow] = {}
        self.calls: list[Call] = []
        self.settlements: list[Settlement] = []
        self.transactions: list[FakeTurnTx] = []
        self.connections: list[FakeConnection] = []
        self.reachable = True
        self.responder: Responder = _default_response
        self._failures: dict[str, list[BaseException]] = {}
        self._next_id = 1

    # --- setting up and inspecting ---------------------------------------------------

    def add(
        self, topic: str, payload: dict[str, Any] | None = None, *, generation: int | None = None,
        attempts: int = 0, delay: float = 0.0, handled: Sequence[str] = (), notify: bool = True,
    ) -> int:
        """Insert a PENDING row due in ``delay`` seconds; returns its id.

        ``handled`` pre-fills the ledger (handlers that committed on an earlier attempt);
        ``notify`` wakes the listeners as the database's trigger would.
        """
        row = self._new_row(topic, payload or {}, None, generation)
        row.available_at += delay
        row.attempts = attempts
        # A row with attempts or ledger rows was claimed before (the SQL's claims column).
        row.claims = 1 if attempts or handled else 0
        self.rows[row.id] = row
        self.handled.update((name, row.id) for name in handled)
        if notify:
            self._notify_rows([row])
        return row.id

    def row(self, event_id: int) -> OutboxRow:
        return self.rows[event_id]

    def status(self, event_id: int) -> str:
        return self.rows[event_id].status

    def lose_claim(self, event_id: int, *, to: str = "another-worker") -> None:
        """Hand a claimed row to another worker: this worker's token no longer matches."""
        row = self.rows[event_id]
        row.claim_token, row.claimed_by = uuid.uuid4(), to

    def fail_next(self, name: str, exc: BaseException, times: int = 1) -> None:
        """Make the next ``times`` calls of method ``name`` raise ``exc``."""
        self._failures.setdefault(name, []).extend([exc] * times)

    def count(self, name: str) -> int:
        """How many times method ``name`` was called."""
        return sum(1 for c in self.calls if c.name == name)

    def times(self, name: str) -> list[float]:
        """When method ``name`` was called (trio time)."""
        return [c.time for c in self.calls if c.name == name]

    def notify(self, payload: str) -> None:
        """Deliver a NOTIFY to every open listening connection."""
        for conn in self.connections:
            if conn.on_notify is not None and not conn.closed:
                conn.on_notify(payload)

    def terminate_listeners(self) -> None:
        """Terminate every open listening connection (``pg_terminate_backend``)."""
        for conn in self.connections:
            if conn.on_terminate is not None:
                conn.terminate()

    # --- internals -------------------------------------------------------------------

    async def _call(self, name: str, *args: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(Call(_now(), name, args))
        queued = self._failures.get(name)
        if queued:
            raise queued.pop(0)
        if not self.reachable:
            raise DatabaseUnavailableError(f"{name}: connection refused (the fake database is down)")

    def _new_row(
        self, topic: str, payload: dict[str, Any] | str, available_at: datetime | None,
        generation: int | None,
    ) -> OutboxRow:
        now = _now()
        due = now
        if available_at is not None:
            due = now + (available_at - datetime.now(UTC)).total_seconds()
        value = json.loads(payload) if isinstance(payload, str) else dict(payload)
        row = OutboxRow(
            id=self._next_id, topic=topic, payload=value,
            generation=self.generation if generation is None else generation,
            created_at=datetime.now(UTC), available_at=due,
        )
        self._next_id += 1
        return row

    def _notify_rows(self, rows: Sequence[OutboxRow]) -> None:
        for generation in sorted({r.generation for r in rows}):
            self.notify(str(generation))

    def _fenced(self, event_id: int, token: uuid.UUID) -> OutboxRow | None:
        row = self.rows.get(event_id)
        if row is None or row.status != "CLAIMED" or row.claim_token != token:
            return None
        return row

    @staticmethod
    def _unclaim(row: OutboxRow, status: str) -> None:
        row.status = status
        row.claim_token = None
        row.claim_expires_at = None

    # --- the worker side (ClaimerStore, ReaperStore, TurnStore) ------------------------

    async def claim(
        self, generation: int, limit: int, worker_id: str, ttl: float
    ) -> list[ClaimedRow]:
        await self._call("claim", generation, limit, worker_id, ttl)
        now = _now()
        due = [r for r in sorted(self.rows.values(), key=lambda r: (r.available_at, r.id))
               if r.generation == generation and r.status == "PENDING" and r.available_at <= now]
        claimed = []
        for row in due[:limit]:
            row.status, row.claimed_by = "CLAIMED", worker_id
            row.claim_token, row.claim_expires_at = uuid.uuid4(), now + ttl
            row.claims += 1
            # As the SQL: the ledger is read for every row claimed before.
            handled = (frozenset() if row.claims == 1
                       else frozenset(h for h, e in self.handled if e == row.id))
            claimed.append(ClaimedRow(
                id=row.id, topic=row.topic, payload=dict(row.payload), generation=row.generation,
                attempts=row.attempts, created_at=row.created_at, token=row.claim_token,
                wait_seconds=now - row.available_at, handled=handled,
            ))
        return claimed

    async def settle(self, batch: Settlement) -> Settled:
        await self._call("settle", len(batch))
        self.settlements.append(
            Settlement(list(batch.ledger), list(batch.ack), list(batch.fail), list(batch.release))
        )
        now = _now()
        acked: set[int] = set()
        failed: set[int] = set()
        released: set[int] = set()
        for event_id, token in batch.ack:
            if (row := self._fenced(event_id, token)) is not None:
                self._unclaim(row, "DONE")
                acked.add(event_id)
        for event_id, token, delay, error, dead, reason in batch.fail:
            if (row := self._fenced(event_id, token)) is not None:
                self._unclaim(row, "DEAD" if dead else "PENDING")
                row.attempts += 1
                row.last_error = error
                if dead:
                    row.dead_reason = reason
                else:
                    row.available_at = now + delay
                failed.add(event_id)
        for event_id, token, charge, release_error in batch.release:
            if (row := self._fenced(event_id, token)) is not None:
                self._unclaim(row, "PENDING")
                row.attempts += 1 if charge else 0
                if release_error is not None:
                    row.last_error = release_error
                released.add(event_id)
        # As the SQL: ledger rows land only for rows whose fenced change matched.
        matched = acked | failed | released
        self.handled.update((h, e) for h, e in batch.ledger if e in matched)
        return Settled(acked, failed, released)

    async def reap(self, limit: int) -> list[tuple[int, int, str | None]]:
        await self._call("reap", limit)
        now = _now()
        lapsed = sorted(
            (r for r in self.rows.values()
             if r.status == "CLAIMED" and r.claim_expires_at is not None
             and r.claim_expires_at < now),
            key=lambda r: (r.claim_expires_at, r.id),
        )[:limit]
        for row in lapsed:
            self._unclaim(row, "PENDING")
            row.attempts += 1
            row.last_error = f"claim expired: worker {row.claimed_by or '?'} did not acknowledge"
        return [(r.id, r.generation, r.claimed_by) for r in lapsed]

    async def open_turn(self, event_id: int, token: uuid.UUID, handler: str) -> TurnTx:
        tx = FakeTurnTx(self, event_id, token, handler)
        self.transactions.append(tx)
        return tx

    # --- producers and user actors (ActorStore) ----------------------------------------

    async def publish(
        self, topic: str, payload_json: str, *, available_at: datetime | None = None,
        generation: int | None = None,
    ) -> int:
        await self._call("publish", topic, payload_json, available_at, generation)
        row = self._new_row(topic, payload_json, available_at, generation)
        self.rows[row.id] = row
        self._notify_rows([row])
        return row.id

    async def execute(self, sql: str, *args: Any) -> str:
        await self._call("execute", sql, *args)
        return str(self.responder("execute", sql, args))

    # --- dedicated connections (HeartbeatStore, ListenerStore) -------------------------

    async def connect(self, application_name: str) -> FakeConnection:
        await self._call("connect", application_name)
        conn = FakeConnection(self, application_name)
        self.connections.append(conn)
        return conn

    async def listen(
        self, channel: str, on_notify: Callable[[str], None], on_terminate: Callable[[], None]
    ) -> FakeConnection:
        await self._call("listen", channel)
        conn = FakeConnection(self, "spectral-listener", on_notify, on_terminate)
        self.connections.append(conn)
        return conn


if TYPE_CHECKING:
    # mypy checks here that the fake keeps up with every actor's store Protocol.
    def _conforms(store: FakeStore) -> tuple[
        ClaimerStore, ReaperStore, TurnStore, HeartbeatStore, ListenerStore, ActorStore
    ]:
        return (store, store, store, store, store, store)
