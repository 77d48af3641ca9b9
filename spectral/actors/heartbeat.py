"""The heartbeat: this process's ``core.workers`` row, on a connection of its own."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, NoReturn, Protocol

import trio

from ..errors import DatabaseError, DatabaseUnavailableError
from ..state import RuntimeState
from ._backoff import Reconnector

log = logging.getLogger("spectral.heartbeat")


class HeartbeatConnection(Protocol):
    def is_closed(self) -> bool: ...
    async def register_worker(self, *args: Any) -> None: ...
    async def beat(self, worker_id: str, state: str) -> bool: ...
    async def mark_exited(self, worker_id: str) -> None: ...
    async def aclose(self) -> None: ...


class HeartbeatStore(Protocol):
    async def connect(self, application_name: str) -> HeartbeatConnection: ...


class Heartbeat:
    """Registers the worker on boot, refreshes ``last_seen``, marks it ``exited`` at the end.

    It writes every ``interval`` seconds and at once when a consumer goes down or comes
    back, so the row shows ``reconnecting`` for an outage as soon as it can be written,
    keeps it for a moment (up to 1 s) after every consumer is back, then ``running``.
    It uses a dedicated connection, outside the pool handlers use.
    """

    def __init__(
        self, store: HeartbeatStore, state: RuntimeState, *, interval: float,
        reconnect_budget: float, environment: str, service: str,
    ) -> None:
        self._store = store
        self._state = state
        self._interval = interval
        self._environment = environment
        self._service = service
        self._reconnect = Reconnector("heartbeat", state, reconnect_budget)
        self._conn: HeartbeatConnection | None = None
        self.beats = 0
        self._hold = min(interval, 1.0)

    async def _connection(self) -> HeartbeatConnection:
        if self._conn is None:
            conn = await self._store.connect("spectral-heartbeat")
            try:
                await conn.register_worker(
                    self._state.worker_id, self._state.generation, self._environment,
                    self._service, socket.gethostname(), os.getpid(),
                    self._state.worker_state, self._interval,
                )
            except BaseException:
                await conn.aclose()
                raise
            self._conn = conn
            self._state.renew_lease()
        return self._conn

    async def run_once(self) -> str:
        """Write one beat; returns the state written."""
        conn = await self._connection()
        written = self._state.worker_state
        try:
            if not await conn.beat(self._state.worker_id, written):
                # An operator deleted the row: register again.
                self._conn = None
                await conn.aclose()
                conn = await self._connection()
        except DatabaseUnavailableError:
            self._conn = None
            await conn.aclose()
            raise
        except DatabaseError as exc:
            if not conn.is_closed():
                raise
            # asyncpg says "connection is closed" (InterfaceError) when the server went
            # away before the call: the connection is lost, not a bug.
            self._conn = None
            await conn.aclose()
            raise DatabaseUnavailableError(f"heartbeat connection lost: {exc}") from None
        self.beats += 1
        self._state.last_beat = time.monotonic()
        self._state.renew_lease()
        return written

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Register, then beat forever.

        Args:
            task_status: started once the worker row is registered.

        Cancellation:
            Marks the row ``exited`` (shielded, bounded) and closes the connection.

        Error handling:
            A lost connection is retried with backoff within the reconnect budget.
        """
        try:
            while True:
                try:
                    await self._connection()
                    break
                except DatabaseUnavailableError as exc:
                    await self._reconnect.failed(exc)
            self._reconnect.succeeded()
            self._state.recovered = False
            log.info("worker registered", extra={"worker_id": self._state.worker_id,
                                                 "generation": self._state.generation})
            task_status.started()
            while True:
                try:
                    written = await self.run_once()
                    self._reconnect.succeeded()
                except DatabaseUnavailableError as exc:
                    await self._reconnect.failed(exc)
                    continue
                except DatabaseError as exc:
                    # e.g. a read-only server after a failover: keep beating on schedule.
                    log.warning("heartbeat failed: %s", exc,
                                extra={"worker_id": self._state.worker_id})
                    await self._state.wait_health_changed(self._interval)
                    continue
                if written == "reconnecting" and not self._state.down:
                    # Every consumer is back: keep the outage visible for a moment, then
                    # write 'running' at once.
                    await trio.sleep(self._hold)
                    self._state.recovered = False
                    continue
                await self._state.wait_health_changed(self._interval)
        finally:
            await self._exit()

    async def _exit(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._state.abandoned:  # a simulated SIGKILL: the row stays 'running'
            await conn.aclose()
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                try:
                    await conn.mark_exited(self._state.worker_id)
                    log.info("worker exited", extra={"worker_id": self._state.worker_id})
                except DatabaseError as exc:
                    log.warning("could not mark the worker exited: %s", exc)
            await conn.aclose()
