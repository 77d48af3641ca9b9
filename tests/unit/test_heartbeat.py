"""The heartbeat on virtual time, against a fake store."""

from __future__ import annotations

import pytest
import trio

from spectral.actors.heartbeat import Heartbeat
from spectral.errors import DatabaseError, DatabaseUnavailableError, ReconnectBudgetExhaustedError
from spectral.state import RuntimeState

from ..fakes import FakeStore, WorkerRow, make_state, wait_until

INTERVAL = 30.0


def make(store: FakeStore, state: RuntimeState, *, budget: float = 120.0) -> Heartbeat:
    return Heartbeat(store, state, interval=INTERVAL, reconnect_budget=budget,
                     environment="test", service="billing")


def worker(store: FakeStore, state: RuntimeState) -> WorkerRow:
    return store.workers[state.worker_id]


def written(row: WorkerRow, since: float = 0.0) -> list[str]:
    return [s for t, s in row.history if t >= since]


def changes(row: WorkerRow, since: float = 0.0) -> list[tuple[float, str]]:
    """The state changes written since ``since``: (time, state), repeats left out."""
    out: list[tuple[float, str]] = []
    for t, s in row.history:
        if t >= since and (not out or out[-1][1] != s):
            out.append((t, s))
    return out


async def test_defaults_nothing_is_written_before_run(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    heartbeat = make(store, state)
    assert heartbeat.beats == 0
    assert store.calls == []


async def test_starts_registered_and_is_cancelled_at_once(autojump_clock: object) -> None:
    store, state = FakeStore(generation=4), make_state(generation=4, worker_id="w-1")
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        row = worker(store, state)
        assert (row.generation, row.environment, row.service) == (4, "test", "billing")
        assert row.state == "running"
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 0
    assert worker(store, state).state == "exited"
    assert store.connections[0].closed


async def test_run_once_twice_registers_once_and_beats_twice(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    heartbeat = make(store, state)
    assert await heartbeat.run_once() == "running"
    assert await heartbeat.run_once() == "running"
    assert heartbeat.beats == 2
    assert (store.count("connect"), store.count("register_worker"), store.count("beat")) == (1, 1, 2)


async def test_registers_then_beats_every_interval(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        await trio.sleep(INTERVAL * 3 + 5)
        assert store.calls[0].name == "connect"
        assert store.calls[1].name == "register_worker"
        assert store.times("beat") == pytest.approx([0, 30, 60, 90], abs=0.01)
        nursery.cancel_scope.cancel()


async def test_writes_at_once_when_a_consumer_goes_down_and_comes_back(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        await trio.sleep(5)
        state.consumer_down("listener")
        await trio.sleep(3)
        row = worker(store, state)
        assert row.history[-1] == (pytest.approx(5.0), "reconnecting")
        state.consumer_up("listener")
        await trio.sleep(2)
        # 'reconnecting' once more when it comes back, held a moment, then 'running'.
        assert written(row, since=5.0) == ["reconnecting", "reconnecting", "running"]
        times = [t for t, _ in row.history if t >= 5.0]
        assert times == pytest.approx([5.0, 8.0, 9.0], abs=0.01)
        assert state.recovered is False
        await trio.sleep(INTERVAL)
        assert row.history[-1] == (pytest.approx(9.0 + INTERVAL), "running")
        nursery.cancel_scope.cancel()


async def test_own_outage_is_retried_and_written_as_reconnecting_then_running(
    autojump_clock: object,
) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        await trio.sleep(40)
        store.reachable = False
        await trio.sleep(30)  # the beat at 60 fails; retries with backoff
        assert "heartbeat" in state.down
        assert store.connections[0].closed, "the broken connection is closed"
        store.reachable = True
        await wait_until(lambda: worker(store, state).state == "running"
                         and worker(store, state).last_seen > 70)
        row = worker(store, state)
        (back, first), (later, second) = changes(row, since=70)
        assert (first, second) == ("reconnecting", "running")
        assert later - back == pytest.approx(1.0), "the outage stays visible for a moment"
        assert store.count("register_worker") == 2, "registers again on the new connection"
        assert state.counters.reconnects == 1
        assert state.down == set()
        nursery.cancel_scope.cancel()


async def test_missing_row_is_registered_again(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        await trio.sleep(10)
        del store.workers[state.worker_id]  # an operator deleted it
        await trio.sleep(INTERVAL)
        assert state.worker_id in store.workers
        assert store.count("register_worker") == 2
        assert store.connections[0].closed and not store.connections[1].closed
        assert worker(store, state).history[0] == (pytest.approx(30.0), "running")
        nursery.cancel_scope.cancel()


async def test_cancellation_marks_the_worker_exited_shielded(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    with trio.move_on_after(45):
        await make(store, state).run()
    # mark_exited checkpoints like a real query: only a shield lets it run after the cancel.
    assert store.calls[-2].name == "mark_exited"
    assert store.calls[-1].name == "aclose"
    assert worker(store, state).history[-1] == (pytest.approx(45.0), "exited")


async def test_cancellation_before_registration_writes_nothing(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    store.reachable = False
    with trio.move_on_after(1):
        await make(store, state).run()
    assert store.workers == {}
    assert store.count("mark_exited") == 0


async def test_survives_an_unreachable_database_at_start(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    store.fail_next("connect", DatabaseUnavailableError("refused"), times=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        assert store.count("connect") == 4
        await trio.sleep(1)
        assert [s for _, s in changes(worker(store, state))] == ["reconnecting", "running"]
        nursery.cancel_scope.cancel()


async def test_failed_registration_closes_its_connection(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    store.fail_next("register_worker", DatabaseUnavailableError("reset by peer"))
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        assert store.connections[0].closed
        assert not store.connections[1].closed
        nursery.cancel_scope.cancel()


async def test_budget_exhaustion_raises(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    store.reachable = False
    with pytest.raises(ReconnectBudgetExhaustedError, match="heartbeat"):
        await make(store, state, budget=20).run()
    assert 20 < trio.current_time() < 30


async def test_survives_a_database_error_on_a_beat(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(make(store, state).run)
        store.fail_next("beat", DatabaseError("cannot execute UPDATE in a read-only transaction"))
        await trio.sleep(INTERVAL * 2 + 1)
        assert store.count("beat") >= 3
        nursery.cancel_scope.cancel()
