"""The fault suite's app: ``spectral worker tests.faults.workload:app``.

Transactional handlers insert one row per run into ``fx_effects`` in the turn's
transaction. The table has no UNIQUE constraint, so an effect committed twice shows as
two rows. Outside handlers open no transaction and append one line per run to a file in
``FAULTS_LOG_DIR`` (``outside-<pid>.log``): an effect beyond the database, which Spectral
promises at least once, not once.

Topics and their handlers, in the order a turn runs them:

=================  ======================================================================
fx.work            fx.tx (transactional), fx.outside (outside)
fx.fan             fx.fan.a (tx), fx.fan.out (outside), fx.fan.b (tx, may sleep after
                   its insert: a kill then lands after fx.fan.a committed, before the ack)
fx.poison.raise    raises RuntimeError
fx.poison.exit     calls sys.exit(3)
fx.poison.slow     sleeps past SPECTRAL_HANDLER_MAX
fx.poison.group    raises an exception group mixing an error with a cancellation
fx.canary          a broken handler for the checker's own test: it writes its effect row
                   on a connection of its own, outside the turn's transaction, then sleeps
=================  ======================================================================

Payload keys the transactional handlers obey (all optional): ``m`` a marker stored with
the effect; ``sleep`` seconds of ``trio.sleep`` after the insert; ``block`` seconds of
blocking ``time.sleep``; ``stubborn`` seconds of a sleep shielded from cancellation;
``b_sleep`` the sleep of fx.fan.b. ``block`` and ``stubborn`` strike the first attempt only.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg
import trio

import spectral

EFFECTS_DDL = """
CREATE TABLE fx_effects (
    handler  text        NOT NULL,
    event_id bigint      NOT NULL,
    marker   text,
    attempt  integer     NOT NULL,
    pid      integer     NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

#: topic -> (transactional handlers, outside handlers): what the history checker expects
#: of a DONE event.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fx.work": (("fx.tx",), ("fx.outside",)),
    "fx.fan": (("fx.fan.a", "fx.fan.b"), ("fx.fan.out",)),
    "fx.poison.raise": ((), ()),
    "fx.poison.exit": ((), ()),
    "fx.poison.slow": ((), ()),
    "fx.poison.group": ((), ()),
    "fx.canary": (("fx.canary",), ()),
}
POISON_ATTEMPTS = 2

app = spectral.App(service="faults")


def _outside(handler: str, event: spectral.Event) -> None:
    folder = Path(os.environ.get("FAULTS_LOG_DIR", "."))
    line = f"{handler} {event.id} {event.payload.get('m') or '-'} {os.getpid()}\n".encode()
    fd = os.open(folder / f"outside-{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of a short line under O_APPEND: lines never interleave
    finally:
        os.close(fd)


async def _effect(handler: str, event: spectral.Event, tx: spectral.Tx, pause: float = 0.0) -> None:
    await tx.execute(
        "INSERT INTO fx_effects (handler, event_id, marker, attempt, pid) VALUES ($1, $2, $3, $4, $5)",
        handler, event.id, event.payload.get("m"), event.attempt, os.getpid(),
    )
    # The faults below strike the first attempt only, so the retry that follows recovery
    # runs normally.
    first = event.attempt == 1
    block = float(event.payload.get("block") or 0)
    if block and first:
        time.sleep(block)  # noqa: ASYNC251 - deliberately blocks the event loop
    stubborn = float(event.payload.get("stubborn") or 0)
    if stubborn and first:
        with trio.CancelScope(shield=True):
            await trio.sleep(stubborn)
    pause = pause or float(event.payload.get("sleep") or 0)
    if pause:
        await trio.sleep(pause)


def _transactional(topic: str, name: str, pause_key: str | None = None) -> None:
    async def handler(event: spectral.Event, tx: spectral.Tx) -> None:
        await _effect(name, event, tx, float(event.payload.get(pause_key) or 0) if pause_key else 0.0)

    app.handler(topic, name=name)(handler)


def _outside_only(topic: str, name: str) -> None:
    async def handler(event: spectral.Event, tx: spectral.Tx) -> None:
        _outside(name, event)

    app.handler(topic, name=name)(handler)


# A turn runs a topic's handlers in the order they are registered.
_transactional("fx.work", "fx.tx")
_outside_only("fx.work", "fx.outside")
_transactional("fx.fan", "fx.fan.a")
_outside_only("fx.fan", "fx.fan.out")
_transactional("fx.fan", "fx.fan.b", pause_key="b_sleep")


@app.handler("fx.poison.raise", name="fx.poison.raise", max_attempts=POISON_ATTEMPTS)
async def poison_raise(event: spectral.Event, tx: spectral.Tx) -> None:
    raise RuntimeError(f"poison event {event.id}")


@app.handler("fx.poison.exit", name="fx.poison.exit", max_attempts=POISON_ATTEMPTS)
async def poison_exit(event: spectral.Event, tx: spectral.Tx) -> None:
    sys.exit(3)


@app.handler("fx.poison.slow", name="fx.poison.slow", max_attempts=POISON_ATTEMPTS)
async def poison_slow(event: spectral.Event, tx: spectral.Tx) -> None:
    await trio.sleep(3600)


@app.handler("fx.poison.group", name="fx.poison.group", max_attempts=POISON_ATTEMPTS)
async def poison_group(event: spectral.Event, tx: spectral.Tx) -> None:
    raise BaseExceptionGroup("poison group", [ValueError(f"poison event {event.id}"),
                                              trio.Cancelled._create()])


def _insert_outside_the_turn(event_id: int, attempt: int) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(os.environ["SPECTRAL_DATABASE_URL"], timeout=10)
        try:
            await conn.execute(
                "INSERT INTO fx_effects (handler, event_id, marker, attempt, pid) "
                "VALUES ($1, $2, NULL, $3, $4)",
                "fx.canary", event_id, attempt, os.getpid())
        finally:
            await conn.close()

    asyncio.run(run())


@app.handler("fx.canary", name="fx.canary")
async def canary(event: spectral.Event, tx: spectral.Tx) -> None:
    # The mistake the ledger cannot undo: a database write that is not in ``tx``.
    await trio.to_thread.run_sync(_insert_outside_the_turn, event.id, event.attempt)
    await trio.sleep(float(event.payload.get("sleep") or 0))
