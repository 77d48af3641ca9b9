"""`spectral deploy rollout`: the deploy hook's flow against real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from ..pg import Server, query


def _spectral(db_url: str, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_DATA_DIR": str(cwd / "data"),
           "SPECTRAL_DEMO_RATE": "5", "SPECTRAL_DRAIN_TIMEOUT": "5",
           "SPECTRAL_RECONCILE_INTERVAL": "0.5", "SPECTRAL_RETIRE_GRACE": "1",
           "SPECTRAL_HEARTBEAT_INTERVAL": "1"}
    return subprocess.run([sys.executable, "-m", "spectral", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_rollout_cuts_over_on_health_and_rolls_back_a_broken_generation(
    db_url: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "data" / "spectral.pid"
    served: list[int] = []
    try:
        first = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v1")
        assert first.returncode == 0, first.stdout + first.stderr
        assert first.stdout.strip().splitlines()[-1].startswith("success: generation 1 serving")
        pid1 = int(pidfile.read_text())
        served.append(pid1)

        # --yes: the demo keeps generation 1 busy, so the pre-flight may find claimed rows.
        second = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v2", "--yes")
        assert second.returncode == 0, second.stdout + second.stderr
        pid2 = int(pidfile.read_text())
        served.append(pid2)
        assert pid2 != pid1 and _alive(pid2)
        assert _wait_gone(pid1, 15), "the old generation did not drain and exit"

        # --yes: the demo keeps generation 2 busy, so the pre-flight may find claimed rows.
        broken = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v3", "--yes",
                           "--app", "no_such_module:app", "--health-timeout", "20")
        assert broken.returncode == 1, broken.stdout + broken.stderr
        last = broken.stdout.strip().splitlines()[-1]
        assert last.startswith("rolled back: the new process exited with code 2"), last
        assert f"pid {pid2} keeps serving" in last
        assert int(pidfile.read_text()) == pid2 and _alive(pid2)

        rows = query(db_url, "SELECT generation, status, old_process, new_process"
                             " FROM core.rollouts ORDER BY id")
        assert [(r["generation"], r["status"]) for r in rows] == [
            (1, "success"), (2, "success"), (3, "rolled_back")]
        assert rows[1]["old_process"] == str(pid1) and rows[1]["new_process"] == str(pid2)
        # The rolled-back generation is retired: producers stamp generation 2, not 3.
        assert query(db_url, "SELECT core.current_generation() AS g")[0]["g"] == 2
        assert query(db_url, "SELECT retired_at IS NOT NULL AS r FROM core.deployments"
                             " WHERE generation = 3")[0]["r"] is True
        exited = query(db_url, "SELECT state FROM core.workers WHERE generation = 1")
        assert [r["state"] for r in exited] == ["exited"]
        # The old generation drained and exited 0.
        assert "exiting [exit_code=0]" in (tmp_path / "data" / "logs" / "generation-1.log").read_text()
        # Zero events lost: every event the demo published in any generation gets handled
        # (generation 1's leftovers are adopted by generation 2 once it retires).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            unfinished = query(db_url, "SELECT count(*) AS n FROM core.outbox WHERE status <> 'DONE'"
                                       " AND created_at < now() - interval '3 seconds'")[0]["n"]
            if unfinished == 0:
                break
            time.sleep(0.2)
        assert unfinished == 0, query(db_url, "SELECT generation, status, count(*) FROM core.outbox"
                                              " GROUP BY 1, 2")
        assert query(db_url, "SELECT count(*) AS n FROM core.outbox")[0]["n"] > 10
    finally:
        for pid in served:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        for pid in served:
            _wait_gone(pid, 15)


def test_a_second_rollout_is_refused_while_one_holds_the_deploy_lock(
    db_url: str, tmp_path: Path
) -> None:
    async def hold_lock_and_roll() -> subprocess.CompletedProcess[str]:
        conn = await asyncpg.connect(db_url)
        try:
            assert await conn.fetchval("SELECT pg_try_advisory_lock(7089812386431062138)")
            return await asyncio.to_thread(
                _spectral, db_url, tmp_path, "deploy", "rollout", "--reference", "v1")
        finally:
            await conn.close()

    result = asyncio.run(hold_lock_and_roll())
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "spectral: error: another rollout holds this database's deploy lock; wait for it to finish"
    )
    assert query(db_url, "SELECT count(*) AS n FROM core.rollouts")[0]["n"] == 0


def test_docker_target_dry_run_prints_the_hook_commands(db_url: str, tmp_path: Path) -> None:
    generation = query(db_url, "INSERT INTO core.deployments (reference) VALUES ('abc')"
                               " RETURNING generation")[0]["generation"]
    result = _spectral(db_url, tmp_path, "deploy", "rollout", "--target", "docker",
                       "--image", "registry.example/app:abc", "--generation", str(generation),
                       "--old-container", "spectral-g0", "--env-file", "prod.env", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"start: docker run --detach --name spectral-g{generation} --env "
        f"SPECTRAL_GENERATION={generation} --publish 8080 --stop-signal SIGTERM "
        "--stop-timeout 15 --env-file prod.env registry.example/app:abc",
        f"health: docker inspect --format {{{{.State.Health.Status}}}} spectral-g{generation}",
        "cutover: docker stop --time 15 spectral-g0",
        f"rollback: docker stop --time 15 spectral-g{generation}",
        f"rollback: docker rm spectral-g{generation}",
    ]


def test_a_dry_run_allocates_nothing(db_url: str, tmp_path: Path) -> None:
    result = _spectral(db_url, tmp_path, "deploy", "rollout", "--target", "docker",
                       "--image", "img", "--reference", "abc", "--dry-run")
    assert result.returncode == 2
    assert "give the generation with --generation" in result.stderr
    assert query(db_url, "SELECT count(*) AS n FROM core.deployments")[0]["n"] == 0


# --- deploy records, the staging gate and the pre-flight -------------------------------


@pytest.fixture
def staging_db_url(pg_server: Server) -> Iterator[str]:
    """A second database: the staging environment's."""
    url = pg_server.fresh()
    yield url
    pg_server.drop(url)


