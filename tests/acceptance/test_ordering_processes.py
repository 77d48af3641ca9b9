"""Per-key ordering across several ``spectral worker`` processes and a generation cutover."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from ..pg import admin, query
from .ordering_app import STEPS_DDL
from .proc import Spectral

ROOT = Path(__file__).parents[2]
APP = "tests.acceptance.ordering_app:app"
KEYS = 8


def _env(db_url: str, generation: int) -> dict[str, str]:
    return {
        "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_GENERATION": str(generation),
        "SPECTRAL_POLL_INTERVAL": "0.1", "SPECTRAL_HEARTBEAT_INTERVAL": "0.5",
        "SPECTRAL_RETRY_BASE": "0.05", "SPECTRAL_RETRY_MAX": "0.1",
        "SPECTRAL_DRAIN_TIMEOUT": "5", "SPECTRAL_CONCURRENCY": "8", "SPECTRAL_BATCH_SIZE": "4",
    }


def _publish(db_url: str, generation: int, n: int) -> None:
    # Every seventh event fails its first attempt: it retries while its key waits.
    admin(db_url, "SELECT core.publish('ordered.step', jsonb_build_object('fail', i % 7 = 0),"
                  f" generation => {generation}, key => 'k' || (i % {KEYS}))"
                  f" FROM generate_series(1, {n}) AS i")


def _wait_done(db_url: str, n: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if query(db_url, "SELECT count(*) AS n FROM core.outbox WHERE status = 'DONE'")[0]["n"] == n:
            return
        time.sleep(0.2)
    raise AssertionError(f"not all {n} events were handled in {seconds}s")


@pytest.mark.slow
def test_three_worker_processes_and_a_cutover_keep_every_key_in_order(db_url: str) -> None:
    admin(db_url, STEPS_DDL, "INSERT INTO core.deployments (reference) VALUES ('v1')",
          # The database itself refuses two claims of one key at once.
          "CREATE UNIQUE INDEX one_claim_per_key ON core.outbox (key) WHERE status = 'CLAIMED'")
    workers = [Spectral("worker", APP, env=_env(db_url, 1), cwd=ROOT) for _ in range(3)]
    try:
        for w in workers:
            w.wait_for("spectral ready")
        _publish(db_url, 1, 240)
        admin(db_url, "INSERT INTO core.deployments (reference) VALUES ('v2')")
        new = Spectral("worker", APP, env=_env(db_url, 2), cwd=ROOT)
        workers.append(new)
        new.wait_for("spectral ready")
        # Generation 2's events of each key wait for generation 1's unfinished ones.
        _publish(db_url, 2, 80)
        _wait_done(db_url, 320, 90)
        for w in workers:
            w.signal(signal.SIGTERM)
        for w in workers:
            assert w.wait(30) == 0, w.output
    finally:
        for w in workers:
            w.kill()
    for w in workers:
        assert "claim failed" not in w.output, w.output
    steps = query(db_url, "SELECT s.key, s.event_id, s.generation, s.pid, s.started_at, s.ended_at"
                          " FROM steps s ORDER BY s.started_at")
    assert len(steps) == 320
    assert len({s["pid"] for s in steps}) >= 2  # the work was spread over processes
    for k in range(KEYS):
        mine = [s for s in steps if s["key"] == f"k{k}"]
        assert [s["event_id"] for s in mine] == sorted(s["event_id"] for s in mine)
        for before, after in zip(mine, mine[1:], strict=False):
            assert after["started_at"] >= before["ended_at"], (before, after)
        gens = [s["generation"] for s in mine]
        assert gens == sorted(gens)  # no generation-2 event before a generation-1 one
