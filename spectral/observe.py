"""Cached views of the queue for the HTTP surface and metrics.

Requests never query the database themselves: they read a snapshot at most
``max_age`` seconds old, refreshed by one query set at a time however many requests
arrive, so a flood of scrapes costs the database nothing extra.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from .db.store import DEAD_COUNT_CAP
from .errors import DatabaseError
from .verdicts import health_verdicts

log = logging.getLogger("spectral.observe")



class ObserveStore(Protocol):
    async def snapshot(self, stale_after: float) -> dict[str, Any]: ...


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def _pass_view(row: dict[str, Any] | None, result_key: str) -> dict[str, Any] | None:
    if row is None:
        return None
    finished = row["finished_at"]
    return {
        "worker_id": row["worker_id"],
        "started_at": _iso(row["started_at"]),
        "finished_at": _iso(finished),
        "duration_seconds": None if finished is None else round(
            (finished - row["started_at"]).total_seconds(), 4),
        result_key: row[result_key],
        "errors": row["errors"],
    }


def health_view(tables: list[dict[str, Any]], horizon: dict[str, Any],
                counted: int) -> dict[str, Any]:
    """The outbox's health for /queue, /metrics and `spectral inspect`: table statistics,
    the xmin horizon, the estimated DONE rows (statistics minus the counted backlog)."""
    outbox = next((t for t in tables if t["table"] == "outbox"), None)
    return {
        "tables": [
            {"table": t["table"], "live_tuples": int(t["live_tuples"]),
             "dead_tuples": int(t["dead_tuples"]), "total_bytes": int(t["total_bytes"]),
             "last_vacuum": _iso(t["last_vacuum"]), "last_analyze": _iso(t["last_analyze"])}
            for t in tables
        ],
        "xmin_horizon": {
            "oldest_xact_seconds": None if horizon["oldest_xact_seconds"] is None
            else round(horizon["oldest_xact_seconds"], 3),
            "oldest_xact": horizon["oldest_xact"],
            "slot_xid_age": horizon["slot_xid_age"],
            "oldest_prepared_seconds": horizon["oldest_prepared_seconds"],
        },
        "done_estimate": None if outbox is None
        else max(0, int(outbox["live_tuples"]) - counted),
        # health_verdicts judges the horizon first, then each table in order.
        "verdicts": [
            {**v.as_dict(), "check": check} for v, check in zip(
                health_verdicts(tables, horizon),
                ["xmin_horizon", *(str(t["table"]) for t in tables)], strict=True)
        ],
    }


class QueueSnapshot:
    """The outbox's backlog by generation x status, workers by generation, the deployments
    head, the last reconcile and prune passes, and the outbox's health.

    Every query it runs costs O(pending + claimed + workers): finished rows are
    estimated from the statistics views, never counted."""

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
            rows = await self._store.snapshot(self._stale_after)
        except DatabaseError as exc:
            self.error = str(exc)
            self._at = trio.current_time()
            log.warning("queue snapshot failed: %s", exc)
            return
        self.error = None
        self._at = trio.current_time()
        self.schema_version = rows["schema_version"]
        outbox, workers = rows["outbox"], rows["workers"]
        deployments = [d for d in rows["deployments"] if d.get("retired_at") is None]
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
            "last_reconcile_pass": _pass_view(rows["last_reconcile_pass"], "unblocked"),
            "last_prune_pass": _pass_view(rows["last_prune_pass"], "pruned"),
            "health": health_view(rows["tables"], rows["horizon"],
                                  sum(int(r["n"]) for r in outbox)),
            "dead_count_capped": sum(int(r["n"]) for r in outbox if r["status"] == "DEAD")
            >= DEAD_COUNT_CAP,
        }
