"""Spectral apps the benchmark runs as ``spectral worker bench.apps:<app>``.

Drain events carry an empty payload and their handler does nothing. Latency probes carry
``{"seq": n}``: the handler notes when it started (:mod:`bench._probe`, the same call in
every system's worker).
"""

from __future__ import annotations

import trio

import spectral

from ._probe import record_start

#: Topic of the no-op events (drain and latency probes).
NOOP_TOPIC = "bench.noop"
#: Topic of the events whose handler sleeps (drain after SIGTERM).
SLEEP_TOPIC = "bench.sleep"
#: Seconds the sleeping handler sleeps.
SLEEP_SECONDS = 0.5


noop_app = spectral.App(service="bench-noop")


@noop_app.handler(NOOP_TOPIC, name="bench.noop")
async def noop(event: spectral.Event, tx: spectral.Tx) -> None:
    record_start(event.payload.get("seq"))


sleep_app = spectral.App(service="bench-sleep")


@sleep_app.handler(SLEEP_TOPIC, name="bench.sleep")
async def sleep(event: spectral.Event, tx: spectral.Tx) -> None:
    await trio.sleep(SLEEP_SECONDS)
