import json
import subprocess
import sys

from ..pg import admin


def _inspect(db_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spectral", "inspect", "--database-url", db_url, *extra],
        capture_output=True, text=True, timeout=60,
    )


def test_inspect_judges_two_generations_a_stale_worker_and_stranded_rows(db_url: str) -> None:
    admin(
        db_url,
        "INSERT INTO core.deployments (reference, tag) VALUES ('aaa', 'v1'), ('bbb', 'v2')",
        "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid,"
        " state, last_seen) VALUES"
        " ('old-1', 1, 'test', 's', 'h', 1, 'running', clock_timestamp() - interval '5 minutes'),"
        " ('new-1', 1, 'test', 's', 'h', 2, 'exited', clock_timestamp()),"
        " ('cur-1', 2, 'test', 's', 'h', 3, 'running', clock_timestamp())",
        "SELECT core.publish('a.b', '{}'::jsonb, NULL, 1) FROM generate_series(1, 3)",
        "SELECT core.publish('a.b', '{}'::jsonb, NULL, 2)",
    )
    result = _inspect(db_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[ok] healthy: the workers' max generation 2 matches the head" in out
    assert "[!!] 1 stale workers" in out and "old-1 (gen 1)" in out
    assert "generation 1 has 3 unfinished rows and no live worker" in out
    assert "STALE" in out

    doc = json.loads(_inspect(db_url, "--json").stdout)
    assert [v["name"] for v in doc["verdicts"]] == ["healthy", "stale_workers", "stranded_rows"]
    assert {(r["generation"], r["status"], r["n"]) for r in doc["outbox"]} == {
        (1, "PENDING", 3), (2, "PENDING", 1),
    }


def test_inspect_reports_lag_when_workers_run_an_older_generation(db_url: str) -> None:
    admin(
        db_url,
        "INSERT INTO core.deployments (reference) VALUES ('aaa'), ('bbb')",
        "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid)"
        " VALUES ('w', 1, 'test', 's', 'h', 1)",
    )
    out = _inspect(db_url).stdout
    assert "[!!] lag: the head is generation 2 but the workers' max is 1" in out
