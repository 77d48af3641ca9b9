"""The outbox listener on virtual time, against a fake store."""

from __future__ import annotations

import pytest
import trio

from spectral.actors.listener import CHANNEL, OutboxListener
from spectral.errors import DatabaseError, DatabaseUnavailableError, ReconnectBudgetExhaustedError
from spectral.state import RuntimeState

from ..fakes import FakeStore, make_state, wait_until


def make(store: FakeStore, state: RuntimeState, **kw: float) -> OutboxListener:
    return OutboxListener(store, state, reconnect_budget=kw.pop("budget", 120.0), **kw)


async def woken(state: RuntimeState) -> bool:
    """Whether a wake-up is pending, without waiting for one."""
    return await state.wait_for_work(0.001)


async def test_defaults_nothing_happens_before_run(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    make(store, state)
    assert state.listener_mode == "starting"
    assert store.calls == []
    assert not await woken(state)


async def test_ready_after_the_first_listen_and_cancelled_at_once(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).listen)
        assert store.count("listen") == 1
        assert store.calls[0].args == (CHANNEL,)
        assert state.listener_mode == "notify"
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 0
    assert store.connections[0].closed, "the connection is closed on cancellation"


async def test_run_once_twice_listens_twice_and_wakes_the_claimer(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    listener = make(store, state)
    first = await listener.run_once()
    assert await woken(state)
    second = await listener.run_once()
    assert await woken(state)
    assert first is not second
    assert store.count("listen") == 2
    assert state.listener_mode == "notify"


async def test_notification_of_its_generation_wakes_the_claimer(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state(generation=7)
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).listen)
        assert await woken(state)  # the wake-up after LISTEN
        store.notify("7")
        assert await state.wait_for_work(5)
        assert state.counters.notifications == 1
        assert state.last_notification is not None
        nursery.cancel_scope.cancel()


async def test_notification_of_another_generation_does_not(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state(generation=7)
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).listen)
        assert await woken(state)
        store.notify("8")
        store.notify("70")
        assert not await state.wait_for_work(5)
        assert state.counters.notifications == 2
        nursery.cancel_scope.cancel()


async def test_publish_in_the_store_reaches_the_claimer(autojump_clock: object) -> None:
    store, state = FakeStore(generation=3), make_state(generation=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).listen)
        assert await woken(state)
        await store.publish("order.created", "{}")
        assert await state.wait_for_work(5)
        nursery.cancel_scope.cancel()


async def test_termination_reconnects_listens_again_and_wakes_at_once(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state, check_interval=10.0).listen)
        assert await woken(state)
        before = trio.current_time()
        store.terminate_listeners()
        await wait_until(lambda: store.count("listen") == 2)
        assert trio.current_time() - before < 0.1, "reconnects at once, not at the next check"
        assert await woken(state), "the claimer polls at once after a reconnect"
        assert state.listener_mode == "notify"
        assert state.counters.reconnects == 1
        assert state.down == set()
        assert store.connections[0].closed and not store.connections[1].closed
        # The new connection delivers notifications.
        store.notify("1")
        assert await state.wait_for_work(1)
        nursery.cancel_scope.cancel()


async def test_poll_only_while_the_database_is_unreachable(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).listen)
        store.reachable = False
        store.terminate_listeners()
        await trio.sleep(3)
        assert state.listener_mode == "poll-only"
        assert "listener" in state.down
        assert state.worker_state == "reconnecting"
        attempts = store.count("listen")
        assert attempts > 2, "keeps retrying with backoff"
        store.reachable = True
        await wait_until(lambda: state.listener_mode == "notify")
        assert state.down == set()
        assert state.counters.reconnects == 1
        assert await woken(state)
        nursery.cancel_scope.cancel()


async def test_starts_in_poll_only_mode_when_the_first_listen_fails(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    store.fail_next("listen", DatabaseUnavailableError("refused"))
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).listen)
        assert state.listener_mode == "poll-only"
        await wait_until(lambda: state.listener_mode == "notify")
        assert store.count("listen") == 2
        nursery.cancel_scope.cancel()


async def test_failed_ping_reconnects_at_the_next_check(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state, check_interval=10.0).listen)
        store.connections[0].ping_error = DatabaseUnavailableError("server closed the connection")
        await wait_until(lambda: store.count("listen") == 2)
        assert trio.current_time() == pytest.approx(10.0, abs=0.1)
        assert state.counters.reconnects == 1
        nursery.cancel_scope.cancel()


async def test_closed_connection_is_noticed_at_the_next_check(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state, check_interval=5.0).listen)
        store.connections[0].closed = True  # closed without a termination callback
        await wait_until(lambda: store.count("listen") == 2)
        assert trio.current_time() == pytest.approx(5.0, abs=0.1)
        assert store.count("ping") == 0
        nursery.cancel_scope.cancel()


async def test_healthy_connection_is_pinged_every_check_interval(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state, check_interval=10.0).listen)
        await trio.sleep(35)
        assert store.times("ping") == pytest.approx([10.0, 20.0, 30.0], abs=0.01)
        assert store.count("listen") == 1
        nursery.cancel_scope.cancel()


async def test_budget_exhaustion_raises(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    store.reachable = False
    with pytest.raises(ReconnectBudgetExhaustedError, match="listener"):
        await make(store, state, budget=30.0).listen()
    assert 30.0 < trio.current_time() < 40.0
    assert state.listener_mode == "poll-only"


async def test_survives_a_database_error_from_ping(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state, check_interval=10.0).listen)
        store.connections[0].ping_error = DatabaseError("canceling statement due to statement timeout")
        await trio.sleep(15)
        assert store.count("listen") == 2
        nursery.cancel_scope.cancel()
