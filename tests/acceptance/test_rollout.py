"""`spectral deploy rollout`: the deploy hook's flow against real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from ..pg import query


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

        second = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v2")
        assert second.returncode == 0, second.stdout + second.stderr
        pid2 = int(pidfile.read_text())
        served.append(pid2)
        assert pid2 != pid1 and _alive(pid2)
        assert _wait_gone(pid1, 15), "the old generation did not drain and exit"

        broken = _spectral(db_url, tmp_path, "deploy", "rollout", "--reference", "v3",
                           "--app", "no_such_module:app", "--health-timeout", "20")
        assert broken.returncode == 1
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
