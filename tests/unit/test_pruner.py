"""The pruner's loop on virtual time, against a small in-memory store (what it deletes,
and the shared schedule, are tested against PostgreSQL in tests/integration)."""

from __future__ import annotations

import logging

import pytest
import trio

from spectral.actors.pruner import COUNTED, Pruner, PruneSettings
from spectral.errors import DatabaseError, DatabaseUnavailableError

from ..fakes import make_state


class PruneFake:
    """``backlog`` rows of each kind to delete; ``failing`` makes calls raise."""

    def __init__(self, backlog: dict[str, int] | None = None) -> None:
        self.backlog = dict(backlog or {})
        self.failing: set[str] = set()
        self.calls: list[tuple[float, str]] = []
        self.finished: list[dict[str, int]] = []
        self.busy = False  # a pass runs elsewhere

    async def prune_enabled_override(self) -> bool | None:
        return None  # no live override: the process setting decides

    async def begin_prune_pass(self, worker_id: str, min_gap: float, lease: float) -> int | None:
        self.calls.append((trio.current_time(), "begin"))
        if "begin" in self.failing:
            raise DatabaseUnavailableError("connection refused")
        return None if self.busy else len(self.calls)

    async def finish_prune_pass(self, pass_id: int, pruned: dict[str, int], errors: list[str]) -> None:
        self.finished.append(dict(pruned))

    async def prune(self, kind: str, retention: float, limit: int) -> tuple[int, int]:
        self.calls.append((trio.current_time(), kind))
        if kind in self.failing:
            raise DatabaseError("statement timeout")
        n = min(limit, self.backlog.get(kind, 0))
        self.backlog[kind] = self.backlog.get(kind, 0) - n
        return n, 2 * n if kind in ("done", "dead") else 0

    async def mark_lost_workers(self, after: float) -> list[tuple[str, int]]:
        return []


SETTINGS = PruneSettings(interval=60.0, batch=10, pause=0.5)


async def test_defaults_retain_a_day_of_done_rows_and_two_weeks_of_dead_ones() -> None:
    s = PruneSettings()
    assert (s.enabled, s.interval, s.retain_done, s.retain_dead) == (True, 60.0, 86_400.0, 1_209_600.0)
    state = make_state()
    pruner = Pruner(PruneFake(), state, s)
    assert pruner.passes == 0
    assert state.prune is not None and state.prune["pruned_total"] == dict.fromkeys(COUNTED, 0)


async def test_starts_and_is_cancelled_at_once(autojump_clock: object) -> None:
    store = PruneFake()
    async with trio.open_nursery() as nursery:
        await nursery.start(Pruner(store, make_state(), SETTINGS).run)
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 0


async def test_runs_twice_and_adds_up_what_it_pruned(autojump_clock: object) -> None:
    store = PruneFake({"done": 25, "workers": 3})
    state = make_state()
    pruner = Pruner(store, state, SETTINGS)
    first = await pruner.run_once()
    store.backlog["done"] = 4
    second = await pruner.run_once()
    assert first is not None and second is not None
    assert (first.pruned["done"], first.pruned["ledger"], first.pruned["workers"]) == (25, 50, 3)
    assert second.pruned["done"] == 4
    assert pruner.passes == 2
    assert state.prune is not None and state.prune["pruned_total"]["done"] == 29
    assert store.finished == [first.pruned, second.pruned]


async def test_pauses_between_full_batches_only(autojump_clock: object) -> None:
    store = PruneFake({"done": 25})
    await Pruner(store, make_state(), SETTINGS).run_once()
    done_at = [t for t, kind in store.calls if kind == "done"]
    assert done_at == [0.0, 0.5, 1.0], "three batches of 10, 10 and 5, half a second apart"
    after = [t for t, kind in store.calls if kind == "dead"]
    assert after == [1.0], "a short batch is the last of its kind: no pause after it"


async def test_a_pass_run_elsewhere_is_skipped(autojump_clock: object) -> None:
    store = PruneFake({"done": 5})
    store.busy = True
    pruner = Pruner(store, make_state(), SETTINGS)
    assert await pruner.run_once() is None
    assert (pruner.passes, pruner.skipped) == (0, 1)
    assert store.backlog["done"] == 5


async def test_a_failing_kind_is_reported_and_the_others_still_run(autojump_clock: object) -> None:
    store = PruneFake({"done": 5, "workers": 2})
    store.failing.add("dead")
    state = make_state()
    report = await Pruner(store, state, SETTINGS).run_once()
    assert report is not None
    assert report.errors == ["dead: statement timeout"]
    assert (report.pruned["done"], report.pruned["workers"]) == (5, 2)
    assert state.prune is not None and state.prune["failures"] == 1


async def test_a_failed_pass_is_logged_and_the_next_runs_on_schedule(
    autojump_clock: object, caplog: pytest.LogCaptureFixture,
) -> None:
    store = PruneFake()
    store.failing.add("begin")
    state = make_state()
    caplog.set_level(logging.WARNING, logger="spectral.pruner")
    async with trio.open_nursery() as nursery:
        await nursery.start(Pruner(store, state, SETTINGS).run)
        await trio.sleep(150)
        nursery.cancel_scope.cancel()
    assert [t for t, kind in store.calls if kind == "begin"] == [0.0, 60.0, 120.0]
    assert "prune pass failed: connection refused" in caplog.text
    assert state.prune is not None and state.prune["failures"] == 3


async def test_survives_cancellation_mid_pass_and_runs_again(autojump_clock: object) -> None:
    store = PruneFake({"done": 100})
    pruner = Pruner(store, make_state(), SETTINGS)
    with trio.move_on_after(1.2):  # during the pause after the third batch
        await pruner.run_once()
    assert store.finished == [], "an abandoned pass is left unfinished (its lease runs out)"
    assert store.backlog["done"] == 70
    report = await pruner.run_once()
    assert report is not None and report.pruned["done"] == 70
    assert pruner.passes == 1
