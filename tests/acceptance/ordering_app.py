"""The app of the ordering process test: ``spectral worker tests.acceptance.ordering_app:app``.

One handler on ``ordered.step``: it records when it started (first statement) and ended
(last statement) in ``steps`` inside the turn's transaction, sleeping a little between,
and fails the first attempt of events whose payload has ``"fail": true``.
"""

from __future__ import annotations

import os

import trio

import spectral

TOPIC = "ordered.step"

STEPS_DDL = """
CREATE TABLE steps (
    key        text        NOT NULL,
    event_id   bigint      NOT NULL,
    generation bigint      NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz
)
"""

app = spectral.App(service="ordering")


@app.handler(TOPIC, name="ordering.step")
async def step(event: spectral.Event, tx: spectral.Tx) -> None:
    if event.payload.get("fail") and event.attempt == 1:
        raise RuntimeError("the first attempt fails")
    await tx.execute(
        "INSERT INTO steps (key, event_id, generation, pid, started_at)"
        " VALUES ($1, $2, $3, $4, clock_timestamp())",
        event.key, event.id, event.generation, os.getpid(),
    )
    await trio.sleep(0.005)
    await tx.execute("UPDATE steps SET ended_at = clock_timestamp() WHERE event_id = $1", event.id)
