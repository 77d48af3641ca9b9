"""What the ``spectral`` commands print: tables, JSON and verdicts, from plain values.

Each function takes what a command read (rows as dicts, a result) and returns the lines to
print; nothing here touches the database or the arguments, so a new command is its query
and one call here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from .db.rows import PrunePass, ReconcilePass


class _Verdict(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def message(self) -> str: ...


class _Check(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def passed(self) -> bool: ...
    @property
    def detail(self) -> str: ...


def as_json(value: Any, *, indent: int | None = None) -> str:
    """One JSON document; datetimes and other values print as their ``str``."""
    return json.dumps(value, default=str, indent=indent)


def marks(verdicts: Iterable[_Verdict]) -> list[str]:
    """``[ok] message`` or ``[!!] message``, one line per verdict."""
    return [f"  [{'ok' if v.ok else '!!'}] {v.message}" for v in verdicts]


def checks(results: Iterable[_Check]) -> list[str]:
    """``PASS name: detail`` or ``FAIL name: detail``, one line per check."""
    return [f"  {'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in results]


def migrated(applied: Sequence[Any], current: int) -> list[str]:
    """`spectral migrate`: what was applied and the version the schema is at."""
    lines = [f"applied {m.version:04d}_{m.name} ({m.kind})" for m in applied] or ["nothing to apply"]
    return [*lines, f"schema core at version {current}"]


def requeued(ids: Sequence[int]) -> str:
    return f"requeued {len(ids)} events" + (f": {', '.join(map(str, ids))}" if ids else "")


def inspection(view: dict[str, Any], judged: Sequence[_Verdict]) -> list[str]:
    """`spectral inspect`: deployments, workers, the outbox, the pruner, the verdicts."""
    lines = ["deployments (newest first):"]
    for d in view["deployments"]:
        lines.append(f"  gen {d['generation']:>4}  {d['deployed_at']:%Y-%m-%d %H:%M:%S}  "
                     f"{d['reference']}  {d['tag'] or ''}  {d['deployed_by'] or ''}".rstrip()
                     + ("  (retired)" if d.get("retired_at") else ""))
    lines.append("workers (most recent beat first):")
    for w in view["workers"]:
        flag = "  STALE" if w["stale"] else ""
        lines.append(f"  gen {w['generation']:>4}  {w['state']:<12} last_seen "
                     f"{w['last_seen']:%Y-%m-%d %H:%M:%S}  {w['worker_id']}{flag}")
    lines.append("outbox (generation x status):")
    for row in view["outbox"]:
        lines.append(f"  gen {row['generation']:>4}  {row['status']:<8} {row['n']}")
    lines.append(f"  DONE rows (estimated): {view['health']['done_estimate']}")
    last = view["last_prune_pass"]
    if last is None:
        lines.append("pruner: no pass yet")
    else:
        took = (last["finished_at"] - last["started_at"]).total_seconds()
        lines.append(f"pruner: last pass {last['started_at']:%Y-%m-%d %H:%M:%S} by "
                     f"{last['worker_id']} in {took:.3f}s, pruned {json.dumps(last['pruned'])}, "
                     f"{len(last['errors'])} errors")
    lines += blocked_keys(view["blocked_keys"])
    lines.append("verdicts:")
    lines += marks(judged)
    lines.append("health:")
    lines += [f"  [{'ok' if h['ok'] else '!!'}] {h['message']}" for h in view["health"]["verdicts"]]
    return lines


def blocked_keys(blocked: list[dict[str, Any]]) -> list[str]:
    """Keys a DEAD event holds (per-key ordering), with the commands that unblock them."""
    lines = [f"blocked keys (a DEAD event holds them): {len(blocked)}"
             + (" (first 20)" if len(blocked) >= 20 else "")]
    for b in blocked:
        lines.append(f"  key {b['key']!r}  head event {b['head_id']} ({b['topic']}, gen "
                     f"{b['generation']})  {b['waiting']} waiting  {b['dead_reason'] or ''}".rstrip()
                     + f"  -> spectral requeue --id {b['head_id']} | spectral skip --id {b['head_id']}")
    return lines


def would_prune(result: dict[str, int], *, cap: int, retain_done: float, retain_dead: float,
                lost_after: float, retain_workers: float, retain_records: float) -> list[str]:
    """`spectral prune --dry-run`: what a pass would do now (``cap`` reads "at least")."""
    def rows(kind: str) -> str:
        n = result[kind]
        return f"at least {n}" if n >= cap else str(n)

    return [
        "a prune pass would now:",
        f"  delete {rows('done')} DONE rows acknowledged over {retain_done:.0f}s "
        "ago, with their ledger rows",
        f"  delete {rows('dead')} DEAD rows dead for over {retain_dead:.0f}s, "
        "with their ledger rows",
        f"  mark {result['lost']} workers lost (no beat for over {lost_after:.0f}s)",
        f"  delete {result['workers']} exited or lost workers' rows "
        f"(last beat over {retain_workers:.0f}s ago)",
        f"  delete {result['reconcile_passes']} reconcile passes, {result['prune_passes']} "
        f"prune passes and {result['handovers']} hand-overs older than {retain_records:.0f}s",
    ]


def pruned(counts: dict[str, Any], errors: Sequence[str], took: float) -> list[str]:
    """`spectral prune`: what a pass deleted and marked, then its errors."""
    return [f"pruned in {took}s: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
            *(f"  error: {error}" for error in errors)]


def deploy_history(rows: Sequence[dict[str, Any]]) -> list[str]:
    """`spectral deploy history`: one line per deploy record, under a header."""
    lines = [f"{'id':>5}  {'environment':<12} {'verdict':<12} {'gen':>4}  {'target':<8} "
             f"{'finished (UTC)':<19}  {'checks':<7} {'by':<10} reference"]
    for r in rows:
        passed = sum(1 for c in r["checks"] if c["result"] == "PASS")
        counted = f"{passed}/{len(r['checks'])}"
        finished = r["finished_at"] or r["started_at"]
        lines.append(
            f"{r['id']:>5}  {r['environment'] or '-':<12} {r['verdict'] or r['status']:<12} "
            f"{r['generation'] if r['generation'] is not None else '-':>4}  {r['target']:<8} "
            f"{finished:%Y-%m-%d %H:%M:%S}  {counted:<7} "
            f"{r['deployed_by'] or '-':<10} {r['reference'] or '-'}"
            + (f"  override: {r['override_reason']}" if r["override_reason"] else ""))
    return lines


def _switch_status(actor: str, variable: str, override: bool | None,
                   last: Mapping[str, Any] | None, result: str) -> list[str]:
    """A live kill switch: the override, and the last pass with its ``result`` counts."""
    state = f"not set ({variable} decides)" if override is None else (
        "on" if override else "off")
    lines = [f"{actor} override: {state}"]
    if last is not None:
        lines.append(f"last pass: {last['started_at']:%Y-%m-%d %H:%M:%S} by {last['worker_id']}, "
                     f"{result} {json.dumps(last[result])}, {len(last['errors'])} errors")
    return lines


def prune_status(override: bool | None, last: PrunePass | None) -> list[str]:
    """`spectral prune on|off|default|status`: the live override and the last pass."""
    return _switch_status("pruner", "SPECTRAL_PRUNE_ENABLED", override, last, "pruned")


def reconcile_status(override: bool | None, last: ReconcilePass | None) -> list[str]:
    """`spectral reconcile`: the live override and the last pass."""
    return _switch_status("reconciler", "SPECTRAL_RECONCILE_ENABLED", override, last, "unblocked")
