"""The claimer's fence and its last line of defence, on virtual time (pure trio logic; what
the database does with the outcomes is tested in tests/integration/test_guarantee.py)."""

from __future__ import annotations

import uuid

import pytest
import trio

from spectral.actors.claimer import Claimer
from spectral.app import App
from spectral.db import TurnTx
from spectral.events import Event
from spectral.state import RuntimeState
from spectral.turns import RetryPolicy, TurnRunner, is_cancellation
from spectral.tx import Tx

from ..fakes import FakeStore, FixedJitter, make_state, wait_until

TOPIC = "job.long"


def build(store: FakeStore, state: RuntimeState, app: App, *, fence_after: float) -> Claimer:
    turns = TurnRunner(app, store, state, handler_max=60.0, policy=RetryPolicy(3),
                       max_payload_bytes=10_000, rng=FixedJitter(1.0))
    return Claimer(store, state, turns, concurrency=4, batch_size=10, claim_ttl=300.0,
                   poll_interval=1.0, reconnect_budget=120.0, fence_after=fence_after)


def long_handler(app: App, runs: list[float], seconds: float = 10.0) -> None:
    @app.handler(TOPIC, name="long")
    async def long(event: Event, tx: Tx) -> None:
        runs.append(trio.current_time())
        await trio.sleep(seconds if len(runs) == 1 else 0)


async def test_a_worker_whose_lease_ages_past_the_fence_cancels_its_turns_and_stops_claiming(
    autojump_clock: object,
) -> None:
    store, state, app = FakeStore(), make_state(), App()
    runs: list[float] = []
    long_handler(app, runs)
    first = store.add(TOPIC)
    state.renew_lease()
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, fence_after=1.5).run)
        # No heartbeat renews the lease: after 1.5 s the turn is cut off and released.
        await wait_until(lambda: bool(runs))
        await wait_until(lambda: store.status(first) == "PENDING")
        assert 1.5 <= trio.current_time() - runs[0] <= 2.6
        row = store.row(first)
        assert row.attempts == 0 and "lost its heartbeat" in (row.last_error or "")
        second = store.add(TOPIC)
        await trio.sleep(5)
        assert store.status(first) == store.status(second) == "PENDING"
        assert len(runs) == 1, "fenced: nothing claimed"
        state.renew_lease()  # the heartbeat is back
        await wait_until(lambda: store.status(first) == store.status(second) == "DONE")
        nursery.cancel_scope.cancel()
    assert len(runs) == 3


async def test_a_renewed_lease_never_fences(autojump_clock: object) -> None:
    store, state, app = FakeStore(), make_state(), App()
    runs: list[float] = []
    long_handler(app, runs, seconds=10.0)
    event_id = store.add(TOPIC)
    state.renew_lease()

    async def heartbeat() -> None:
        while True:
            await trio.sleep(1.0)
            state.renew_lease()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeat)
        await nursery.start(build(store, state, app, fence_after=1.5).run)
        await wait_until(lambda: store.status(event_id) == "DONE")
        nursery.cancel_scope.cancel()
    assert len(runs) == 1
    assert store.row(event_id).attempts == 0


class BrokenStore(FakeStore):
    """A store whose turn transactions cannot even be created: Spectral's own code fails."""

    async def open_turn(self, event_id: int, token: uuid.UUID, handler: str) -> TurnTx:
        raise RuntimeError("a bug in the turn path")


async def test_a_turn_failing_inside_spectral_is_charged_and_the_worker_keeps_serving(
    autojump_clock: object,
) -> None:
    store, state, app = BrokenStore(), make_state(), App()

    @app.handler(TOPIC, name="h")
    async def h(event: Event, tx: Tx) -> None:
        pass

    event_id = store.add(TOPIC)
    async with trio.open_nursery() as nursery:
        await nursery.start(build(store, state, app, fence_after=float("inf")).run)
        await wait_until(lambda: store.status(event_id) == "DEAD")
        nursery.cancel_scope.cancel()
    row = store.row(event_id)
    assert row.attempts == 3
    assert "turn failed inside Spectral: RuntimeError: a bug in the turn path" in (row.last_error or "")


async def _cancelled() -> BaseException:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")


@pytest.mark.parametrize("make, expected", [
    (lambda c: c, True),
    (lambda c: BaseExceptionGroup("g", [c]), True),
    (lambda c: BaseExceptionGroup("g", [BaseExceptionGroup("h", [c]), c]), True),
    (lambda c: BaseExceptionGroup("g", [c, ValueError("x")]), False),
    (lambda c: SystemExit(3), False),
    (lambda c: KeyboardInterrupt(), False),
    (lambda c: ValueError("x"), False),
], ids=["bare", "group", "nested", "mixed", "SystemExit", "KeyboardInterrupt", "error"])
async def test_only_cancellation_alone_counts_as_cancellation(make: object, expected: bool) -> None:
    cancelled = await _cancelled()
    assert is_cancellation(make(cancelled)) is expected  # type: ignore[operator]
