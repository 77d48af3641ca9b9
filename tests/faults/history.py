"""The history checker: what the database and the outside logs say happened.

A :class:`History` is everything one scenario left behind: the events its producers
committed and rolled back (as the producers recorded them), the outbox rows, the
transactional effect rows, the outside effect lines, and the moment the fault was
injected (database clock). :func:`check` turns it into :class:`Figures`; it knows nothing
of the runtime, so its counting is tested on hand-built histories (test_history.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg

from .workload import TOPICS


@dataclass(frozen=True)
class Row:
    """One outbox row as the checker needs it."""

    id: int
    topic: str
    status: str
    dead_reason: str | None
    settled_at: datetime | None  # done_at for DONE, updated_at for DEAD, else None


@dataclass
class History:
    committed: dict[int, str] = field(default_factory=dict)  # event id -> topic
    rolled_back_ids: set[int] = field(default_factory=set)
    rolled_back_markers: set[str] = field(default_factory=set)
    rows: dict[int, Row] = field(default_factory=dict)
    tx_effects: list[tuple[str, int, str | None]] = field(default_factory=list)  # handler, id, marker
    outside: list[tuple[str, int, str | None]] = field(default_factory=list)
    fault_at: datetime | None = None


@dataclass
class Figures:
    """The checker's figures for one scenario (the columns of docs/reliability.md)."""

    scenario: str
    committed: int
    lost: int  # committed, but neither DONE nor DEAD with a reason
    missing_effects: int  # a DONE event without one of its handlers' effects
    dup_tx: int  # transactional effects applied more than once (must be 0)
    dup_outside: int  # outside effects repeated (allowed: at least once)
    rolled_back_effects: int  # anything done for a rolled-back publish (must be 0)
    dead: int  # DEAD with a reason
    recovery_s: float | None  # fault to the last settlement
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the scenario's own expectations

    @property
    def passed(self) -> bool:
        return self.ok and not self.failures

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.missing_effects == 0 and self.dup_tx == 0
                and self.rolled_back_effects == 0)

    def problems(self) -> list[str]:
        found = [f"{name} = {value}" for name, value in (
            ("lost", self.lost), ("missing_effects", self.missing_effects),
            ("dup_tx", self.dup_tx), ("rolled_back_effects", self.rolled_back_effects))
            if value]
        return found


def _repeats(items: list[tuple[str, int, str | None]]) -> Counter[tuple[str, int]]:
    return Counter((handler, event_id) for handler, event_id, _ in items)


def check(scenario: str, history: History) -> Figures:
    """Count what the history shows; see :class:`Figures` for each figure's meaning."""
    lost = 0
    missing = 0
    dead = 0
    tx_seen = _repeats(history.tx_effects)
    outside_seen = _repeats(history.outside)
    settled: list[datetime] = []
    for event_id, topic in history.committed.items():
        row = history.rows.get(event_id)
        if row is None or not (row.status == "DONE" or (row.status == "DEAD" and row.dead_reason)):
            lost += 1
            continue
        if row.settled_at is not None:
            settled.append(row.settled_at)
        if row.status == "DEAD":
            dead += 1
            continue
        tx_handlers, outside_handlers = TOPICS.get(topic, ((), ()))
        missing += sum(1 for h in tx_handlers if tx_seen[(h, event_id)] == 0)
        missing += sum(1 for h in outside_handlers if outside_seen[(h, event_id)] == 0)
    dup_tx = sum(n - 1 for n in tx_seen.values() if n > 1)
    dup_outside = sum(n - 1 for n in outside_seen.values() if n > 1)
    rolled_back = sum(1 for i in history.rolled_back_ids if i in history.rows)
    rolled_back += sum(
        1 for _, event_id, marker in (*history.tx_effects, *history.outside)
        if event_id in history.rolled_back_ids or (marker and marker in history.rolled_back_markers)
    )
    recovery = None
    if history.fault_at is not None and settled and lost == 0:
        recovery = max(0.0, (max(settled) - history.fault_at).total_seconds())
    return Figures(scenario, len(history.committed), lost, missing, dup_tx, dup_outside,
                   rolled_back, dead, recovery)


# --- reading a scenario's history from PostgreSQL and the log folder --------------------


def read_outside(log_dir: Path) -> list[tuple[str, int, str | None]]:
    lines: list[tuple[str, int, str | None]] = []
    for path in sorted(log_dir.glob("outside-*.log")):
        for text in path.read_text().splitlines():
            handler, event_id, marker, _pid = text.split(" ")
            lines.append((handler, int(event_id), None if marker == "-" else marker))
    return lines


async def _read_database(url: str, history: History) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for r in await conn.fetch(
            "SELECT id, topic, status, dead_reason, "
            "CASE status WHEN 'DONE' THEN done_at WHEN 'DEAD' THEN updated_at END AS settled_at "
            "FROM core.outbox"
        ):
            history.rows[r["id"]] = Row(r["id"], r["topic"], r["status"], r["dead_reason"],
                                        r["settled_at"])
        history.tx_effects = [(r["handler"], r["event_id"], r["marker"]) for r in await conn.fetch(
            "SELECT handler, event_id, marker FROM fx_effects")]
    finally:
        await conn.close()


def read(url: str, log_dir: Path, history: History) -> History:
    """Fill ``history`` (whose producer records are set) from the database and the logs."""
    asyncio.run(_read_database(url, history))
    history.outside = read_outside(log_dir)
    return history
