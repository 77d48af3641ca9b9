"""The runbook's three views and their verdicts, for `spectral inspect`.

Healthy: the running workers' newest generation matches the head of core.deployments.
Lag: a deploy is in flight, or workers have not picked up the new generation yet.
Stale workers: a worker that is not 'exited' and has not beaten for longer than the
stale threshold (a crash or a disconnect; the reaper recovers its rows, the row stays).
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
    live = [w for w in workers if w["state"] != "exited" and not w["stale"]]
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
