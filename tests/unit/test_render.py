"""What the commands print, from plain values (spectral/render.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from spectral import render
from spectral.records import Check
from spectral.verdicts import Verdict


def test_verdicts_and_checks_are_marked_one_line_each() -> None:
    assert render.marks([Verdict("a", True, "all good"), Verdict("b", False, "stale")]) == [
        "  [ok] all good", "  [!!] stale"]
    assert render.checks([Check("health", True, "200"), Check("smoke", False, "no pass")]) == [
        "  PASS  health: 200", "  FAIL  smoke: no pass"]


def test_a_dry_run_at_the_cap_says_at_least() -> None:
    result = {"done": 1000, "dead": 3, "lost": 0, "workers": 1, "reconcile_passes": 2,
              "prune_passes": 0, "handovers": 4}
    lines = render.would_prune(result, cap=1000, retain_done=3600, retain_dead=7200,
                               lost_after=60, retain_workers=10, retain_records=20)
    assert lines[1].startswith("  delete at least 1000 DONE rows acknowledged over 3600s")
    assert lines[2].startswith("  delete 3 DEAD rows dead for over 7200s")
    assert lines[-1] == ("  delete 2 reconcile passes, 0 prune passes and 4 hand-overs "
                         "older than 20s")


def test_the_history_table_counts_passed_checks_and_names_an_override() -> None:
    row = {"id": 7, "environment": "production", "verdict": "success", "status": "success",
           "generation": 12, "target": "process", "finished_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
           "started_at": None, "checks": [{"result": "PASS"}, {"result": "FAIL"}],
           "deployed_by": "ana", "reference": "abc123", "override_reason": "hotfix"}
    header, line = render.deploy_history([row])
    assert header.split() == ["id", "environment", "verdict", "gen", "target", "finished",
                              "(UTC)", "checks", "by", "reference"]
    assert line.split() == ["7", "production", "success", "12", "process", "2026-01-02",
                            "03:04:05", "1/2", "ana", "abc123", "override:", "hotfix"]


def test_nothing_migrated_still_names_the_version_and_json_prints_datetimes() -> None:
    assert render.migrated([], 8) == ["nothing to apply", "schema core at version 8"]
    assert render.as_json({"at": datetime(2026, 1, 1, tzinfo=UTC)}) == '{"at": "2026-01-01 00:00:00+00:00"}'
    assert render.requeued([]) == "requeued 0 events"
    assert render.requeued([4, 5]) == "requeued 2 events: 4, 5"
