"""The orders service's shutdown behaviour, tested with spectral.testing against a real
PostgreSQL and Spectral's real runtime."""

from __future__ import annotations

import orders
import trio

from spectral.testing import Runtime, TestDatabase, running

from .conftest import Fakes


async def place_orders(rt: Runtime, n: int) -> list[int]:
    return [await rt.publish("order.created", {"order_id": i, "total_cents": 100 * i,
                                               "email": f"c{i}@example.com"}) for i in range(n)]


async def eventually(db: TestDatabase, sql: str, expected: object) -> None:
    """Wait up to 5 s until ``sql`` returns ``expected`` (work of an actor or a sweep)."""
    with trio.fail_after(5):
        while True:
            if await db.fetchval(sql) == expected:
                return
            await trio.sleep(0.02)


async def test_sigterm_lets_every_confirmation_finish(spectral_db: TestDatabase, fakes: Fakes) -> None:
    await spectral_db.execute(orders.SCHEMA)
    fakes.mailer.latency = 1  # the provider is slow: the drain waits for it
    async with running(orders.app, spectral_db) as rt:
        await place_orders(rt, 5)
        await rt.wait_in_flight(5)
        report = await rt.sigterm()
    assert (report.exit_code, report.acked, report.released) == (0, 5, 0)
    assert await spectral_db.fetchval("SELECT count(*) FROM receipts") == 5
    assert len(fakes.mailer.delivered) == 5


async def test_drain_deadline_gives_back_unsent_confirmations_and_the_next_worker_sends_them_once(
    spectral_db: TestDatabase, fakes: Fakes,
) -> None:
    await spectral_db.execute(orders.SCHEMA)
    mailer = fakes.mailer
    mailer.latency = 30  # the provider hangs past the drain deadline
    async with running(orders.app, spectral_db, drain_timeout=0.5) as rt:
        ids = await place_orders(rt, 3)
        await rt.wait_in_flight(3)
        report = await rt.sigterm()
    assert report.released == 3
    for event_id in ids:
        event = await rt.event(event_id)
        # The receipt committed before the e-mail was cut off; no attempt is charged.
        assert (event.status, event.attempts) == ("PENDING", 0)
        assert event.handled_by == {"orders.write_receipt"}

    mailer.latency = 0
    async with running(orders.app, spectral_db) as rt:
        await rt.wait_idle()
    assert await spectral_db.fetchval("SELECT count(*) FROM receipts") == 3
    assert len(mailer.requests) == 6  # each e-mail was asked for twice...
    assert sorted(mailer.delivered) == sorted(f"order-confirmation-{i}" for i in ids)  # ...sent once


async def test_a_crashed_worker_s_orders_are_finished_by_the_next_one(
    spectral_db: TestDatabase, fakes: Fakes,
) -> None:
    await spectral_db.execute(orders.SCHEMA)
    fakes.mailer.latency = 30
    async with running(orders.app, spectral_db) as crashed:
        ids = await place_orders(crashed, 3)
        await crashed.wait_in_flight(3)
        await crashed.crash()
    assert {(await crashed.event(i)).status for i in ids} == {"CLAIMED"}

    fakes.mailer.latency = 0
    async with running(orders.app, spectral_db) as rt:
        await rt.wait_idle(timeout=15)  # the claims come back once the dead worker is stale
    for event_id in ids:
        event = await rt.event(event_id)
        assert (event.status, event.attempts) == ("DONE", 1)
    assert await spectral_db.fetchval("SELECT count(*) FROM receipts") == 3
    assert len(fakes.mailer.delivered) == 3


async def test_a_provider_that_never_answers_dead_letters_the_e_mail_not_the_receipt(
    spectral_db: TestDatabase, fakes: Fakes,
) -> None:
    await spectral_db.execute(orders.SCHEMA)
    fakes.mailer.latency = 60
    async with running(orders.app, spectral_db, handler_max=0.3, max_attempts=2) as rt:
        [event_id] = await place_orders(rt, 1)
        await rt.wait_idle()
    event = await rt.event(event_id)
    assert (event.status, event.attempts) == ("DEAD", 2)
    assert "SPECTRAL_HANDLER_MAX" in (event.last_error or "")
    assert event.handled_by == {"orders.write_receipt"}
    assert await spectral_db.fetchval("SELECT count(*) FROM receipts") == 1


async def test_the_rates_actor_closes_its_feed_when_the_worker_stops(
    spectral_db: TestDatabase, fakes: Fakes,
) -> None:
    await spectral_db.execute(orders.SCHEMA)
    feed = fakes.rates
    async with running(orders.app, spectral_db) as rt:
        await feed.send.send(("EUR", 1.08))
        await eventually(spectral_db, "SELECT rate::float8 FROM fx_rates WHERE currency = 'EUR'", 1.08)
        assert feed.open == 1
        await rt.sigterm()
    assert feed.open == 0


async def test_a_late_webhook_is_replaced_by_asking_the_provider(
    spectral_db: TestDatabase, fakes: Fakes,
) -> None:
    await spectral_db.execute(orders.SCHEMA)
    payments = fakes.payments
    async with running(orders.app, spectral_db) as rt:
        await place_orders(rt, 2)
        await rt.wait_idle()
        # Time-dependent: instead of waiting out the grace, age the rows in the database.
        await spectral_db.execute("UPDATE payments SET requested_at = now() - interval '1 hour'"
                                  " WHERE order_id = 0")
        payments.statuses[0] = "paid"
        await eventually(spectral_db, "SELECT state FROM payments WHERE order_id = 0", "paid")
        await rt.wait_idle()
    states = await spectral_db.fetch("SELECT order_id, state FROM payments ORDER BY order_id")
    assert states == [{"order_id": 0, "state": "paid"}, {"order_id": 1, "state": "awaiting_webhook"}]
