"""The pruner: retention of finished rows and of the runtime's own records.

Without it a busy outbox grows by millions of rows a day. Every worker runs one, but a
pass starts only when no pass is running and none started within the interval (an
advisory lock plus the shared record in core.prune_passes), so a database sees one pass
at a time however many workers it has. A pass deletes in bounded batches with a short
pause between them, oldest first, and stops after a time budget; the next pass goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import trio

from ..db.rows import PruneKind
from ..errors import DatabaseError
from ..state import RuntimeState
from ._switch import live_switch

log = logging.getLogger("spectral.pruner")

#: What a pass deletes, in order, each with the retention setting it uses. Outbox rows
#: come with their ledger rows (counted under "ledger").
KINDS: tuple[tuple[PruneKind, str], ...] = (
    ("done", "retain_done"),
    ("dead", "retain_dead"),
    ("workers", "retain_workers"),
    ("reconcile_passes", "retain_records"),
    ("prune_passes", "retain_records"),
    ("handovers", "retain_records"),
)
#: Every counter a pass reports, in the order of /metrics and `spectral inspect`.
COUNTED = ("done", "dead", "ledger", "lost_workers", "workers", "reconcile_passes",
           "prune_passes", "handovers")


class PrunerStore(Protocol):
    async def prune_enabled_override(self) -> bool | None: ...
    async def begin_prune_pass(self, worker_id: str, min_gap: float, lease: float) -> int | None: ...
    async def finish_prune_pass(
        self, pass_id: int, pruned: dict[str, int], errors: list[str]
    ) -> None: ...
    async def prune(self, kind: PruneKind, retention: float, limit: int) -> tuple[int, int]: ...
    async def mark_lost_workers(self, after: float) -> list[tuple[str, int]]: ...


@dataclass(frozen=True)
class PruneSettings:
    """The pruner's settings (see spectral.config for the variables)."""

    enabled: bool = True  # SPECTRAL_PRUNE_ENABLED; 'spectral prune on|off' overrides it
    interval: float = 60.0  # seconds between passes, across all workers
    batch: int = 1000  # rows per DELETE statement
    pause: float = 0.05  # seconds between two batches of a pass
    budget: float = 120.0  # seconds a pass may run; the next pass continues
    retain_done: float = 86_400.0  # seconds a DONE row is kept after its acknowledgement
    retain_dead: float = 1_209_600.0  # seconds a DEAD row is kept after it became DEAD
    retain_workers: float = 604_800.0  # seconds an exited or lost worker's row is kept
    retain_records: float = 2_592_000.0  # seconds reconcile/prune passes and hand-overs are kept
    lost_after: float = 3_600.0  # seconds without a beat before a worker is marked lost


@dataclass
class PruneReport:
    duration: float
    pruned: dict[str, int]
    errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"duration_seconds": round(self.duration, 4), "pruned": self.pruned,
                "errors": self.errors}


class Pruner:
    """Deletes DONE and DEAD rows past their retention (with their ledger rows), marks
    long-silent workers lost, and deletes old workers' rows, passes and hand-overs.

    Args:
        store: the database (:class:`PrunerStore`).
        state: the process's runtime state; ``state.prune`` is what /queue shows.
        settings: retention and pace.
    """

    def __init__(self, store: PrunerStore, state: RuntimeState, settings: PruneSettings) -> None:
        self._store = store
        self._state = state
        self._settings = settings
        self.passes = 0
        self.skipped = 0
        self.failures = 0
        self.pruned_total: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self.last: PruneReport | None = None
        self._enabled = settings.enabled
        self._publish()

    async def enabled(self) -> bool:
        """The live kill switch: the database override if set, else the process setting."""
        self._enabled = await live_switch(self._store.prune_enabled_override,
                                          self._settings.enabled)
        return self._enabled

    def _publish(self) -> None:
        s = self._settings
        self._state.prune = {
            "enabled": self._enabled, "interval": s.interval, "batch": s.batch,
            "retain_done": s.retain_done, "retain_dead": s.retain_dead,
            "retain_workers": s.retain_workers, "retain_records": s.retain_records,
            "lost_after": s.lost_after,
            "passes": self.passes, "failures": self.failures,
            "pruned_total": dict(self.pruned_total),
            "last_pass_here": None if self.last is None else self.last.as_dict(),
        }

    async def run_once(self) -> PruneReport | None:
        """One pass, unless one runs or ran within the interval elsewhere; None if skipped.

        Raises:
            DatabaseError: the pass could not start (the database is unreachable).
        """
        s = self._settings
        pass_id = await self._store.begin_prune_pass(
            self._state.worker_id, s.interval * 0.8, s.budget + 60.0
        )
        if pass_id is None:
            self.skipped += 1
            return None
        t0 = time.monotonic()
        pruned = dict.fromkeys(COUNTED, 0)
        errors: list[str] = []
        try:
            lost = await self._store.mark_lost_workers(s.lost_after)
        except DatabaseError as exc:
            errors.append(f"lost_workers: {exc}"[:500])
        else:
            pruned["lost_workers"] = len(lost)
            for worker_id, generation in lost:
                log.warning("worker %s marked lost: no heartbeat for over %.0fs", worker_id,
                            s.lost_after, extra={"worker_id": worker_id, "generation": generation})
        for kind, setting in KINDS:
            try:
                await self._prune_kind(kind, getattr(s, setting), pruned, t0)
            except DatabaseError as exc:  # one failing kind never stops the rest
                errors.append(f"{kind}: {exc}"[:500])
                log.warning("prune of %s failed: %s", kind, exc,
                            extra={"worker_id": self._state.worker_id})
        duration = time.monotonic() - t0
        try:
            await self._store.finish_prune_pass(pass_id, pruned, errors)
        except DatabaseError as exc:
            errors.append(f"finish: {exc}"[:500])
        report = PruneReport(duration, pruned, errors)
        self.passes += 1
        self.failures += 1 if errors else 0
        for counter, n in pruned.items():
            self.pruned_total[counter] += n
        self.last = report
        self._publish()
        if any(pruned.values()) or errors:
            log.info("prune pass", extra={"worker_id": self._state.worker_id, "pruned": pruned,
                                          "errors": len(errors), "duration": round(duration, 4)})
        return report

    async def _prune_kind(self, kind: PruneKind, retention: float, pruned: dict[str, int],
                          t0: float) -> None:
        s = self._settings
        while True:
            rows, ledger = await self._store.prune(kind, retention, s.batch)
            pruned[kind] += rows
            pruned["ledger"] += ledger
            if rows < s.batch or time.monotonic() - t0 > s.budget:
                return
            # A short pause between batches: other sessions get the locks, I/O and WAL
            # bandwidth in between, and autovacuum keeps up.
            await trio.sleep(s.pause)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Prune every interval while enabled (the live switch is read before each pass).

        Cancellation: a pass in flight is abandoned between two statements (each batch is
        its own transaction); its record stays unfinished and blocks other passes only
        until the pass budget plus a minute has passed.

        Error handling: a failed pass is logged and the next one runs on schedule.
        """
        task_status.started()
        while True:
            try:
                if await self.enabled():
                    await self.run_once()
                else:
                    self._publish()
            except DatabaseError as exc:
                self.failures += 1
                self._publish()
                log.warning("prune pass failed: %s", exc,
                            extra={"worker_id": self._state.worker_id})
            await trio.sleep(self._settings.interval)
