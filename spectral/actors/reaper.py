"""The reaper: rows whose claim lapsed go back to PENDING."""

from __future__ import annotations

import logging
import time
from typing import NoReturn, Protocol

import trio

from ..errors import DatabaseError
from ..state import RuntimeState

log = logging.getLogger("spectral.reaper")

#: Rows reaped per query; a pass repeats until a query returns fewer.
REAP_BATCH = 500


class ReaperStore(Protocol):
    async def reap(self, limit: int) -> list[tuple[int, int, str | None]]: ...


class Reaper:
    """Every ``interval`` seconds, returns CLAIMED rows whose ``claim_expires_at`` passed.

    Safe with many workers reaping at once (``FOR UPDATE SKIP LOCKED``); a row whose turn
    transaction is still open is locked and skipped. Each reaped row is charged an
    attempt; a row that keeps killing its worker becomes DEAD after ``max_attempts``.
    """

    def __init__(self, store: ReaperStore, state: RuntimeState, *, interval: float) -> None:
        self._store = store
        self._state = state
        self._interval = interval
        self.passes = 0

    async def run_once(self) -> int:
        """One pass; returns how many rows were reaped."""
        total = 0
        while True:
            rows = await self._store.reap(REAP_BATCH)
            for event_id, generation, claimed_by in rows:
                log.warning(
                    "claim expired; row back to PENDING",
                    extra={"worker_id": self._state.worker_id, "event_id": event_id,
                           "generation": generation, "claimed_by": claimed_by},
                )
            total += len(rows)
            if len(rows) < REAP_BATCH:
                break
        self.passes += 1
        self._state.last_reap = time.monotonic()
        self._state.counters.reaped += total
        if total:
            self._state.wake()
        return total

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Reap forever.

        Cancellation: nothing to clean up; a pass is one transaction.

        Error handling: a failed pass is logged and the next one runs on schedule.
        """
        task_status.started()
        while True:
            try:
                await self.run_once()
            except DatabaseError as exc:
                log.warning("reaper pass failed: %s", exc)
            await trio.sleep(self._interval)
