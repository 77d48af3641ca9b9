"""RuntimeState.abandoned (spectral.testing's crash()): the claimer and the heartbeat stop
as a killed process would, on virtual time against the fake store."""

from __future__ import annotations

import trio

from spectral.actors.heartbeat import Heartbeat
from spectral.app import App

from ..fakes import FakeStore, make_state
from .test_claimer import FAST, Load, add, build


async def test_an_abandoned_claimer_releases_nothing_when_cancelled(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    Load(app, seconds=100)
    ids = add(store, 3)
    claimer = build(store, state, app, concurrency=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claimer.run)
        await trio.sleep(1)
        assert claimer.running == 3
        state.abandoned = True
        nursery.cancel_scope.cancel()
    assert {store.status(i) for i in ids} == {"CLAIMED"}
    assert store.count("settle") == 0
    assert state.counters.released == 0


async def test_a_claimer_cancelled_without_abandoning_releases_its_rows(autojump_clock: object) -> None:
    # The same cancellation, not abandoned: the flush writes the releases (the contrast).
    store, state, app = FakeStore(), make_state(), App()
    Load(app, seconds=100)
    ids = add(store, 3, topic=FAST)
    claimer = build(store, state, app, concurrency=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claimer.run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert {store.status(i) for i in ids} == {"PENDING"}
    assert state.counters.released == 3


async def test_an_abandoned_heartbeat_leaves_the_worker_running_and_closes_its_connection(
    autojump_clock: object,
) -> None:
    store, state = FakeStore(), make_state()
    async with trio.open_nursery() as nursery:
        await nursery.start(Heartbeat(store, state, interval=30, reconnect_budget=120,
                                      environment="test", service="billing").run)
        state.abandoned = True
        nursery.cancel_scope.cancel()
    assert store.workers[state.worker_id].state == "running"
    assert store.count("mark_exited") == 0
    assert store.connections[0].closed
