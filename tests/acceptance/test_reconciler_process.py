"""The reconciler across processes: a SIGKILLed worker's claims come back long before
their claim TTL, and are applied exactly once."""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

from ..pg import admin, query
from .proc import Spectral
from .workload import EFFECTS_DDL

ROOT = Path(__file__).parents[2]
APP = "tests.acceptance.workload:app"
CLAIM_TTL = 60.0


def _env(db_url: str, **extra: str) -> dict[str, str]:
    return {
        "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_GENERATION": "1",
        "SPECTRAL_POLL_INTERVAL": "0.2", "SPECTRAL_HEARTBEAT_INTERVAL": "0.5",
        "SPECTRAL_RECONCILE_INTERVAL": "0.5", "SPECTRAL_RECONCILE_GRACE": "5",
        "SPECTRAL_CLAIM_TTL": str(CLAIM_TTL), "SPECTRAL_HANDLER_MAX": "30",
        "SPECTRAL_DRAIN_TIMEOUT": "5", **extra,
    }


def test_a_sigkilled_worker_s_rows_are_released_by_the_reconciler_before_the_ttl(
    db_url: str,
) -> None:
    admin(db_url, EFFECTS_DDL, "INSERT INTO core.deployments (reference) VALUES ('v1')")
    admin(db_url, "SELECT core.publish('work.item', '{}'::jsonb, NULL, 1) FROM generate_series(1, 20)")
    victim = Spectral("worker", APP, env=_env(db_url, WORKLOAD_SLEEP="60"), cwd=ROOT)
    with victim:
        victim.wait_for("spectral ready")
        deadline = time.monotonic() + 10
        while query(db_url, "SELECT count(*) AS n FROM core.outbox WHERE status = 'CLAIMED'")[0]["n"] < 20:
            assert time.monotonic() < deadline, victim.output
            time.sleep(0.05)
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait(10)
    with Spectral("worker", APP, env=_env(db_url), cwd=ROOT) as rescuer:
        rescuer.wait_for("spectral ready")
        while query(db_url, "SELECT count(*) AS n FROM core.outbox WHERE status = 'DONE'")[0]["n"] < 20:
            assert time.monotonic() - killed < CLAIM_TTL - 10, rescuer.output
            time.sleep(0.05)
        recovered = time.monotonic() - killed
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait(30) == 0
    assert "released an orphaned claim" in rescuer.output
    # Each effect once: the victim's inserts were rolled back with its connection.
    applied = query(db_url, "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM effects")[0]
    assert (applied["n"], applied["d"]) == (20, 20)
    attempts = query(db_url, "SELECT DISTINCT attempts FROM core.outbox")
    assert [a["attempts"] for a in attempts] == [1]
    assert recovered < CLAIM_TTL / 4, recovered


def test_two_worker_processes_share_one_reconcile_pass_per_interval(db_url: str) -> None:
    admin(db_url, EFFECTS_DDL, "INSERT INTO core.deployments (reference) VALUES ('v1')")
    env = _env(db_url, SPECTRAL_RECONCILE_INTERVAL="0.5")
    with Spectral("worker", APP, env=env, cwd=ROOT) as a, \
            Spectral("worker", APP, env=env, cwd=ROOT) as b:
        a.wait_for("spectral ready")
        b.wait_for("spectral ready")
        admin(db_url, "DELETE FROM core.reconcile_passes")
        time.sleep(4.0)
        rows = query(db_url, "SELECT worker_id, started_at FROM core.reconcile_passes ORDER BY started_at")
        a.signal(signal.SIGTERM)
        b.signal(signal.SIGTERM)
        assert a.wait(30) == 0 and b.wait(30) == 0
    # One pass per 0.5 s interval (passes start at least 0.4 s apart), not one per worker.
    assert 5 <= len(rows) <= 10, len(rows)
    starts = [r["started_at"] for r in rows]
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= 0.4, gaps
