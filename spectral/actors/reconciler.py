"""The reconciler: a periodic sweep that re-derives stuck work from the database.

It holds no state of its own between passes: everything it acts on is read from the
database, so a reconciler started fresh, or on another worker, finds the same work.
One pass runs per interval across all workers of a database (an advisory lock plus the
shared record in core.reconcile_passes); a failed sweep is logged and the others run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn, Protocol

import trio

from ..app import App
from ..db import TurnTx
from ..errors import DatabaseError, SpectralError
from ..state import RuntimeState
from ..tx import Tx
from ._switch import live_switch

log = logging.getLogger("spectral.reconciler")


class ReconcilerStore(Protocol):
    async def reconcile_enabled_override(self) -> bool | None: ...
    async def begin_reconcile_pass(
        self, worker_id: str, generation: int, min_gap: float
    ) -> tuple[int, datetime] | None: ...
    async def finish_reconcile_pass(
        self, pass_id: int, unblocked: dict[str, int], errors: list[str]
    ) -> None: ...
    async def sweep_lost_wakeups(self, grace: float, stale: float) -> dict[int, int]: ...
    async def sweep_orphaned_claims(self, stale: float) -> list[tuple[int, int, str | None]]: ...
    async def sweep_parked_heads(self) -> list[tuple[int, int]]: ...
    async def sweep_retired_generations(
        self, grace: float, stale: float, policy: str
    ) -> tuple[list[int], int | None, dict[int, list[int]]]: ...
    async def stale_workers(self, stale: float) -> list[dict[str, Any]]: ...
    async def open_transaction(self) -> TurnTx: ...


@dataclass(frozen=True)
class ReconcileSettings:
    """The reconciler's settings (see spectral.config for the variables)."""

    enabled: bool = True  # the process default; 'spectral reconcile on|off' overrides it
    interval: float = 30.0  # seconds between passes, across all workers
    grace: float = 120.0  # seconds before a waiting row counts as stuck
    notify_unblock: bool = False  # WARNING line and app hook per unblocked item
    stale_after: float = 60.0  # seconds without a beat before a worker is gone
    retire_policy: str = "adopt"  # adopt, dead or keep
    retire_grace: float = 300.0  # seconds before a generation with no live worker retires
    max_payload_bytes: int = 262_144


@dataclass
class PassReport:
    started_at: datetime
    duration: float
    unblocked: dict[str, int]
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(),
            "duration_seconds": round(self.duration, 4),
            "unblocked": self.unblocked,
            "errors": self.errors,
        }


