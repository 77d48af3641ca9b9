"""The app the process-level acceptance tests run: ``spectral worker tests.acceptance.workload:app``.

One handler, ``workload.effect``, on topic ``work.item``. It inserts one row into the
``effects`` table in the turn's transaction (the table has no UNIQUE constraint, so an
effect committed twice would show as two rows), then behaves as the environment says:

============================  ============================================================
WORKLOAD_SLEEP                seconds to ``trio.sleep`` after the insert (default 0)
WORKLOAD_BLOCK                seconds to block the thread with ``time.sleep`` for events
                              whose payload has ``"block": true`` (unset: never block)
============================  ============================================================

The test creates the table with :data:`EFFECTS_DDL` before it starts a worker.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import trio

import spectral

log = logging.getLogger("spectral.workload")

TOPIC = "work.item"
HANDLER = "workload.effect"
#: A poison event: its handler calls ``sys.exit(3)``.
POISON = "work.poison"

EFFECTS_DDL = """
CREATE TABLE effects (
    event_id bigint      NOT NULL,
    handler  text        NOT NULL,
    attempt  integer     NOT NULL,
    pid      integer     NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

app = spectral.App(service="acceptance")


def _seconds(name: str) -> float:
    return float(os.environ.get(name, "") or 0)


@app.handler(TOPIC, name=HANDLER)
async def effect(event: spectral.Event, tx: spectral.Tx) -> None:
    await tx.execute(
        "INSERT INTO effects (event_id, handler, attempt, pid) VALUES ($1, $2, $3, $4)",
        event.id, HANDLER, event.attempt, os.getpid(),
    )
    block = _seconds("WORKLOAD_BLOCK")
    if block and event.payload.get("block"):
        log.warning("workload: blocking the thread for %gs", block, extra={"event_id": event.id})
        time.sleep(block)  # noqa: ASYNC251 - deliberately blocking: trio cannot cancel it
    pause = _seconds("WORKLOAD_SLEEP")
    if pause:
        await trio.sleep(pause)


@app.handler(POISON, name="workload.poison", max_attempts=3)
async def poison(event: spectral.Event, tx: spectral.Tx) -> None:
    sys.exit(3)
