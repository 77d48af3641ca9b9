"""Deploy records, the staging gate and the pre-flight of `spectral deploy rollout`.

A deploy record is one core.rollouts row: environment, reference, generation, target, the
migrations applied since the previous rollout, every check with PASS/FAIL, the verdict
(SUCCESS, ROLLED_BACK, REFUSED), who and when, and an override of the staging gate with
its reason. ``--record PATH`` writes it as a file shaped like the deploy log operators
keep: a front-matter block of ``key: value`` lines with the verdict fields, then tables.

The staging gate: in production a rollout needs evidence that a rollout of the same
reference passed in staging, from a staging record file or, read-only, from the staging
database; ``--override-staging-gate REASON`` lets it through and the record says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from .db import staging_pass
from .errors import SpectralError

VERDICTS = ("SUCCESS", "ROLLED_BACK", "REFUSED")
_FENCE = "---"


@dataclass(frozen=True)
class Check:
    """One check a rollout ran, and what it saw."""

    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "result": "PASS" if self.passed else "FAIL",
                "detail": self.detail}


@dataclass
class RolloutPlan:
    """What a rollout knows before it starts: who, what, and the checks already run."""

    environment: str
    reference: str
    deployed_by: str | None
    staging_evidence: str | None = None
    override_reason: str | None = None
    checks: list[Check] = field(default_factory=list)

    def begin_fields(self) -> dict[str, Any]:
        return {"environment": self.environment, "reference": self.reference,
                "deployed_by": self.deployed_by, "staging_evidence": self.staging_evidence,
                "override_reason": self.override_reason}


class GateStore(Protocol):
    async def in_flight(self, outside_generation: int | None, stale_after: float) -> list[dict[str, Any]]: ...


# --- the staging gate ----------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    check: Check | None  # None outside production: there is no gate to pass
    evidence: str | None
    override_reason: str | None
    refusal: str = ""


def _record_evidence(path: Path, reference: str) -> tuple[str | None, str]:
    """(evidence, why not): a passed staging record of ``reference`` at ``path``."""
    try:
        fields = parse_record(path.read_text("utf-8"))
    except OSError as exc:
        return None, f"cannot read {path} ({exc.strerror})"
    except ValueError as exc:
        return None, f"{path}: {exc}"
    if fields.get("environment") != "staging":
        return None, f"{path} is a {fields.get('environment') or 'unknown'} record, not a staging one"
    if fields.get("reference") != reference:
        return None, f"{path} is for reference {fields.get('reference')}"
    if fields.get("deploy_status") != "SUCCESS":
        return None, f"{path} has deploy_status {fields.get('deploy_status')}"
    return (f"staging record {path} (rollout {fields.get('rollout_id')}, "
            f"{fields.get('checks')}, {fields.get('timestamp')})"), ""


async def _database_evidence(url: str, reference: str) -> tuple[str | None, str]:
    try:
        found = await staging_pass(url, reference)
    except SpectralError as exc:
        return None, f"the staging database did not answer ({str(exc).splitlines()[0]})"
    if found is None:
        return None, "the staging database has no passed rollout of it"
    passed = sum(1 for c in found["checks"] if c.get("result") == "PASS")
    return (f"staging database: rollout {found['id']} (generation {found['generation']}, "
            f"{passed}/{len(found['checks'])} checks PASS, {_utc(found['finished_at'])})"), ""


async def staging_gate(
    environment: str, reference: str, *, record: Path | None, database_url: str | None,
    override: str | None,
) -> GateDecision:
    """Decide whether a rollout of ``reference`` may start in ``environment``."""
    if environment != "production":
        return GateDecision(True, None, None, None)
    why: list[str] = []
    if record is not None:
        evidence, reason = _record_evidence(record, reference)
        if evidence:
            return GateDecision(True, Check("staging_gate", True, evidence), evidence, None)
        why.append(reason)
    if database_url is not None:
        evidence, reason = await _database_evidence(database_url, reference)
        if evidence:
            return GateDecision(True, Check("staging_gate", True, evidence), evidence, None)
        why.append(reason)
    if not why:
        why.append("no --staging-record or --staging-database-url given")
    detail = "; ".join(why)
    if override:
        return GateDecision(True, Check("staging_gate", False, f"OVERRIDDEN ({override}): {detail}"),
                            None, override)
    refusal = (f"production rollout refused: a staging pass of reference {reference} is missing "
               f"({detail}); give --staging-record, --staging-database-url or "
               "--override-staging-gate REASON")
    return GateDecision(False, Check("staging_gate", False, detail), None, None, refusal)


# --- the pre-flight ------------------------------------------------------------------


async def preflight(
    store: GateStore, new_generation: int | None, stale_after: float
) -> tuple[Check, list[str]]:
    """In-flight work of the generations being replaced: quiet when nothing is claimed."""
    rows = await store.in_flight(new_generation, stale_after)
    lines = []
    claimed = 0
    for r in rows:
        claimed += int(r["claimed"])
        oldest = "" if r["oldest_claim_seconds"] is None else f" (oldest {r['oldest_claim_seconds']:.1f}s)"
        lines.append(f"generation {r['generation']}: {r['claimed']} claimed rows{oldest}, "
                     f"{r['live_workers']} live workers")
    if not lines:
        lines.append("no live workers and no claimed rows")
    quiet = claimed == 0
    detail = "quiet: no claimed rows" if quiet else f"{claimed} claimed rows in flight"
    return Check("preflight", quiet, detail), lines


# --- the record file -----------------------------------------------------------------


def _utc(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _cell(value: object) -> str:
    return _one_line(value).replace("|", "\\|")


def render_record(row: dict[str, Any]) -> str:
    """The deploy record file of a core.rollouts row (from ``Store.rollout_record``)."""
    checks: list[dict[str, str]] = row["checks"]
    passed = sum(1 for c in checks if c["result"] == "PASS")
    migrations = ", ".join(row["migrations_applied"]) or "none"
    if row["override_reason"]:
        gate = f"OVERRIDDEN ({row['override_reason']})"
    elif row["staging_evidence"]:
        gate = "PASS"
    elif row["environment"] == "production":
        gate = "FAIL"
    else:
        gate = "not required"
    front = {
        "deploy_status": row["verdict"],
        "timestamp": _utc(row["finished_at"] or row["started_at"]),
        "environment": row["environment"],
        "reference": row["reference"],
        "generation": "" if row["generation"] is None else row["generation"],
        "target": row["target"],
        "staging_gate": gate,
        "db_migration": migrations,
        "checks": f"{passed}/{len(checks)} PASS",
        "deployed_by": row["deployed_by"] or "",
        "override_reason": row["override_reason"] or "",
        "reason": row["reason"] or "",
        "rollout_id": row["id"],
    }
    lines = [_FENCE, *(f"{k}: {_one_line(v)}" for k, v in front.items()), _FENCE, ""]
    generation = "no generation" if row["generation"] is None else f"generation {row['generation']}"
    lines += [
        f"# Deploy record: {row['environment']}, {generation}",
        "",
        f"Reference `{row['reference']}`, target {row['target']}, by {row['deployed_by'] or 'unknown'}, "
        f"{_utc(row['started_at'])} to {_utc(row['finished_at'])}.",
        "",
        "## Checks",
        "",
        "| Check | Result | Detail |",
        "|---|---|---|",
        *(f"| {c['name']} | {c['result']} | {_cell(c['detail'])} |" for c in checks),
        "",
        "## Summary",
        "",
        "| Item | State |",
        "|---|---|",
        f"| Staging gate | {_cell(gate)}"
        + (f": {_cell(row['staging_evidence'])}" if row["staging_evidence"] else "") + " |",
        f"| Checks | {passed}/{len(checks)} PASS |",
        f"| DB schema migration | {_cell(migrations)} |",
        f"| New process | {_cell(row['new_process'] or 'none')} |",
        f"| Old process | {_cell(row['old_process'] or 'none')} |",
        "| Kill switch | `spectral reconcile off` (live), `SPECTRAL_RECONCILE_ENABLED=false` |",
        f"| Outcome | {_cell(row['reason'] or '')} |",
        f"| Deploy verdict | {row['verdict']} |",
        "",
    ]
    return "\n".join(lines)


def parse_record(text: str) -> dict[str, str]:
    """The front-matter fields of a record file.

    Raises:
        ValueError: the text does not start with a front-matter block.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != _FENCE:
        raise ValueError("not a deploy record (no front-matter block)")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.strip() == _FENCE:
            return fields
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    raise ValueError("not a deploy record (the front-matter block is not closed)")
