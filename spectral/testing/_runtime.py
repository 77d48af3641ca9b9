"""``running()``: the real worker runtime, in-process, driven by a test."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import trio

from ..actors.user import ActorContext
from ..app import App
from ..config import Settings
from ..db import Store, open_database
from ..db.store import sole_exception
from ..errors import ConfigurationError
from ..runtime import boot, check_startup, supervise
from ..state import Counters, RuntimeState
from ._database import TestDatabase

log = logging.getLogger("spectral.testing")

#: The settings ``running()`` changes from Spectral's defaults: short intervals, so
#: polling, heartbeats, reaping and reconciling happen within a test's time. Anything
#: passed to ``running()`` overrides these.
TEST_DEFAULTS: Mapping[str, object] = {
    "environment": "test",
    "poll_interval": 0.05,
    "handler_max": 10,
    "drain_timeout": 5,
    # A worker fences itself 1.5 s after its last beat written and counts as gone after
    # 2 s: recovery after crash() takes about 2 s, and a loaded machine's hiccups do not
    # fence a live worker.
    "heartbeat_interval": 1,
    "reap_interval": 0.25,
    "reconcile_interval": 0.25,
    "retry_base": 0.05,
    "retry_max": 0.5,
    "reconnect_budget": 10,
}

#: Settings of the process around the runtime, which ``running()`` does not start.
NOT_IN_PROCESS = frozenset({
    "database_url", "data_dir", "http_host", "http_port", "detail_token",
    "detail_token_file", "version_file", "log_format", "log_level",
})

#: Seconds between two looks at the state while waiting.
POLL = 0.01


@dataclass(frozen=True)
class DrainReport:
    """What a drain did, from the signal to the stop.

    Attributes:
        exit_code: what ``spectral worker`` would exit with (0 after a clean drain).
        acked: rows acknowledged during the drain (the turns that finished in time).
        released: rows given back at the drain deadline (no attempt charged).
        seconds: from the signal until the runtime had stopped.
    """

    exit_code: int
    acked: int
    released: int
    seconds: float


@dataclass(frozen=True)
class EventState:
    """One outbox row as a test sees it.

    Attributes:
        status: ``PENDING``, ``CLAIMED``, ``DONE`` or ``DEAD``.
        attempts: attempts charged so far (a release at the drain deadline charges none).
        last_error: the last failure stored on the row, or None.
        dead_reason: why it is ``DEAD``, or None.
        handled_by: the handlers whose work committed for it (the ledger).
        claimed_by: the worker holding its claim, or None.
    """

    id: int
    topic: str
    status: str
    attempts: int
    last_error: str | None
    dead_reason: str | None
    handled_by: frozenset[str]
    claimed_by: str | None


class _HasUrl(Protocol):
    @property
    def url(self) -> str: ...


class Runtime:
    """The handle ``running()`` yields: one in-process worker, as ``spectral worker`` runs it."""

    def __init__(
        self, app: App, settings: Settings, store: Store, state: RuntimeState, reader: Store
    ) -> None:
        self._app = app
        self.settings = settings
        self._store = store
        # The test's own look at the database (wait_idle, event): the fixture's pool when
        # there is one, so it still works after the block, and never takes the worker's
        # connections.
        self._reader = reader
        self.state = state
        self._producer = ActorContext("spectral.testing", state.worker_id, state.generation,
                                      state.draining, store, settings.max_payload_bytes)
        self._signals, self._received = trio.open_memory_channel[int](2)
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self.exit_code: int | None = None

    @property
    def worker_id(self) -> str:
        """This worker's ``core.workers`` id."""
        return self.state.worker_id

    @property
    def generation(self) -> int:
        """The generation it claims and stamps."""
        return self.state.generation

    @property
    def counters(self) -> Counters:
        """Claimed, acked, retried, dead, released… since it started."""
        return self.state.counters

    @property
    def stopped(self) -> bool:
        """Whether it has stopped (drained, crashed or failed)."""
        return self._done.is_set()

    async def _run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                self.exit_code = await supervise(
                    self._app, self.settings, self._store, self.state, self._received,
                    task_status=task_status,
                )
        finally:
            self._done.set()

    def _check_running(self, what: str) -> None:
        if self._done.is_set():
            raise RuntimeError(f"{what}: the runtime has stopped")

    async def publish(
        self, topic: str, payload: dict[str, Any], *, available_at: datetime | None = None
    ) -> int:
        """Publish an event of this runtime's generation in its own transaction.

        The checks are those of :func:`spectral.publish` (topic, JSON object, the
        database's payload cap), before any I/O and again in the database.

        Returns:
            The event id.
        """
        return await self._producer.publish(topic, payload, available_at=available_at)

    async def wait_in_flight(self, n: int, timeout: float = 10) -> None:  # noqa: ASYNC109
        """Wait until at least ``n`` turns are running a handler.

        Raises:
            TimeoutError: fewer were running after ``timeout`` seconds.
        """
        with trio.move_on_after(timeout):
            while self._turns() < n:
                self._check_running("wait_in_flight")
                await trio.sleep(POLL)
            return
        raise TimeoutError(f"wait_in_flight({n}): {self._turns()} turns running after {timeout:g}s")

    def _turns(self) -> int:
        return len({event_id for event_id, _ in self.state.in_flight})

    async def wait_idle(self, timeout: float = 10) -> None:  # noqa: ASYNC109
        """Wait until no turn runs and no row of its generation is claimed or due.

        A row counts as due if it becomes due before the wait would time out: a retry
        backing off for a moment is waited for (its next attempt, until it is DONE or
        DEAD); one scheduled later than that (a long backoff, a far ``available_at``) is not.

        Raises:
            TimeoutError: still busy after ``timeout`` seconds.
        """
        unfinished = 0
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline):
            while True:
                self._check_running("wait_idle")
                within = max(deadline - trio.current_time(), 0.0)
                unfinished = await self._reader.unfinished(self.generation, within)
                if unfinished == 0 and not self.state.in_flight:
                    return
                await trio.sleep(POLL)
        raise TimeoutError(
            f"wait_idle: still busy after {timeout:g}s ({unfinished} rows claimed or due, "
            f"{self._turns()} turns running)"
        )

    async def sigterm(self) -> DrainReport:
        """Drain as on SIGTERM and wait until the runtime has stopped.

        The signal takes ``spectral worker``'s own path: claiming stops, running turns get
        until ``drain_timeout``, those still running then are cancelled and their rows
        released, the worker row is marked ``exited``, user actors are cancelled.
        """
        self._check_running("sigterm")
        c = self.state.counters
        acked, released = c.acked, c.released
        started = trio.current_time()
        self._signals.send_nowait(signal.SIGTERM)
        await self._done.wait()
        return DrainReport(
            exit_code=-1 if self.exit_code is None else self.exit_code,
            acked=c.acked - acked, released=c.released - released,
            seconds=trio.current_time() - started,
        )

    async def crash(self) -> None:
        """Stop at once, as on SIGKILL: claims stay, nothing is released or acknowledged,
        the worker row stays ``running``. Another ``running()`` on the same database then
        shows the recovery (the reconciler gives the claims back once the row is stale)."""
        self._check_running("crash")
        self.state.abandoned = True
        self._scope.cancel()
        await self._done.wait()

    async def event(self, event_id: int) -> EventState:
        """The row's status, attempts, last error and the handlers that committed for it.

        Raises:
            LookupError: there is no such event.
        """
        row = await self._reader.event_state(event_id)
        if row is None:
            raise LookupError(f"no event {event_id} in the outbox")
        row["handled_by"] = frozenset(row["handled_by"])
        return EventState(**row)


