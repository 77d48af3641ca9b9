"""The runbook's three views and their verdicts, for `spectral inspect`.

Healthy: the running workers' newest generation matches the head of core.deployments.
Lag: a deploy is in flight, or workers have not picked up the new generation yet.
Stale workers: a worker that is not 'exited' and has not beaten for longer than the
stale threshold (a crash or a disconnect; the reaper recovers its rows, the row stays).
Lost workers: stale for longer than SPECTRAL_WORKER_LOST_AFTER, marked 'lost' by the
pruner; no verdict counts them, the pruner deletes them with the exited ones.
Rows of retired generations: PENDING or CLAIMED rows in a generation older than the head
that no live worker serves: nothing will claim them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    name: str  # healthy, lag, stale_workers, stranded_rows, no_workers, no_deployments
    ok: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "message": self.message}


def verdicts(
    deployments: list[dict[str, Any]], workers: list[dict[str, Any]], outbox: list[dict[str, Any]],
    stale_after: float,
) -> list[Verdict]:
    """Judge the three views. ``workers`` rows carry worker_id, generation, state, stale."""
    found: list[Verdict] = []
    # The head is the newest generation in service: a retired or rolled-back one is not.
    head = max((int(d["generation"]) for d in deployments if d.get("retired_at") is None),
               default=None)
    live = [w for w in workers if w["state"] not in ("exited", "lost") and not w["stale"]]
    live_generations = {int(w["generation"]) for w in live}
    if head is None:
        found.append(Verdict("no_deployments", False,
                             "no generation allocated yet: run 'spectral deploy allocate'"))
    elif not live:
        found.append(Verdict("no_workers", False, f"no live worker; the head is generation {head}"))
    else:
        newest = max(live_generations)
        if newest == head:
            found.append(Verdict("healthy", True,
                                 f"healthy: the workers' max generation {newest} matches the head"))
        else:
            found.append(Verdict(
                "lag", False,
                f"lag: the head is generation {head} but the workers' max is {newest}: a deploy is "
                "in flight or workers have not picked up the new generation yet",
            ))
    stale = [w for w in workers if w["stale"]]
    if stale:
        names = ", ".join(f"{w['worker_id']} (gen {w['generation']})" for w in stale)
        found.append(Verdict(
            "stale_workers", False,
            f"{len(stale)} stale workers (no heartbeat for over {stale_after:g}s): {names}",
        ))
    if head is not None:
        stranded: dict[int, int] = {}
        for row in outbox:
            generation = int(row["generation"])
            if (generation < head and generation not in live_generations
                    and row["status"] in ("PENDING", "CLAIMED")):
                stranded[generation] = stranded.get(generation, 0) + int(row["n"])
        for generation, count in sorted(stranded.items()):
            found.append(Verdict(
                "stranded_rows", False,
                f"generation {generation} has {count} unfinished rows and no live worker: "
                "requeue them into a live generation or start its workers",
            ))
    return found


#: A transaction (or prepared transaction) holding back vacuum longer than this is a
#: problem: every row updated or deleted since stays on disk. Matches the pool's
#: idle-in-transaction timeout's order of magnitude.
HORIZON_WARN_SECONDS = 300.0
#: A replication slot whose xmin is this many transactions old holds back vacuum.
SLOT_WARN_XIDS = 10_000_000
#: Dead tuples past this many, and past a fifth of the live ones, mean vacuum is not
#: keeping up (with 0006's settings it starts at 10,000 + 1 % of the table).
DEAD_TUPLES_WARN = 100_000


def health_verdicts(tables: list[dict[str, Any]], horizon: dict[str, Any]) -> list[Verdict]:
    """Judge what kills queue tables: a held-back xmin horizon and dead-tuple bloat.

    ``tables`` are rows of ``table_health`` (table, live_tuples, dead_tuples,
    total_bytes); ``horizon`` is the ``xmin_horizon`` row.
    """
    found: list[Verdict] = []
    held: list[str] = []
    xact = horizon.get("oldest_xact_seconds")
    if xact is not None and xact > HORIZON_WARN_SECONDS:
        who = horizon.get("oldest_xact") or {}
        held.append(f"a transaction open for {xact:.0f}s (pid {who.get('pid')}, "
                    f"{who.get('state')}, application {who.get('application_name')!r})")
    prepared = horizon.get("oldest_prepared_seconds")
    if prepared is not None and prepared > HORIZON_WARN_SECONDS:
        held.append(f"a prepared transaction {prepared:.0f}s old")
    slot = horizon.get("slot_xid_age")
    if slot is not None and slot > SLOT_WARN_XIDS:
        held.append(f"a replication slot {slot} transactions behind")
    if held:
        found.append(Verdict("vacuum_held_back", False,
                             "vacuum is held back by " + "; ".join(held)
                             + ": dead rows pile up in core.outbox until it ends"))
    else:
        found.append(Verdict("xmin_horizon", True,
                             "xmin horizon: nothing holds back vacuum for over "
                             f"{HORIZON_WARN_SECONDS:g}s"))
    for t in tables:
        dead, live = int(t["dead_tuples"]), int(t["live_tuples"])
        mib = int(t["total_bytes"]) / 1048576
        if dead > DEAD_TUPLES_WARN and dead > live // 5:
            found.append(Verdict(
                "bloat", False,
                f"core.{t['table']}: {dead} dead tuples against {live} live ({mib:.1f} MiB): "
                "vacuum is not keeping up (see the xmin horizon and autovacuum)"))
        else:
            found.append(Verdict(
                "table_ok", True,
                f"core.{t['table']}: {live} live, {dead} dead tuples, {mib:.1f} MiB"))
    return found
