"""Stand-ins for the outside services orders.py talks to (the e-mail and payment
providers, the rates feed). Spectral and PostgreSQL are real: spectral_db comes from
spectral.testing's pytest plugin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orders
import pytest
import trio


class Mailer:
    """An e-mail provider that delivers once per idempotency key, as real ones do."""

    def __init__(self) -> None:
        self.latency = 0.0
        self.requests: list[str] = []  # every call that reached the provider
        self.delivered: dict[str, str] = {}  # idempotency key -> recipient

    async def send(self, *, to: str, subject: str, idempotency_key: str) -> None:
        self.requests.append(idempotency_key)
        await trio.sleep(self.latency)
        self.delivered.setdefault(idempotency_key, to)


class Payments:
    def __init__(self) -> None:
        self.statuses: dict[int, str] = {}

    async def status(self, order_id: int) -> str:
        return self.statuses.get(order_id, "pending")


class RatesFeed:
    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[tuple[str, float]](10)
        self.open = 0  # subscriptions open right now

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[tuple[str, float]]]:
        self.open += 1
        try:
            yield self.receive
        finally:
            self.open -= 1


@dataclass
class Fakes:
    mailer: Mailer
    payments: Payments
    rates: RatesFeed


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    """Installs the stand-ins in orders.services for one test."""
    made = Fakes(Mailer(), Payments(), RatesFeed())
    orders.services = orders.Services(mailer=made.mailer, payments=made.payments, rates=made.rates)
    yield made
    orders.services = orders.Services()
