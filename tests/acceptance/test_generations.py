"""Deploy generations end to end: allocation under concurrency, two generations side by
side, and the hand-over of a retired generation's leftover rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..pg import admin, query
from .proc import Spectral
from .workload import EFFECTS_DDL

ROOT = Path(__file__).parents[2]
APP = "tests.acceptance.workload:app"


def _allocate(db_url: str, i: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spectral", "deploy", "allocate", "--reference", f"sha-{i}",
         "--deployed-by", "ci", "--database-url", db_url],
        capture_output=True, text=True, timeout=60,
    )


def test_concurrent_allocations_get_distinct_generations(db_url: str) -> None:
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda i: _allocate(db_url, i), range(12)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    generations = sorted(int(r.stdout.strip().splitlines()[-1]) for r in results)
    assert generations == list(range(1, 13))
    assert query(db_url, "SELECT count(DISTINCT reference) AS n FROM core.deployments")[0]["n"] == 12


def _wait(check, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _publish(db_url: str, generation: int, n: int) -> None:
    admin(db_url, f"SELECT core.publish('work.item', '{{}}'::jsonb, NULL, {generation})"
                  f" FROM generate_series(1, {n})")


def _done(db_url: str) -> int:
    return int(query(db_url, "SELECT count(*) AS n FROM core.outbox WHERE status = 'DONE'")[0]["n"])


def _env(db_url: str, generation: int) -> dict[str, str]:
    return {
        "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_GENERATION": str(generation),
        "SPECTRAL_POLL_INTERVAL": "0.2", "SPECTRAL_HEARTBEAT_INTERVAL": "0.5",
        "SPECTRAL_RECONCILE_INTERVAL": "0.5", "SPECTRAL_RETIRE_GRACE": "1",
        "SPECTRAL_RECONCILE_GRACE": "5", "SPECTRAL_DRAIN_TIMEOUT": "5",
        "SPECTRAL_CLAIM_TTL": "120",
    }


def test_two_generations_side_by_side_then_the_old_one_retires_and_is_adopted(
    db_url: str,
) -> None:
    admin(db_url, EFFECTS_DDL, "INSERT INTO core.deployments (reference) VALUES ('v1'), ('v2')")
    with Spectral("worker", APP, env=_env(db_url, 1), cwd=ROOT) as old, \
            Spectral("worker", APP, env=_env(db_url, 2), cwd=ROOT) as new:
        old.wait_for("spectral ready")
        new.wait_for("spectral ready")
        _publish(db_url, 1, 100)
        _publish(db_url, 2, 100)
        _wait(lambda: _done(db_url) == 200, 30, "200 events handled")
        by_process = query(
            db_url,
            "SELECT o.generation, e.pid, count(*) AS n FROM effects e"
            " JOIN core.outbox o ON o.id = e.event_id GROUP BY 1, 2 ORDER BY 1",
        )
        assert [(r["generation"], r["pid"], r["n"]) for r in by_process] == [
            (1, old.proc.pid, 100), (2, new.proc.pid, 100)]

        old.signal(signal.SIGTERM)
        assert old.wait(30) == 0, old.output
        # A producer still stamping the old generation: nothing of generation 1 runs now.
        _publish(db_url, 1, 50)
        _wait(lambda: _done(db_url) == 250, 30, "the leftover rows adopted and handled")
        new.wait_for("retired", timeout=5)
        leftovers = query(
            db_url,
            "SELECT e.pid, count(*) AS n, count(DISTINCT e.event_id) AS distinct_events"
            " FROM effects e JOIN core.outbox o ON o.id = e.event_id"
            " WHERE o.id > 200 GROUP BY e.pid",
        )
        assert [(r["pid"], r["n"], r["distinct_events"]) for r in leftovers] == [
            (new.proc.pid, 50, 50)]
        assert query(db_url, "SELECT retire_policy FROM core.deployments WHERE generation = 1"
                     )[0]["retire_policy"] == "adopt"
        handover = query(db_url, "SELECT from_generation, to_generation, rows"
                                 " FROM core.generation_handovers")
        assert [(h["from_generation"], h["to_generation"]) for h in handover] == [(1, 2)]
        assert sum(h["rows"] for h in handover) == 50
        new.signal(signal.SIGTERM)
        assert new.wait(30) == 0
    assert query(db_url, "SELECT count(*) AS n FROM effects")[0]["n"] == 250


def test_retire_policy_dead_dead_letters_the_leftovers(db_url: str) -> None:
    admin(db_url, EFFECTS_DDL, "INSERT INTO core.deployments (reference) VALUES ('v1'), ('v2')")
    env = {**_env(db_url, 2), "SPECTRAL_RETIRE_POLICY": "dead"}
    admin(db_url, "INSERT INTO core.workers (worker_id, generation, environment, service,"
                  " hostname, pid, state, last_seen) VALUES ('gone', 1, 't', 's', 'h', 1,"
                  " 'exited', clock_timestamp() - interval '1 minute')")
    _publish(db_url, 1, 7)
    with Spectral("worker", APP, env=env, cwd=ROOT) as new:
        new.wait_for("spectral ready")
        _wait(lambda: query(db_url, "SELECT count(*) AS n FROM core.outbox WHERE status = 'DEAD'"
                            )[0]["n"] == 7, 20, "7 rows dead-lettered")
        new.signal(signal.SIGTERM)
        assert new.wait(30) == 0
    reasons = query(db_url, "SELECT DISTINCT dead_reason FROM core.outbox")
    assert [r["dead_reason"] for r in reasons] == ["generation 1 retired"]
    assert query(db_url, "SELECT count(*) AS n FROM effects")[0]["n"] == 0


def test_production_refuses_to_start_without_an_allocated_generation(db_url: str) -> None:
    base = {**os.environ, "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_ENVIRONMENT": "production"}
    for extra, expected in (
        ({}, "SPECTRAL_ENVIRONMENT=production needs SPECTRAL_GENERATION"),
        ({"SPECTRAL_GENERATION": "42"}, "SPECTRAL_GENERATION=42 is not in core.deployments"),
    ):
        result = subprocess.run([sys.executable, "-m", "spectral", "worker", APP], cwd=ROOT,
                                env={**base, **extra}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spectral: error: "), result.stderr
        assert expected in lines[0]
    assert query(db_url, "SELECT count(*) AS n FROM core.workers")[0]["n"] == 0


def test_development_allocates_a_generation_and_says_so(db_url: str) -> None:
    env = {"SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_ENVIRONMENT": "development"}
    with Spectral("worker", APP, env=env, cwd=ROOT) as proc:
        proc.wait_for("allocated generation 1 for development")
        proc.wait_for("spectral ready")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert query(db_url, "SELECT reference FROM core.deployments")[0]["reference"] == "development"


def test_rows_kept_in_a_retired_generation_can_be_moved_by_hand(db_url: str) -> None:
    admin(db_url, "INSERT INTO core.deployments (reference) VALUES ('v1'), ('v2')",
          "SELECT core.publish('work.item', '{}'::jsonb, NULL, 1) FROM generate_series(1, 4)")

    def requeue(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spectral", "requeue", *args,
                               "--database-url", db_url], capture_output=True, text=True, timeout=60)

    # Generation 1 is not retired yet: nothing moves.
    assert requeue("--retired-generation", "1", "--to-generation", "2").stdout.strip() == (
        "requeued 0 events")
    admin(db_url, "UPDATE core.deployments SET retired_at = now(), retire_policy = 'keep'"
                  " WHERE generation = 1")
    missing = requeue("--retired-generation", "1")
    assert missing.returncode == 2 and "needs --to-generation" in missing.stderr
    moved = requeue("--retired-generation", "1", "--to-generation", "2")
    assert moved.returncode == 0 and moved.stdout.startswith("requeued 4 events")
    assert query(db_url, "SELECT DISTINCT generation FROM core.outbox")[0]["generation"] == 2
    handovers = query(db_url, "SELECT policy, rows FROM core.generation_handovers")
    assert [dict(r) for r in handovers] == [{"policy": "manual", "rows": 4}]


def test_migrate_keeps_a_payload_cap_raised_by_an_operator(db_url: str) -> None:
    admin(db_url, "SELECT core.set_max_payload_bytes(1048576)")

    def migrate(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spectral", "migrate", "--database-url", db_url],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=60)

    assert migrate().returncode == 0
    cap = "SELECT value FROM core.settings WHERE key = 'max_payload_bytes'"
    assert query(db_url, cap)[0]["value"] == "1048576"
    assert migrate(SPECTRAL_MAX_PAYLOAD_BYTES="4096").returncode == 0
    assert query(db_url, cap)[0]["value"] == "4096"
