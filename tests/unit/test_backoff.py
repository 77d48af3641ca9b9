"""Backoff delays and the Reconnector, on virtual time."""

from __future__ import annotations

import random

import pytest
import trio

from spectral.actors._backoff import Reconnector
from spectral.errors import DatabaseUnavailableError, ReconnectBudgetExhaustedError
from spectral.rules import backoff_delay

from ..fakes import FixedJitter, make_state

DOWN = DatabaseUnavailableError("connection refused")


@pytest.mark.parametrize("seed", range(5))
def test_backoff_delay_stays_between_half_step_and_step(seed: int) -> None:
    rng = random.Random(seed)
    for attempt in range(1, 12):
        step = min(30.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(50):
            delay = backoff_delay(attempt, 0.5, 30.0, rng)
            assert step / 2 <= delay <= step


def test_backoff_delay_doubles_then_is_capped() -> None:
    full = FixedJitter(1.0)
    assert [backoff_delay(a, 1.0, 10.0, full) for a in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    half = FixedJitter(0.0)
    assert backoff_delay(1, 1.0, 10.0, half) == 0.5
    assert backoff_delay(200, 1.0, 10.0, half) == 5.0


def test_backoff_delay_treats_attempt_zero_as_the_first() -> None:
    assert backoff_delay(0, 2.0, 60.0, FixedJitter(1.0)) == 2.0


def test_backoff_delay_uses_the_jitter() -> None:
    rng = random.Random(7)
    delays = {backoff_delay(5, 1.0, 600.0, rng) for _ in range(20)}
    assert len(delays) > 1


async def test_reconnector_failure_marks_the_consumer_down_and_sleeps(autojump_clock: object) -> None:
    state = make_state()
    reconnect = Reconnector("listener", state, budget=60, base=1.0, cap=8.0, rng=FixedJitter(1.0))
    start = trio.current_time()
    await reconnect.failed(DOWN)
    assert trio.current_time() - start == pytest.approx(1.0)
    assert state.down == {"listener"}
    assert state.worker_state == "reconnecting"
    assert state.counters.reconnects == 1
    await reconnect.failed(DOWN)
    await reconnect.failed(DOWN)
    # 1 + 2 + 4 seconds of backoff; one outage counts one reconnect.
    assert trio.current_time() - start == pytest.approx(7.0)
    assert state.counters.reconnects == 1


async def test_reconnector_success_marks_it_up_then_running_after_the_beat(
    autojump_clock: object,
) -> None:
    state = make_state()
    reconnect = Reconnector("claimer", state, budget=60, rng=FixedJitter(0.5))
    await reconnect.failed(DOWN)
    reconnect.succeeded()
    assert state.down == set()
    # Still 'reconnecting' until the heartbeat has written the outage and clears it.
    assert state.recovered is True
    assert state.worker_state == "reconnecting"
    state.recovered = False
    assert state.worker_state == "running"


async def test_reconnector_success_without_failure_changes_nothing(autojump_clock: object) -> None:
    state = make_state()
    Reconnector("heartbeat", state, budget=60).succeeded()
    assert state.worker_state == "running"
    assert state.recovered is False
    assert state.counters.reconnects == 0


async def test_reconnector_raises_once_failures_outlast_the_budget(autojump_clock: object) -> None:
    state = make_state()
    reconnect = Reconnector("listener", state, budget=10, base=1.0, cap=2.0, rng=FixedJitter(1.0))
    start = trio.current_time()
    with pytest.raises(ReconnectBudgetExhaustedError, match="listener.*SPECTRAL_RECONNECT_BUDGET=10s"):
        while True:
            await reconnect.failed(DOWN)
    elapsed = trio.current_time() - start
    # Failures at 0, 1, 3, 5, 7, 9, 11: the one at 11 is past the 10 s budget.
    assert elapsed == pytest.approx(11.0)
    assert state.down == {"listener"}


async def test_reconnector_budget_restarts_after_a_success(autojump_clock: object) -> None:
    state = make_state()
    reconnect = Reconnector("claimer", state, budget=5, base=1.0, cap=2.0, rng=FixedJitter(1.0))
    for _ in range(3):  # 0 + 1 + 2 = 3 s of failures, then a success
        await reconnect.failed(DOWN)
    reconnect.succeeded()
    await trio.sleep(100)
    for _ in range(3):  # a new outage gets the whole budget again
        await reconnect.failed(DOWN)
    assert state.down == {"claimer"}
    # After a success the delays start again from the base.
    before = trio.current_time()
    reconnect.succeeded()
    await reconnect.failed(DOWN)
    assert trio.current_time() - before == pytest.approx(1.0)