def _stop_served(*pidfiles: Path) -> None:
    pids = [int(p.read_text()) for p in pidfiles if p.exists()]
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    for pid in pids:
        _wait_gone(pid, 15)


def _front_matter(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                for line in lines[1:end])


@pytest.mark.slow
def test_production_is_refused_without_a_staging_pass_and_let_through_with_one(
    db_url: str, staging_db_url: str, tmp_path: Path
) -> None:
    staging, production = tmp_path / "staging", tmp_path / "production"
    staging.mkdir()
    production.mkdir()
    records = tmp_path / "records"
    try:
        staged = _spectral(staging_db_url, staging, "deploy", "rollout", "--reference", "abc123",
                           "--environment", "staging", "--deployed-by", "ops",
                           "--record", str(records / "staging.md"))
        assert staged.returncode == 0, staged.stdout + staged.stderr
        front = _front_matter(records / "staging.md")
        assert (front["deploy_status"], front["environment"], front["reference"],
                front["generation"], front["target"], front["deployed_by"]) == (
            "SUCCESS", "staging", "abc123", "1", "process", "ops")
        text = (records / "staging.md").read_text()
        for check in ("preflight", "health", "queue_reconcile_block", "reconciler_runs"):
            assert f"| {check} | PASS |" in text, text
        assert front["checks"] == "4/4 PASS"
        assert "## Summary" in text and "| Deploy verdict | SUCCESS |" in text

        refused = _spectral(db_url, production, "deploy", "rollout", "--reference", "abc123",
                            "--environment", "production", "--record", str(records / "refused.md"))
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            "spectral: error: production rollout refused: a staging pass of reference abc123 is "
            "missing (no --staging-record or --staging-database-url given); give --staging-record, "
            "--staging-database-url or --override-staging-gate REASON"]
        assert query(db_url, "SELECT count(*) AS n FROM core.deployments")[0]["n"] == 0
        assert not (production / "data" / "spectral.pid").exists()
        assert _front_matter(records / "refused.md")["deploy_status"] == "REFUSED"
        assert "| staging_gate | FAIL |" in (records / "refused.md").read_text()

        # A staging record of another reference is no evidence.
        wrong = _spectral(db_url, production, "deploy", "rollout", "--reference", "def456",
                          "--environment", "production", "--staging-record", str(records / "staging.md"))
        assert wrong.returncode == 2
        assert "a staging pass of reference def456 is missing" in wrong.stderr
        assert "staging.md is for reference abc123" in wrong.stderr

        through = _spectral(db_url, production, "deploy", "rollout", "--reference", "abc123",
                            "--environment", "production", "--staging-record", str(records / "staging.md"),
                            "--record", str(records / "production.md"))
        assert through.returncode == 0, through.stdout + through.stderr
        front = _front_matter(records / "production.md")
        assert (front["deploy_status"], front["staging_gate"], front["generation"]) == (
            "SUCCESS", "PASS", "1")
        # The first rollout that deployed anything lists every migration; a refusal is none.
        applied = query(db_url, "SELECT version, name FROM core.schema_migrations ORDER BY version")
        assert front["db_migration"] == ", ".join(f"{r['version']:04d}_{r['name']}" for r in applied)
        assert "| staging_gate | PASS | staging record" in (records / "production.md").read_text()

        # The staging database, read only, is evidence too.
        by_db = _spectral(db_url, production, "deploy", "rollout", "--reference", "abc123",
                          "--environment", "production", "--staging-database-url", staging_db_url,
                          "--yes")
        assert by_db.returncode == 0, by_db.stdout + by_db.stderr
        assert "PASS  staging_gate: staging database: rollout 1 (generation 1, 4/4 checks PASS" \
            in by_db.stdout

        rows = query(db_url, "SELECT environment, reference, verdict, status, staging_evidence IS NOT NULL"
                             " AS evidence, generation FROM core.rollouts ORDER BY id")
        assert [(r["verdict"], r["reference"], r["evidence"], r["generation"]) for r in rows] == [
            ("REFUSED", "abc123", False, None), ("REFUSED", "def456", False, None),
            ("SUCCESS", "abc123", True, 1), ("SUCCESS", "abc123", True, 2)]
        assert {r["environment"] for r in rows} == {"production"}

        history = _spectral(db_url, production, "deploy", "history", "--environment", "production")
        assert history.returncode == 0, history.stderr
        lines = history.stdout.strip().splitlines()
        assert len(lines) == 5 and lines[0].split()[:3] == ["id", "environment", "verdict"]
        assert [line.split()[2] for line in lines[1:]] == ["SUCCESS", "SUCCESS", "REFUSED", "REFUSED"]
        none = _spectral(db_url, production, "deploy", "history", "--environment", "staging")
        assert none.stdout.strip().splitlines()[1:] == []
    finally:
        _stop_served(staging / "data" / "spectral.pid", production / "data" / "spectral.pid")


