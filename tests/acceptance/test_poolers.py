"""A worker behind PgBouncer: transaction and session pooling, against a direct run.

Each test starts its own ``pgbouncer`` (tests/bouncer.py) and a ``spectral run`` process of
the workload app, publishes a batch of events and waits until all are DONE with exactly
one effect each. ``SPECTRAL_POOLER_EVENTS`` sets the batch: 2,000 by default (CI, ~30 s for the four
modes); the issue's 10,000 with ``SPECTRAL_POOLER_EVENTS=10000`` (~2 min on a 2-core box).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from ..bouncer import pgbouncer, through
from ..pg import Server
from .proc import Spectral
from .test_processes import (
    APP,
    FAST,
    ROOT,
    effects,
    prepare,
    publish,
    scalar,
    statuses,
    tail,
    wait_exit,
    wait_until,
)
from .workload import HANDLER

EVENTS = int(os.environ.get("SPECTRAL_POOLER_EVENTS", "2000"))

#: Lines that mean the pooler broke something.
BROKEN = ("unsupported startup parameter", "prepared statement", "Traceback",
          "cannot insert multiple commands")


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def figures() -> Iterator[list[str]]:
    lines: list[str] = []
    yield lines
    for line in lines:
        print(f"\n[figures] {line}")


MODES = {
    # name: (pool mode or None for direct, SPECTRAL_POOLER, LISTEN through a direct URL)
    "direct": (None, "none", False),
    "session": ("session", "session", False),
    "transaction-poll-only": ("transaction", "transaction", False),
    "transaction-listen-direct": ("transaction", "transaction", True),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(MODES))
def test_a_worker_behind_each_pooler_mode_drains_every_event_with_one_effect_each(
    name: str, pg_server: Server, db_url: str, figures: list[str]
) -> None:
    mode, pooler, listen_direct = MODES[name]
    generation = prepare(db_url)
    with ExitStack() as stack:
        url = db_url if mode is None else through(db_url, stack.enter_context(
            pgbouncer(pg_server.url, mode)))
        env = {**FAST, "SPECTRAL_DATABASE_URL": url, "SPECTRAL_GENERATION": str(generation),
               "SPECTRAL_POOLER": pooler, "SPECTRAL_CONCURRENCY": "50",
               "SPECTRAL_POLL_INTERVAL": "0.2", "SPECTRAL_RECONCILE_INTERVAL": "1"}
        if listen_direct:
            env["SPECTRAL_LISTEN_DATABASE_URL"] = db_url
        proc = stack.enter_context(Spectral("run", APP, env=env, cwd=ROOT))
        ready = proc.wait_for("spectral ready", timeout=60)
        base = re.search(r"http=(http://[^\s\]]+)", ready)
        assert base, ready
        status, body = _get(base.group(1) + "/ready")
        listener = body["checks"]["listener"]
        poll_only = mode == "transaction" and not listen_direct
        assert (status, listener["mode"]) == (200, "poll-only" if poll_only else "notify"), body
        if poll_only:
            assert "SPECTRAL_LISTEN_DATABASE_URL" in listener["note"]
            assert "LISTEN does not stick" in proc.output
            assert _get(base.group(1) + "/queue")[1]["listener"]["mode"] == "poll-only"

        started = time.monotonic()
        assert len(publish(db_url, generation, EVENTS)) == EVENTS
        wait_until(lambda: statuses(db_url).get("DONE", 0) == EVENTS, 240,
                   f"{EVENTS} events DONE", proc, interval=0.1)
        elapsed = time.monotonic() - started

        assert statuses(db_url) == {"DONE": EVENTS}, tail(proc)
        assert effects(db_url) == (EVENTS, EVENTS), tail(proc)
        assert scalar(db_url, "SELECT count(*) FROM core.event_handled WHERE handler = $1",
                      HANDLER) == EVENTS
        assert scalar(db_url, "SELECT max(attempts) FROM core.outbox") == 0, tail(proc)
        passes = scalar(db_url, "SELECT count(*) FROM core.reconcile_passes")
        assert passes >= 1, tail(proc)
        proc.signal()
        assert wait_exit(proc, 30) == 0, tail(proc)
        broken = [line for line in proc.lines if any(b in line for b in BROKEN)]
        assert broken == [], tail(proc)
    figures.append(f"{name}: {EVENTS:,} events DONE in {elapsed:.1f}s after publish "
                   f"({EVENTS / elapsed:,.0f} events/s; 1 worker, C=50, pool 10)")
