"""The demo app that ``spectral run`` starts when no app is named.

An actor plays the producer (one ``demo.order.created`` a second, published through the
outbox); two handlers subscribe to it (fan-out): one writes a receipt row in the turn's
transaction, one publishes a follow-up ``demo.receipt.sent`` event, whose handler logs it.
Set SPECTRAL_DEMO_RATE (events per second, 0 to stop producing) to change the pace.
"""

from __future__ import annotations

import logging
import os
import time

import trio

import spectral

log = logging.getLogger("spectral.demo")

app = spectral.App(service="demo")

_TABLE = """
CREATE TABLE IF NOT EXISTS public.spectral_demo_receipts (
    order_id   bigint PRIMARY KEY,
    amount     numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


@app.actor(name="demo.producer")
async def producer(ctx: spectral.ActorContext) -> None:
    """Publish orders at SPECTRAL_DEMO_RATE per second (default 1)."""
    await ctx.execute(_TABLE)
    rate = float(os.environ.get("SPECTRAL_DEMO_RATE", "1") or 0)
    if rate <= 0:
        await trio.sleep_forever()
    order = 0
    while not ctx.draining.is_set():
        order += 1
        event_id = await ctx.publish(
            "demo.order.created", {"order_id": time.time_ns() // 1000,
                                   "amount": round(9.99 * (order % 7 + 1), 2)},
        )
        log.info("published demo.order.created", extra={"event_id": event_id})
        await trio.sleep(1 / rate)
    await trio.sleep_forever()


@app.handler("demo.order.created", name="demo.write_receipt")
async def write_receipt(event: spectral.Event, tx: spectral.Tx) -> None:
    await tx.execute(
        "INSERT INTO public.spectral_demo_receipts (order_id, amount) VALUES ($1, $2)",
        event.payload["order_id"], event.payload["amount"],
    )


@app.handler("demo.order.created", name="demo.send_receipt")
async def send_receipt(event: spectral.Event, tx: spectral.Tx) -> None:
    await tx.publish("demo.receipt.sent", {"order_id": event.payload["order_id"]})


@app.handler("demo.receipt.sent", name="demo.log_receipt")
async def log_receipt(event: spectral.Event, tx: spectral.Tx) -> None:
    log.info("receipt sent for order %s", event.payload["order_id"],
             extra={"event_id": event.id, "attempt": event.attempt})