def test_an_overridden_staging_gate_is_recorded_with_its_reason(db_url: str, tmp_path: Path) -> None:
    try:
        result = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "hotfix1",
                           "--environment", "production", "--override-staging-gate",
                           "staging is down; incident 42", "--record", str(tmp_path / "r.md"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "staging gate overridden: staging is down; incident 42" in result.stderr
        front = _front_matter(tmp_path / "r.md")
        assert front["staging_gate"] == "OVERRIDDEN (staging is down; incident 42)"
        assert front["override_reason"] == "staging is down; incident 42"
        row = query(db_url, "SELECT verdict, override_reason FROM core.rollouts")[0]
        assert (row["verdict"], row["override_reason"]) == ("SUCCESS", "staging is down; incident 42")
    finally:
        _stop_served(tmp_path / "data" / "spectral.pid")


def test_the_pre_flight_refuses_a_cut_over_while_old_work_is_claimed_unless_yes(
    db_url: str, tmp_path: Path
) -> None:
    query(db_url, "INSERT INTO core.deployments (reference) VALUES ('v1')")
    query(db_url, "INSERT INTO core.outbox (topic, payload, generation, status, claimed_by,"
                  " claim_token, claim_expires_at) VALUES ('t.busy', '{}', 1, 'CLAIMED', 'w-old',"
                  " gen_random_uuid(), now() + interval '5 minutes')")
    try:
        refused = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v2",
                            "--record", str(tmp_path / "refused.md"))
        assert refused.returncode == 2
        assert "pre-flight: generation 1: 1 claimed rows" in refused.stdout
        assert refused.stderr.strip() == (
            "spectral: error: pre-flight: 1 claimed rows in flight in the old generations; "
            "cut over in a quiet window or give --yes")
        assert query(db_url, "SELECT count(*) AS n FROM core.deployments")[0]["n"] == 1
        assert "| preflight | FAIL | 1 claimed rows in flight |" in (tmp_path / "refused.md").read_text()

        confirmed = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v2", "--yes")
        assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
        assert "FAIL  preflight: 1 claimed rows in flight; confirmed with --yes" in confirmed.stdout
        assert [r["verdict"] for r in query(db_url, "SELECT verdict FROM core.rollouts ORDER BY id")] == [
            "REFUSED", "SUCCESS"]
    finally:
        _stop_served(tmp_path / "data" / "spectral.pid")


@pytest.mark.slow
def test_a_failed_smoke_check_rolls_back(db_url: str, tmp_path: Path) -> None:
    off = _spectral(db_url, tmp_path, "reconcile", "off")
    assert off.returncode == 0, off.stderr
    result = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v1",
                       "--record", str(tmp_path / "r.md"))
    assert result.returncode == 1, result.stdout + result.stderr
    # Whether the new process has read the switch yet decides which of the two it reports.
    assert ("FAIL  reconciler_runs: the reconciler is switched off" in result.stdout
            or "FAIL  reconciler_runs: no reconcile pass within 6s" in result.stdout), result.stdout
    assert result.stdout.strip().splitlines()[-1] == (
        "rolled back: smoke checks failed: reconciler_runs")
    assert _front_matter(tmp_path / "r.md")["deploy_status"] == "ROLLED_BACK"
    assert not (tmp_path / "data" / "spectral.pid").exists()


def test_a_rollout_given_the_url_in_a_file_starts_the_new_process_from_the_same_file(
    db_url: str, tmp_path: Path
) -> None:
    url_file = tmp_path / "database-url"
    url_file.write_text(db_url + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_")}
    env.update(SPECTRAL_DATABASE_URL_FILE=str(url_file), SPECTRAL_DATA_DIR=str(tmp_path / "data"),
               SPECTRAL_DEMO_RATE="0", SPECTRAL_DRAIN_TIMEOUT="2")
    pidfile = tmp_path / "data" / "spectral.pid"
    done = subprocess.run([sys.executable, "-m", "spectral", "deploy", "rollout", "--reference", "v1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip().splitlines()[-1].startswith("success: generation 1 serving")
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            assert _wait_gone(pid, 20)
