"""A seeded database and a running `spectral run` for the dashboard's tests and screenshot.

The numbers the tests expect are the ones written here, never read back from the page's
own code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..pg import query
from .proc import Spectral

TOKEN = "dashboard-token-0123456789abcdef"


@dataclass(frozen=True)
class Seeded:
    head: int  # the generation the running process serves
    dead_ids: list[int]  # DEAD rows of a topic the demo app handles (requeue -> DONE)
    other_dead_id: int  # a DEAD row of a topic nothing handles
    done: int  # DONE rows, all within the chart's window
    dead: int
    pending: int
    claimed: int
    by_generation: dict[int, dict[str, int]]


def seed(db_url: str) -> Seeded:
    """Three generations, live, stale and exited workers, rows in every status."""
    query(db_url, "INSERT INTO core.deployments (reference, deployed_by, tag, deployed_at) VALUES"
                  " ('4f1c2a9', 'ci', 'v1.3.0', now() - interval '3 days'),"
                  " ('8b7e3d1', 'ci', 'v1.4.0', now() - interval '2 hours'),"
                  " ('c0ffee5', 'ci', 'v1.4.1', now() - interval '5 minutes')")
    query(db_url, "UPDATE core.deployments SET retired_at = now() - interval '2 hours' WHERE generation = 1")
    query(db_url, "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid,"
                  " state, last_seen, exited_at) VALUES"
                  " ('web-a-1f3e', 1, 'test', 'demo', 'web-a', 101, 'exited', now() - interval '2 hours',"
                  "  now() - interval '2 hours'),"
                  " ('web-b-77c2', 2, 'test', 'demo', 'web-b', 202, 'running', now(), NULL),"
                  " ('web-c-09aa', 2, 'test', 'demo', 'web-c', 303, 'running', now() - interval '10 minutes',"
                  "  NULL)")
    # DONE rows spread over the last 25 minutes: 90 in generation 3, 30 in generation 2.
    query(db_url, "INSERT INTO core.outbox (generation, topic, payload, status, attempts, done_at,"
                  " created_at) SELECT CASE WHEN i % 4 = 0 THEN 2 ELSE 3 END, 'demo.order.created',"
                  " '{}', 'DONE', 1, now() - make_interval(mins => (i * 7) % 25, secs => i % 50),"
                  " now() - make_interval(mins => (i * 7) % 25 + 1) FROM generate_series(1, 120) AS i")
    query(db_url, "INSERT INTO core.outbox (generation, topic, payload, available_at) SELECT 2,"
                  " 'billing.invoice.created', '{}', now() + interval '1 hour' FROM generate_series(1, 4)")
    query(db_url, "INSERT INTO core.outbox (generation, topic, payload, status, claimed_by, claim_token,"
                  " claim_expires_at) VALUES (2, 'billing.invoice.created', '{}', 'CLAIMED', 'web-b-77c2',"
                  " gen_random_uuid(), now() + interval '10 minutes')")
    dead = query(db_url, "INSERT INTO core.outbox (generation, topic, payload, status, attempts,"
                         " dead_reason, last_error) VALUES"
                         " (3, 'demo.receipt.sent', '{\"order_id\": 1}', 'DEAD', 10, 'max attempts (10)',"
                         "  'SMTPServerDisconnected: <b>Connection unexpectedly closed</b>'),"
                         " (3, 'demo.receipt.sent', '{\"order_id\": 2}', 'DEAD', 10, 'max attempts (10)',"
                         "  'SMTPServerDisconnected: Connection unexpectedly closed'),"
                         " (2, 'billing.invoice.created', '{}', 'DEAD', 3, 'PermanentError',"
                         "  'ValueError: invoice 991 has no customer') RETURNING id")
    ids = [r["id"] for r in dead]
    query(db_url, "INSERT INTO core.reconcile_passes (worker_id, generation, started_at, finished_at,"
                  " unblocked) VALUES ('web-b-77c2', 2, now() - interval '20 seconds',"
                  " now() - interval '19 seconds', '{\"lost_wakeups\": 2}')")
    return Seeded(
        head=3, dead_ids=ids[:2], other_dead_id=ids[2], done=120, dead=3, pending=4, claimed=1,
        by_generation={3: {"PENDING": 0, "CLAIMED": 0, "DONE": 90, "DEAD": 2},
                       2: {"PENDING": 4, "CLAIMED": 1, "DONE": 30, "DEAD": 1}},
    )


@contextmanager
def running(db_url: str, cwd: Path, generation: int, **env: str) -> Iterator[tuple[Spectral, str]]:
    """`spectral run` (the demo app, producing nothing) serving ``generation``; yields its URL."""
    full = {
        "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_HTTP_PORT": "0", "SPECTRAL_DETAIL_TOKEN": TOKEN,
        "SPECTRAL_GENERATION": str(generation), "SPECTRAL_ENVIRONMENT": "staging",
        "SPECTRAL_DEMO_RATE": "0", "SPECTRAL_POLL_INTERVAL": "0.2", "SPECTRAL_DRAIN_TIMEOUT": "5",
        "SPECTRAL_RECONCILE_INTERVAL": "60", **env,
    }
    with Spectral("run", env=full, cwd=cwd) as proc:
        line = proc.wait_for("spectral ready", timeout=60)
        match = re.search(r"http=(http://[0-9.]+:\d+)", line)
        assert match, line
        yield proc, match.group(1)
