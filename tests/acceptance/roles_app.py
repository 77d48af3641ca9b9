"""The app the least-privilege process test runs as the worker role with a handler role.

``roles.order`` records an effect and publishes a follow-up in the turn's transaction;
``roles.followup`` records an effect; ``roles.sneaky`` tries to mark every outbox row DONE,
which the handler role may not do.
"""

from __future__ import annotations

import os

import spectral

app = spectral.App(service="roles")


async def _effect(event: spectral.Event, tx: spectral.Tx, handler: str) -> None:
    await tx.execute(
        "INSERT INTO effects (event_id, handler, attempt, pid) VALUES ($1, $2, $3, $4)",
        event.id, handler, event.attempt, os.getpid(),
    )


@app.handler("roles.order", name="roles.order")
async def order(event: spectral.Event, tx: spectral.Tx) -> None:
    await _effect(event, tx, "roles.order")
    await tx.publish("roles.followup", {"order": event.id})


@app.handler("roles.followup", name="roles.followup")
async def followup(event: spectral.Event, tx: spectral.Tx) -> None:
    await _effect(event, tx, "roles.followup")


@app.handler("roles.sneaky", name="roles.sneaky", max_attempts=1)
async def sneaky(event: spectral.Event, tx: spectral.Tx) -> None:
    await tx.execute("UPDATE core.outbox SET status = 'DONE'")
