"""The outbox listener: LISTEN/NOTIFY wake-ups for the claimer, polling as the guarantee."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NoReturn, Protocol

import trio

from ..errors import DatabaseError, DatabaseUnavailableError
from ..state import RuntimeState
from ._backoff import Reconnector

log = logging.getLogger("spectral.listener")

#: The NOTIFY channel; versioned so a future payload format can use a new one.
CHANNEL = "spectral_outbox_v1"


class ListenConnection(Protocol):
    def is_closed(self) -> bool: ...
    async def ping(self) -> None: ...
    async def aclose(self) -> None: ...


class ListenerStore(Protocol):
    async def listen(
        self, channel: str, on_notify: Callable[[str], None], on_terminate: Callable[[], None]
    ) -> ListenConnection: ...


class OutboxListener:
    """Wakes the claimer when a NOTIFY for this generation arrives.

    NOTIFY is a hint: the claimer polls every ``poll_interval`` regardless, so a lost
    notification delays work by at most one poll. After every (re)connect the listener
    LISTENs again and wakes the claimer at once, because notifications sent while it was
    disconnected are gone.

    Observable in :class:`RuntimeState`: ``listener_mode`` ('notify' or 'poll-only'),
    ``counters.reconnects``, ``last_notification``.
    """

    def __init__(
        self, store: ListenerStore, state: RuntimeState, *, reconnect_budget: float,
        check_interval: float = 10.0,
    ) -> None:
        self._store = store
        self._state = state
        self._reconnect = Reconnector("listener", state, reconnect_budget)
        self._check_interval = check_interval
        self._lost = trio.Event()
        self._mine = str(state.generation)

    def _on_notify(self, payload: str) -> None:
        # Runs on the trio thread via asyncio's call_soon; it must never raise.
        try:
            self._state.counters.notifications += 1
            self._state.last_notification = time.monotonic()
            if payload in ("", self._mine):
                self._state.wake()
        except Exception:  # pragma: no cover - defensive, an escape would kill the loop
            log.exception("notification callback failed")

    def _on_terminate(self) -> None:
        try:
            self._lost.set()
        except Exception:  # pragma: no cover
            log.exception("termination callback failed")

    async def run_once(self) -> ListenConnection:
        """Connect and LISTEN; then wake the claimer (anything missed is polled)."""
        self._lost = trio.Event()
        conn = await self._store.listen(CHANNEL, self._on_notify, self._on_terminate)
        self._state.listener_mode = "notify"
        self._state.wake()
        return conn

    async def listen(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Run forever: LISTEN, watch the connection, reconnect when it drops.

        Args:
            task_status: started once the first LISTEN succeeded.

        Cancellation:
            Closes the connection (shielded, bounded) and re-raises.

        Error handling:
            A lost connection puts the worker in poll-only mode and reconnects with
            backoff; after SPECTRAL_RECONNECT_BUDGET seconds of failures it raises
            :class:`ReconnectBudgetExhaustedError`, which fails the process.
        """
        started = False
        while True:
            try:
                conn = await self.run_once()
            except DatabaseUnavailableError as exc:
                self._state.listener_mode = "poll-only"
                if not started:
                    started = True
                    task_status.started()
                await self._reconnect.failed(exc)
                continue
            self._reconnect.succeeded()
            log.info("listening on %s", CHANNEL, extra={"worker_id": self._state.worker_id,
                                                       "generation": self._state.generation})
            if not started:
                started = True
                task_status.started()
            try:
                await self._watch(conn)
            finally:
                await conn.aclose()
            self._state.listener_mode = "poll-only"
            log.warning("listener connection lost; polling until it is back",
                        extra={"worker_id": self._state.worker_id})
            self._state.consumer_down("listener")

    async def _watch(self, conn: ListenConnection) -> None:
        """Return when the connection is gone (terminated, closed or failing a ping)."""
        while True:
            with trio.move_on_after(self._check_interval):
                await self._lost.wait()
                return
            if conn.is_closed():
                return
            try:
                await conn.ping()
            except DatabaseError:
                return

    run = listen
