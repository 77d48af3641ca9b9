"""Deploy record files and the staging gate's reading of them (no database involved)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spectral.records import parse_record, render_record, staging_gate

WHEN = datetime(2026, 6, 6, 21, 3, 18, tzinfo=UTC)


def row(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 7, "environment": "staging", "reference": "abc123", "generation": 4,
        "target": "process", "verdict": "SUCCESS", "status": "success", "reason": "healthy",
        "checks": [{"name": "health", "result": "PASS", "detail": "GET /health 200 after 1.0s"},
                   {"name": "reconciler_runs", "result": "PASS", "detail": "a | pipe\nand a newline"}],
        "migrations_applied": ["0006_deploy_records"], "deployed_by": "ops",
        "staging_evidence": None, "override_reason": None, "new_process": "123",
        "old_process": None, "started_at": WHEN, "finished_at": WHEN,
    }
    return {**base, **changes}


def test_a_record_starts_with_the_verdict_fields_and_ends_with_the_summary() -> None:
    text = render_record(row())
    fields = parse_record(text)
    assert (fields["deploy_status"], fields["timestamp"], fields["environment"], fields["reference"],
            fields["generation"], fields["db_migration"], fields["checks"], fields["staging_gate"]) == (
        "SUCCESS", "2026-06-06T21:03:18Z", "staging", "abc123", "4", "0006_deploy_records",
        "2/2 PASS", "not required")
    assert text.index("## Checks") < text.index("## Summary")
    assert "| Deploy verdict | SUCCESS |" in text
    # A cell's pipe is escaped and its newline folded: the table keeps its columns.
    assert "| reconciler_runs | PASS | a \\| pipe and a newline |" in text


def test_the_gate_column_says_how_production_got_through() -> None:
    assert parse_record(render_record(row(environment="production", staging_evidence="rollout 3")))[
        "staging_gate"] == "PASS"
    assert parse_record(render_record(row(environment="production", override_reason="INC-9")))[
        "staging_gate"] == "OVERRIDDEN (INC-9)"
    assert parse_record(render_record(row(environment="production", verdict="REFUSED")))[
        "staging_gate"] == "FAIL"


@pytest.mark.parametrize("text", ["", "deploy_status: SUCCESS\n", "---\ndeploy_status: SUCCESS\n"])
def test_text_without_a_closed_front_matter_block_is_not_a_record(text: str) -> None:
    with pytest.raises(ValueError, match="not a deploy record"):
        parse_record(text)


async def test_outside_production_there_is_no_gate() -> None:
    decision = await staging_gate("staging", "abc123", record=None, database_url=None, override=None)
    assert decision.passed and decision.check is None


@pytest.mark.parametrize(("changes", "why"), [
    ({"environment": "production"}, "is a production record, not a staging one"),
    ({"reference": "other"}, "is for reference other"),
    ({"verdict": "ROLLED_BACK"}, "has deploy_status ROLLED_BACK"),
])
async def test_a_staging_record_counts_only_for_a_passed_staging_rollout_of_the_reference(
    tmp_path: Path, changes: dict[str, Any], why: str
) -> None:
    good = tmp_path / "good.md"
    good.write_text(render_record(row()))
    decision = await staging_gate("production", "abc123", record=good, database_url=None, override=None)
    assert decision.passed and decision.evidence and "rollout 7" in decision.evidence

    bad = tmp_path / "bad.md"
    bad.write_text(render_record(row(**changes)))
    decision = await staging_gate("production", "abc123", record=bad, database_url=None, override=None)
    assert not decision.passed and decision.check is not None and why in decision.check.detail
    assert "a staging pass of reference abc123 is missing" in decision.refusal


async def test_a_missing_record_file_is_named_in_the_refusal(tmp_path: Path) -> None:
    decision = await staging_gate("production", "abc123", record=tmp_path / "none.md",
                                  database_url=None, override=None)
    assert not decision.passed and "cannot read" in decision.refusal and "\n" not in decision.refusal


async def test_an_override_lets_production_through_and_keeps_the_reason() -> None:
    decision = await staging_gate("production", "abc123", record=None, database_url=None,
                                  override="INC-42")
    assert decision.passed and decision.override_reason == "INC-42"
    assert decision.check is not None and not decision.check.passed
    assert decision.check.detail.startswith("OVERRIDDEN (INC-42)")