def resolve_settings(values: Mapping[str, object]) -> Settings:
    """:data:`TEST_DEFAULTS` overridden by ``values``, validated like Spectral's settings.

    Raises:
        ConfigurationError: an unknown name, a bad value, a setting of the process around
            the runtime, or a combination ``spectral worker`` would refuse.
    """
    for name in values:
        if name in NOT_IN_PROCESS:
            raise ConfigurationError(f"running(): {name} does not apply to an in-process runtime")
    return Settings.from_values({**TEST_DEFAULTS, **values})




@asynccontextmanager
async def running(app: App, db: _HasUrl | str, **settings: object) -> AsyncIterator[Runtime]:
    """Run ``app``'s workers in this process on ``db`` until the block ends.

    The runtime is ``spectral worker``'s: the same supervisor, actors, turns and SQL, on a
    pool of its own, running the generation the database's newest deployment names (one
    is allocated on first use). It starts before the block and, if the block did not stop
    it, drains at its end as on SIGTERM. If the block raises, the runtime is cancelled.

    Args:
        app: the application whose handlers, actors and sweeps run.
        db: the ``spectral_db`` fixture, anything with a ``url``, or a database URL.
        **settings: Spectral settings by name (``drain_timeout=2``, ``handler_max=1``,
            ``concurrency=4``…), over :data:`TEST_DEFAULTS`.

    Raises:
        ConfigurationError: a bad setting (see :func:`resolve_settings`) or registration.
    """
    url = db if isinstance(db, str) else db.url
    config = resolve_settings(settings)
    check_startup(app, config)
    try:
        async with open_database(url, pool_size=config.pool_size) as store:
            config, state = await boot(store, url, config)
            reader = db.store if isinstance(db, TestDatabase) else store
            rt = Runtime(app, config, store, state, reader)
            async with trio.open_nursery() as nursery:
                await nursery.start(rt._run)
                yield rt
                if not rt.stopped:
                    await rt.sigterm()
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        if sole is None or isinstance(sole, trio.Cancelled):
            raise
        raise sole from None
