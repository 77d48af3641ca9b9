"""spectral.testing against a real PostgreSQL: the spectral_db fixture and each method of
the runtime handle that running() yields. (The same scenarios as a real ``spectral
worker`` process: tests/acceptance/test_kit_matches_worker.py.)"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import trio

import spectral
from spectral.testing import TEST_DEFAULTS, TestDatabase, running

RECEIPTS = "CREATE TABLE receipts (order_id int PRIMARY KEY, attempt int NOT NULL)"


def receipts_app(pause: float = 0.0, gate: trio.Event | None = None) -> spectral.App:
    """order.created -> one receipt row per order, written in the turn's transaction,
    after ``gate`` is set (if given) and ``pause`` seconds."""
    app = spectral.App(service="kit")

    @app.handler("order.created", name="receipt")
    async def receipt(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("INSERT INTO receipts VALUES ($1, $2)", event.payload["order_id"],
                         event.attempt)
        if gate is not None:
            await gate.wait()
        await trio.sleep(pause)

    return app


async def worker_state(db: TestDatabase, worker_id: str) -> str:
    return str(await db.fetchval("SELECT state FROM core.workers WHERE worker_id = $1", worker_id))


async def test_spectral_db_is_a_fresh_migrated_database_of_its_own(spectral_db: TestDatabase) -> None:
    assert urlsplit(spectral_db.url).path.startswith("/spectral_t_")
    assert await spectral_db.fetchval("SELECT count(*) FROM core.outbox") == 0
    assert await spectral_db.fetchval("SELECT count(*) FROM core.schema_migrations") > 0
    assert await spectral_db.execute("CREATE TABLE t (x int)") == "CREATE TABLE"
    assert await spectral_db.execute("INSERT INTO t VALUES (1), (2)") == "INSERT 0 2"
    assert await spectral_db.fetch("SELECT x FROM t ORDER BY x") == [{"x": 1}, {"x": 2}]
    assert await spectral_db.fetchrow("SELECT x FROM t WHERE x = 2") == {"x": 2}
    assert await spectral_db.fetchrow("SELECT x FROM t WHERE x = 3") is None


async def test_sigterm_drains_in_flight_turns(spectral_db: TestDatabase) -> None:
    # The example, timed from the fixture's database to the last assertion. The
    # turns hold until all ten run (however slowly this machine publishes), then take
    # 50 ms more: the signal always finds them in flight.
    started = time.monotonic()
    await spectral_db.execute(RECEIPTS)
    gate = trio.Event()
    async with running(receipts_app(pause=0.05, gate=gate), spectral_db, drain_timeout=5) as rt:
        ids = [await rt.publish("order.created", {"order_id": i}) for i in range(10)]
        await rt.wait_in_flight(10)
        gate.set()
        report = await rt.sigterm()
    assert report.exit_code == 0 and report.released == 0
    assert report.acked == 10
    assert await spectral_db.fetchval("SELECT count(*) FROM receipts") == 10
    assert {(await rt.event(i)).status for i in ids} == {"DONE"}
    assert await worker_state(spectral_db, rt.worker_id) == "exited"
    elapsed = time.monotonic() - started
    print(f"\n[figures] drain test body: {elapsed * 1000:.0f} ms (drain {report.seconds * 1000:.0f} ms)")
    assert elapsed < 3


async def test_sigterm_releases_the_turns_still_running_at_the_drain_deadline(
    spectral_db: TestDatabase,
) -> None:
    await spectral_db.execute(RECEIPTS)
    async with running(receipts_app(pause=30), spectral_db, drain_timeout=0.3,
                       handler_max=60) as rt:
        ids = [await rt.publish("order.created", {"order_id": i}) for i in range(3)]
        await rt.wait_in_flight(3)
        report = await rt.sigterm()
    assert (report.exit_code, report.acked, report.released) == (0, 0, 3)
    assert 0.3 <= report.seconds < 3
    for event_id in ids:
        state = await rt.event(event_id)
        assert (state.status, state.attempts, state.handled_by) == ("PENDING", 0, frozenset())
        assert state.last_error == "cancelled at the drain deadline"
    # The receipts were rolled back with the cancelled turns.
    assert await spectral_db.fetchval("SELECT count(*) FROM receipts") == 0
    assert await worker_state(spectral_db, rt.worker_id) == "exited"


async def test_leaving_the_block_drains_like_sigterm(spectral_db: TestDatabase) -> None:
    await spectral_db.execute(RECEIPTS)
    async with running(receipts_app(pause=0.2), spectral_db) as rt:
        event_id = await rt.publish("order.created", {"order_id": 1})
        await rt.wait_in_flight(1)
    assert rt.stopped and rt.exit_code == 0
    assert (await rt.event(event_id)).status == "DONE"
    assert await worker_state(spectral_db, rt.worker_id) == "exited"


async def test_crash_abandons_claims_and_a_second_runtime_recovers_them(
    spectral_db: TestDatabase,
) -> None:
    app = spectral.App(service="kit")

    @app.handler("order.created", name="receipt")
    async def receipt(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("INSERT INTO receipts VALUES ($1, $2)", event.payload["order_id"],
                         event.attempt)
        if event.attempt == 1:
            await trio.sleep(60)  # the first worker dies in here

    await spectral_db.execute(RECEIPTS)
    async with running(app, spectral_db) as first:
        ids = [await first.publish("order.created", {"order_id": i}) for i in range(4)]
        await first.wait_in_flight(4)
        await first.crash()
    assert first.exit_code is None
    assert first.counters.released == 0 and first.counters.acked == 0
    for event_id in ids:
        state = await first.event(event_id)
        assert (state.status, state.claimed_by) == ("CLAIMED", first.worker_id)
    assert await worker_state(spectral_db, first.worker_id) == "running"
    assert await spectral_db.fetchval("SELECT count(*) FROM receipts") == 0

    async with running(app, spectral_db) as second:
        assert second.generation == first.generation
        await second.wait_idle(timeout=15)
    for event_id in ids:
        state = await second.event(event_id)
        assert (state.status, state.attempts) == ("DONE", 1)
        assert state.handled_by == frozenset({"receipt"})
    # Recovered by the reconciler once the dead worker's row went stale, not by the TTL.
    rows = await spectral_db.fetch("SELECT order_id, attempt FROM receipts ORDER BY order_id")
    assert rows == [{"order_id": i, "attempt": 2} for i in range(4)]


async def test_handler_max_cuts_turns_and_the_event_goes_dead_after_max_attempts(
    spectral_db: TestDatabase,
) -> None:
    app = spectral.App(service="kit")

    @app.handler("slow", name="slow")
    async def slow(event: spectral.Event, tx: spectral.Tx) -> None:
        await trio.sleep(60)

    async with running(app, spectral_db, handler_max=0.2, max_attempts=2) as rt:
        event_id = await rt.publish("slow", {})
        await rt.wait_idle()
    state = await rt.event(event_id)
    assert (state.status, state.attempts) == ("DEAD", 2)
    assert state.dead_reason == "failed 2 of 2 attempts"
    assert state.last_error == "slow: exceeded SPECTRAL_HANDLER_MAX (0.2s)"


async def test_wait_idle_does_not_wait_for_rows_scheduled_after_its_timeout(
    spectral_db: TestDatabase,
) -> None:
    app = spectral.App(service="kit")

    @app.handler("flaky", name="flaky")
    async def flaky(event: spectral.Event, tx: spectral.Tx) -> None:
        raise RuntimeError("provider down")

    async with running(app, spectral_db, retry_base=30, retry_max=60) as rt:
        event_id = await rt.publish("flaky", {})
        later = await rt.publish("flaky", {}, available_at=datetime.now(UTC) + timedelta(hours=1))
        await rt.wait_idle(timeout=5)  # the retry is 15-30 s away, the other row 1 h
        state = await rt.event(event_id)
        assert (state.status, state.attempts) == ("PENDING", 1)
        assert state.last_error is not None and "RuntimeError: provider down" in state.last_error
        assert (await rt.event(later)).attempts == 0


async def test_event_lists_the_fan_out_handlers_that_committed(spectral_db: TestDatabase) -> None:
    app = spectral.App(service="kit")
    sent: list[int] = []

    @app.handler("order.created", name="receipt")
    async def receipt(event: spectral.Event, tx: spectral.Tx) -> None:
        await tx.execute("SELECT 1")

    @app.handler("order.created", name="email")
    async def email(event: spectral.Event, tx: spectral.Tx) -> None:
        sent.append(event.attempt)
        if event.attempt == 1:
            raise RuntimeError("smtp timeout")

    async with running(app, spectral_db) as rt:
        event_id = await rt.publish("order.created", {"order_id": 7})
        await rt.wait_idle()
        state = await rt.event(event_id)
        with pytest.raises(LookupError, match="no event 999999"):
            await rt.event(999_999)
    assert (state.status, state.attempts, state.topic) == ("DONE", 1, "order.created")
    assert state.handled_by == frozenset({"receipt", "email"})
    assert sent == [1, 2]


async def test_user_actors_are_cancelled_by_the_drain_after_the_turns(
    spectral_db: TestDatabase,
) -> None:
    app = spectral.App(service="kit")
    seen: list[str] = []

    @app.handler("order.created", name="receipt")
    async def receipt(event: spectral.Event, tx: spectral.Tx) -> None:
        await trio.sleep(0.2)
        seen.append("turn done")

    @app.actor(name="ticker")
    async def ticker(ctx: spectral.ActorContext) -> None:
        seen.append("actor started")
        try:
            await trio.sleep_forever()
        finally:
            seen.append(f"actor cancelled, draining={ctx.draining.is_set()}")

    async with running(app, spectral_db) as rt:
        await rt.publish("order.created", {})
        await rt.wait_in_flight(1)
        await rt.sigterm()
    assert seen == ["actor started", "turn done", "actor cancelled, draining=True"]


async def test_publish_applies_the_checks_of_spectral_publish(spectral_db: TestDatabase) -> None:
    async with running(spectral.App(service="kit"), spectral_db) as rt:
        with pytest.raises(spectral.InvalidTopicError):
            await rt.publish("not a topic", {})
        with pytest.raises(spectral.InvalidPayloadError):
            await rt.publish("ok", ["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(spectral.PayloadTooLargeError):
            await rt.publish("ok", {"x": "y" * 300_000})
        event_id = await rt.publish("ok", {"x": 1})
    assert await spectral_db.fetch("SELECT id, generation FROM core.outbox") == [
        {"id": event_id, "generation": rt.generation}
    ]


async def test_wait_in_flight_times_out_and_settings_reach_the_runtime(
    spectral_db: TestDatabase,
) -> None:
    async with running(receipts_app(pause=30), spectral_db, concurrency=2, handler_max=60) as rt:
        await spectral_db.execute(RECEIPTS)
        for i in range(3):
            await rt.publish("order.created", {"order_id": i})
        await rt.wait_in_flight(2)
        with pytest.raises(TimeoutError, match=r"wait_in_flight\(3\): 2 turns running after 0.3s"):
            await rt.wait_in_flight(3, timeout=0.3)
        assert rt.settings.concurrency == 2
        assert rt.settings.poll_interval == TEST_DEFAULTS["poll_interval"]
        await rt.crash()


@pytest.mark.parametrize(("settings", "message"), [
    ({"drain_timeout": 0}, "drain_timeout: must be a positive number of seconds (got 0)"),
    ({"concurrency": "many"}, "concurrency: is not a number (got 'many')"),
    ({"listen_enabled": "maybe"}, "listen_enabled: must be one of true/false"),
    ({"drian_timeout": 1}, "unknown setting 'drian_timeout'"),
    ({"http_port": 0}, "running(): http_port does not apply to an in-process runtime"),
    ({"claim_ttl": 5}, "SPECTRAL_CLAIM_TTL (5s) must be larger than"),
    ({"handler_max": 1}, "handler kit.h: timeout 2s is larger than SPECTRAL_HANDLER_MAX (1s)"),
])
async def test_bad_settings_are_refused_before_anything_starts(
    spectral_db: TestDatabase, settings: dict[str, object], message: str,
) -> None:
    app = spectral.App(service="kit")

    @app.handler("t", name="kit.h", timeout=2)
    async def h(event: spectral.Event, tx: spectral.Tx) -> None:
        pass

    with pytest.raises(spectral.ConfigurationError) as caught:
        async with running(app, spectral_db, **settings):
            pass
    assert message in str(caught.value)
    assert await spectral_db.fetchval("SELECT count(*) FROM core.workers") == 0
    assert await spectral_db.fetchval("SELECT count(*) FROM core.deployments") == 0


async def test_a_failing_assertion_in_the_block_surfaces_as_itself(spectral_db: TestDatabase) -> None:
    with pytest.raises(AssertionError, match="the user's own assertion"):
        async with running(spectral.App(service="kit"), spectral_db) as rt:
            raise AssertionError("the user's own assertion")
    assert rt.stopped
    assert await worker_state(spectral_db, rt.worker_id) == "exited"
