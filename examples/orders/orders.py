"""A small orders service on Spectral.

An order is published as ``order.created`` in the same transaction that stores it. Then:

- ``orders.write_receipt`` writes the receipt and opens the payment, in the turn's
  transaction: exactly once, whatever happens to the worker;
- ``orders.email_confirmation`` sends the confirmation through an outside e-mail
  provider. That call may run again (a crash, a drain deadline), so it passes the event
  id as the provider's idempotency key: the customer gets one e-mail;
- the payment then waits for the provider's webhook. The sweep
  ``orders.payments_missing_webhook`` finds payments whose webhook is late and publishes
  ``payment.check``, whose handler asks the provider directly;
- the actor ``orders.fx_rates`` keeps exchange rates fresh from a streaming feed and
  closes the feed when the worker stops.

Run it with ``spectral worker orders:app`` (the tables: :data:`SCHEMA`). The outside
services are in :data:`services`; a deployment sets real ones, the tests set fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import spectral

SCHEMA = """
CREATE TABLE receipts (
    order_id    bigint PRIMARY KEY,
    total_cents bigint NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE payments (
    order_id     bigint PRIMARY KEY,
    state        text NOT NULL DEFAULT 'awaiting_webhook',  -- then 'checking', 'paid', 'failed'
    requested_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE fx_rates (
    currency   text PRIMARY KEY,
    rate       numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

#: Seconds a payment may wait for its webhook before the sweep asks the provider.
WEBHOOK_GRACE = 15 * 60


class Mailer(Protocol):
    async def send(self, *, to: str, subject: str, idempotency_key: str) -> None: ...


class PaymentProvider(Protocol):
    async def status(self, order_id: int) -> str: ...  # 'paid', 'failed' or 'pending'


class RatesFeed(Protocol):
    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[tuple[str, float]]]: ...


@dataclass
class Services:
    mailer: Mailer | None = None
    payments: PaymentProvider | None = None
    rates: RatesFeed | None = None


#: The outside services; set before the worker starts.
services = Services()

app = spectral.App(service="orders")


@app.handler("order.created", name="orders.write_receipt")
async def write_receipt(event: spectral.Event, tx: spectral.Tx) -> None:
    order = event.payload
    await tx.execute("INSERT INTO receipts (order_id, total_cents) VALUES ($1, $2)",
                     order["order_id"], order["total_cents"])
    await tx.execute("INSERT INTO payments (order_id) VALUES ($1)", order["order_id"])


@app.handler("order.created", name="orders.email_confirmation")
async def email_confirmation(event: spectral.Event, tx: spectral.Tx) -> None:
    # Outside the database: this may run more than once, the key makes it count once.
    assert services.mailer is not None, "orders.services.mailer is not set"
    await services.mailer.send(
        to=event.payload["email"], subject=f"Order {event.payload['order_id']} confirmed",
        idempotency_key=f"order-confirmation-{event.id}",
    )


@app.sweep("orders.payments_missing_webhook", grace=WEBHOOK_GRACE)
async def payments_missing_webhook(tx: spectral.Tx, cutoff: datetime) -> int:
    late = await tx.fetch(
        "UPDATE payments SET state = 'checking' WHERE state = 'awaiting_webhook'"
        " AND requested_at < $1 RETURNING order_id", cutoff,
    )
    for row in late:
        await tx.publish("payment.check", {"order_id": row["order_id"]})
    return len(late)


@app.handler("payment.check", name="orders.check_payment")
async def check_payment(event: spectral.Event, tx: spectral.Tx) -> None:
    assert services.payments is not None, "orders.services.payments is not set"
    status = await services.payments.status(event.payload["order_id"])
    if status == "pending":
        raise RuntimeError("payment still pending at the provider")  # retried with backoff
    await tx.execute("UPDATE payments SET state = $2 WHERE order_id = $1 AND state = 'checking'",
                     event.payload["order_id"], status)


@app.actor(name="orders.fx_rates")
async def fx_rates(ctx: spectral.ActorContext) -> None:
    # Restarted with backoff if the feed breaks; cancelled (feed closed) when the worker stops.
    assert services.rates is not None, "orders.services.rates is not set"
    async with services.rates.subscribe() as feed:
        async for currency, rate in feed:
            await ctx.execute(
                "INSERT INTO fx_rates (currency, rate) VALUES ($1, $2) ON CONFLICT (currency)"
                " DO UPDATE SET rate = excluded.rate, updated_at = now()", currency, rate,
            )
