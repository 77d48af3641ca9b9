"""Cached views of the queue for the HTTP surface and metrics.

Requests never query the database themselves: they read a snapshot at most
``max_age`` seconds old, refreshed by one query set at a time however many requests
arrive, so a flood of scrapes costs the database nothing extra.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from .db._queries import OBSERVE, OUTBOX
from .errors import DatabaseError

log = logging.getLogger("spectral.observe")

#: Blocked keys listed in /queue (the count covers them all).
BLOCKED_KEYS_SHOWN = 20



class ObserveStore(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def outbox_counts(self) -> list[dict[str, Any]]: ...
    async def latest_deployments(self, limit: int = 5) -> list[dict[str, Any]]: ...
    async def last_reconcile_pass(self) -> dict[str, Any] | None: ...


class QueueSnapshot:
    """The outbox by generation x status, workers by generation, the deployments head."""

    def __init__(self, store: ObserveStore, *, stale_after: float, max_age: float = 2.0) -> None:
        self._store = store
        self._stale_after = stale_after
        self._max_age = max_age
        self._lock = trio.Lock()
        self._at = -float("inf")
        self.data: dict[str, Any] = {}
        self.error: str | None = None
        self.schema_version: int | None = None

    @property
    def database_ok(self) -> bool:
        return self.error is None and bool(self.data)

    async def get(self) -> dict[str, Any]:
        """The snapshot, refreshed first when older than ``max_age``."""
        if trio.current_time() - self._at > self._max_age:
            async with self._lock:
                if trio.current_time() - self._at > self._max_age:
                    await self.refresh()
        return self.data

    async def refresh(self) -> None:
        try:
            outbox = await self._store.outbox_counts()
            workers = await self._store.fetch(OBSERVE.workers_by_generation, self._stale_after)
            deployments = [d for d in await self._store.latest_deployments(5)
                           if d.get("retired_at") is None]
            self.schema_version = int(await self._store.fetchval(OBSERVE.schema_version))
            last_pass = await self._store.last_reconcile_pass()
            blocked = await self._store.fetch(OUTBOX.blocked_keys, BLOCKED_KEYS_SHOWN)
            blocked_count = int(await self._store.fetchval(OUTBOX.blocked_key_count))
            oldest_due = await self._store.fetch(OUTBOX.oldest_due)
        except DatabaseError as exc:
            self.error = str(exc)
            self._at = trio.current_time()
            log.warning("queue snapshot failed: %s", exc)
            return
        self.error = None
        self._at = trio.current_time()
        self.data = {
            "outbox": [
                {"generation": r["generation"], "status": r["status"], "count": r["n"]}
                for r in outbox
            ],
            "workers": [
                {"generation": r["generation"], "state": r["state"], "count": r["n"],
                 "stale": r["stale"], "most_recent_beat": r["most_recent_beat"].isoformat()}
                for r in workers
            ],
            "deployments_head": deployments[0]["generation"] if deployments else None,
            # Keys held by a DEAD event (per-key ordering): the count, and the first heads.
            "blocked_keys": {
                "count": blocked_count,
                "heads": [{"key": b["key"], "head_id": b["head_id"], "topic": b["topic"],
                           "generation": b["generation"], "waiting": b["waiting"],
                           "dead_reason": b["dead_reason"]} for b in blocked],
            },
            # Seconds the oldest due PENDING event has waited, by generation.
            "oldest_due": {r["generation"]: r["age"] for r in oldest_due},
            "last_reconcile_pass": None if last_pass is None else {
                "worker_id": last_pass["worker_id"],
                "started_at": last_pass["started_at"].isoformat(),
                "finished_at": None if last_pass["finished_at"] is None
                else last_pass["finished_at"].isoformat(),
                "duration_seconds": None if last_pass["finished_at"] is None else round(
                    (last_pass["finished_at"] - last_pass["started_at"]).total_seconds(), 4),
                "unblocked": last_pass["unblocked"],
                "errors": last_pass["errors"],
            },
        }