class Reconciler:
    """Sweeps lost wake-ups, orphaned claims, retired generations, stale workers and the
    app's own sweeps, once per interval across every worker of the database."""

    def __init__(
        self, store: ReconcilerStore, state: RuntimeState, app: App, settings: ReconcileSettings,
        *, rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._state = state
        self._app = app
        self._settings = settings
        self._rng = rng or random.Random()
        self.passes = 0
        self.skipped = 0
        self.failures = 0
        self.unblocked_total: dict[str, int] = {}
        self.last: PassReport | None = None
        self._publish_block(enabled=settings.enabled)

    def _publish_block(self, *, enabled: bool) -> None:
        s = self._settings
        self._state.reconcile = {
            "enabled": enabled, "interval": s.interval, "grace": s.grace,
            "notify_unblock": s.notify_unblock, "retire_policy": s.retire_policy,
            "passes": self.passes, "failures": self.failures,
            "unblocked_total": dict(self.unblocked_total),
            "last_pass_here": None if self.last is None else self.last.as_dict(),
        }

    async def enabled(self) -> bool:
        """The live kill switch: the database override if set, else the process setting."""
        return await live_switch(self._store.reconcile_enabled_override, self._settings.enabled)

    async def run_once(self) -> PassReport | None:
        """One pass, unless another worker ran one within the interval; None when skipped."""
        s = self._settings
        begun = await self._store.begin_reconcile_pass(
            self._state.worker_id, self._state.generation, s.interval * 0.8
        )
        if begun is None:
            self.skipped += 1
            return None
        pass_id, started_at = begun
        t0 = time.monotonic()
        unblocked: dict[str, int] = {}
        errors: list[str] = []
        sweeps: list[tuple[str, Callable[[], Awaitable[list[int] | int]]]] = [
            ("lost_wakeups", self._lost_wakeups),
            ("orphaned_claims", self._orphaned_claims),
            ("parked_heads", self._parked_heads),
            ("retired_generations", self._retired_generations),
            ("stale_workers", self._stale_workers),
        ]
        for spec in self._app.sweeps:
            grace = s.grace if spec.grace is None else spec.grace
            cutoff = started_at - timedelta(seconds=grace)
            sweeps.append((spec.name, _user_sweep(self._store, spec.fn, cutoff, self._state,
                                                  s.max_payload_bytes)))
        for name, sweep in sweeps:
            try:
                result = await sweep()
            except (SpectralError, Exception) as exc:  # one failing sweep never stops the rest
                errors.append(f"{name}: {type(exc).__name__}: {exc}"[:500])
                log.warning("reconcile sweep %s failed: %s", name, exc,
                            extra={"worker_id": self._state.worker_id, "sweep": name})
                continue
            count = result if isinstance(result, int) else len(result)
            unblocked[name] = count
            if count and name != "stale_workers":
                await self._report(name, count, [] if isinstance(result, int) else result)
        duration = time.monotonic() - t0
        try:
            await self._store.finish_reconcile_pass(pass_id, unblocked, errors)
        except DatabaseError as exc:
            errors.append(f"finish: {exc}")
        report = PassReport(started_at, duration, unblocked, errors)
        self.passes += 1
        self.failures += 1 if errors else 0
        for name, count in unblocked.items():
            if name != "stale_workers":
                self.unblocked_total[name] = self.unblocked_total.get(name, 0) + count
        self.last = report
        self._publish_block(enabled=True)
        log.info("reconcile pass", extra={"worker_id": self._state.worker_id,
                                          "unblocked": unblocked, "errors": len(errors),
                                          "duration": round(duration, 4)})
        return report

    async def _report(self, sweep: str, count: int, ids: list[int]) -> None:
        if not self._settings.notify_unblock:
            return
        log.warning("reconciler unblocked %d items in %s", count, sweep,
                    extra={"worker_id": self._state.worker_id, "sweep": sweep,
                           "ids": ids[:100]})
        hook = self._app.unblock_hook
        if hook is not None:
            try:
                await hook(sweep, count, ids)
            except Exception:
                log.exception("the on_unblock hook failed", extra={"sweep": sweep})

    async def _lost_wakeups(self) -> int:
        s = self._settings
        stuck = await self._store.sweep_lost_wakeups(s.grace, s.stale_after)
        if stuck.get(self._state.generation):
            self._state.wake()
        for generation, n in stuck.items():
            log.warning("%d due rows waited over %.0fs: woke generation %d's claimers", n,
                        s.grace, generation, extra={"generation": generation})
        return sum(stuck.values())

    async def _orphaned_claims(self) -> list[int]:
        released = await self._store.sweep_orphaned_claims(self._settings.stale_after)
        for event_id, generation, claimed_by in released:
            log.warning("released an orphaned claim", extra={
                "event_id": event_id, "generation": generation, "claimed_by": claimed_by})
        if any(g == self._state.generation for _, g, _ in released):
            self._state.wake()
        return [r[0] for r in released]

    async def _parked_heads(self) -> list[int]:
        unparked = await self._store.sweep_parked_heads()
        for event_id, generation in unparked:
            log.warning("put back a parked row that heads its key", extra={
                "event_id": event_id, "generation": generation})
        if any(g == self._state.generation for _, g in unparked):
            self._state.wake()
        return [r[0] for r in unparked]

    async def _retired_generations(self) -> list[int]:
        s = self._settings
        retired, target, moved = await self._store.sweep_retired_generations(
            s.retire_grace, s.stale_after, s.retire_policy
        )
        for generation in retired:
            log.warning("generation %d retired (no live worker for %.0fs); policy %s",
                        generation, s.retire_grace, s.retire_policy,
                        extra={"generation": generation})
        ids: list[int] = []
        for source, moved_ids in moved.items():
            ids.extend(moved_ids)
            log.warning("%d rows of retired generation %d handed over by the policy it was "
                        "retired with (see core.generation_handovers)", len(moved_ids), source,
                        extra={"generation": source, "newest_live_generation": target})
        if target == self._state.generation and ids:
            self._state.wake()
        return ids

    async def _stale_workers(self) -> int:
        stale = await self._store.stale_workers(self._settings.stale_after)
        return len(stale)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Pass every interval (with jitter) while enabled.

        Cancellation: a pass in flight is abandoned; its record stays unfinished and the
        next pass, here or elsewhere, redoes the work from the database.

        Error handling: a failed pass is logged and the next one runs on schedule.
        """
        task_status.started()
        # A fresh start waits a random part of the interval so workers spread out.
        await trio.sleep(self._rng.uniform(0, min(1.0, self._settings.interval)))
        while True:
            enabled = await self.enabled()
            if enabled:
                try:
                    await self.run_once()
                except DatabaseError as exc:
                    self.failures += 1
                    log.warning("reconcile pass failed: %s", exc,
                                extra={"worker_id": self._state.worker_id})
            self._publish_block(enabled=enabled)
            await trio.sleep(self._settings.interval * self._rng.uniform(0.9, 1.1))


def _user_sweep(
    store: ReconcilerStore, fn: Callable[[Tx, datetime], Awaitable[int]], cutoff: datetime,
    state: RuntimeState, max_payload_bytes: int,
) -> Callable[[], Awaitable[int]]:
    async def sweep() -> int:
        turn = await store.open_transaction()
        tx = Tx(turn, state.generation, max_payload_bytes)
        try:
            count = await fn(tx, cutoff)
            if not isinstance(count, int) or isinstance(count, bool):
                raise TypeError(f"a sweep must return how many items it unblocked, got {count!r}")
        except BaseException:
            await turn.rollback()
            raise
        await turn.commit()
        return count

    return sweep



