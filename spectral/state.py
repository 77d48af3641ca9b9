"""The runtime's shared, observable state: what each actor reports and reacts to.

One :class:`RuntimeState` per process. Actors write to it; the supervisor, the HTTP
surface and tests read it. Everything here is trio-thread only, except
:meth:`RuntimeState.stuck_turns`, which the drain watchdog thread reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass
class Counters:
    claimed: int = 0
    acked: int = 0
    retried: int = 0
    dead: int = 0
    released: int = 0
    reaped: int = 0
    lost_claims: int = 0
    reconnects: int = 0
    notifications: int = 0
    polls: int = 0


@dataclass
class InFlight:
    event_id: int
    topic: str
    handler: str
    started: float  # time.monotonic()


@dataclass
class RuntimeState:
    """Shared state of one worker process."""

    worker_id: str
    generation: int
    counters: Counters = field(default_factory=Counters)
    draining: trio.Event = field(default_factory=trio.Event)
    drain_deadline: float = float("inf")  # trio.current_time() units
    listener_mode: str = "starting"  # "notify" or "poll-only"
    listener_note: str | None = None  # why poll-only is intended (a kill switch, a pooler)
    last_notification: float | None = None  # time.monotonic()
    down: set[str] = field(default_factory=set)  # consumers reconnecting now
    recovered: bool = False  # a reconnect happened since the last beat was written
    in_flight: dict[tuple[int, str], InFlight] = field(default_factory=dict)
    turn_observer: Callable[[float, float], None] | None = None  # (turn s, due-to-done s)
    topic_observer: Callable[[str, float], None] | None = None  # (topic, due-to-done s)
    stopped: trio.Event = field(default_factory=trio.Event)  # workers done; HTTP may stop
    last_beat: float | None = None  # time.monotonic() of the last heartbeat written
    lease_renewed: float | None = None  # trio.current_time() of the last row write
    last_reap: float | None = None  # time.monotonic() of the reaper's last pass
    reconcile: dict[str, Any] | None = None  # the reconciler's settings and last pass
    # Set before cancelling to stop as a SIGKILL would (spectral.testing's crash()): the
    # claimer writes no releases and the heartbeat does not mark the worker exited.
    abandoned: bool = False
    prune: dict[str, Any] | None = None  # the pruner's settings, totals and last pass here
    _wake: trio.Event = field(default_factory=trio.Event)
    _health_changed: trio.Event = field(default_factory=trio.Event)

    # --- waking the claimer ---------------------------------------------------------

    def wake(self) -> None:
        """Tell the claimer there may be work (NOTIFY, reconnect, reconciler)."""
        self._wake.set()

    async def wait_for_work(self, seconds: float) -> bool:
        """Wait for a wake-up, the drain or ``seconds``; True if woken (the drain wakes
        too: the claimer must see it at once)."""
        woken = False
        with trio.move_on_after(seconds):
            await self._wake.wait()
            woken = True
        self._wake = trio.Event()
        return woken

    # --- health ---------------------------------------------------------------------

    @property
    def worker_state(self) -> str:
        """What the heartbeat writes: 'reconnecting' while any consumer is down."""
        return "reconnecting" if self.down or self.recovered else "running"

    def consumer_down(self, name: str) -> None:
        if name not in self.down:
            self.down.add(name)
            self.counters.reconnects += 1
            self._health_changed.set()

    def consumer_up(self, name: str) -> None:
        if name in self.down:
            self.down.discard(name)
            self.recovered = True
            self._health_changed.set()

    async def wait_health_changed(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._health_changed.wait()
        self._health_changed = trio.Event()

    # --- the worker's lease ------------------------------------------------------------

    def renew_lease(self) -> None:
        """The heartbeat wrote the worker row: its claims are safe from the reconciler."""
        self.lease_renewed = trio.current_time()

    def lease_age(self) -> float | None:
        """Seconds since the worker row was last written (None before the first write)."""
        if self.lease_renewed is None:
            return None
        return trio.current_time() - self.lease_renewed

    # --- drain ----------------------------------------------------------------------

    def begin_drain(self, budget: float) -> None:
        if not self.draining.is_set():
            self.drain_deadline = trio.current_time() + budget
            self.draining.set()
            self._wake.set()

    def stuck_turns(self) -> list[InFlight]:
        return list(self.in_flight.values())

    def last_notification_age(self) -> float | None:
        if self.last_notification is None:
            return None
        return time.monotonic() - self.last_notification
