"""Supervision of users' actors on virtual time, with a fake store."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.lowlevel

from spectral.actors.supervisor import HEALTHY_AFTER, RESTART_CAP, ActorSupervisor
from spectral.actors.user import ActorContext
from spectral.app import App
from spectral.errors import DatabaseUnavailableError, InvalidTopicError
from spectral.state import RuntimeState

from ..fakes import FakeStore, FixedJitter, make_state


class Script:
    """An actor whose n-th run does what ``plan(n)`` says: 'crash', 'return', or seconds."""

    def __init__(self, app: App, plan: dict[int, float | str] | None = None) -> None:
        self.starts: list[float] = []
        self.cancelled = 0
        self.plan = plan or {}

        @app.actor(name="scripted")
        async def scripted(ctx: ActorContext) -> None:
            run = len(self.starts)
            self.starts.append(trio.current_time())
            what = self.plan.get(run, "crash")
            try:
                if what == "crash":
                    raise RuntimeError(f"crash {run}")
                if what == "forever":
                    await trio.sleep_forever()
                if isinstance(what, float):
                    await trio.sleep(what)
                    raise RuntimeError(f"crash {run} after {what}s")
            except trio.Cancelled:
                self.cancelled += 1
                raise


def supervisor(app: App, store: FakeStore, state: RuntimeState) -> ActorSupervisor:
    (spec,) = app.actors
    return ActorSupervisor(spec, store, state, max_payload_bytes=1000, rng=FixedJitter(1.0))


async def test_defaults_nothing_runs_before_run(autojump_clock: object) -> None:
    app = App()
    script = Script(app)
    sup = supervisor(app, FakeStore(), make_state())
    assert sup.restarts == 0
    assert script.starts == []


async def test_starts_and_is_cancelled_at_once(autojump_clock: object) -> None:
    app = App()
    script = Script(app, {0: "forever"})
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor(app, FakeStore(), make_state()).run)
        await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert trio.current_time() == 0
    assert script.starts == [0]
    assert script.cancelled == 1


async def test_run_once_twice_logs_crashes_and_returns(
    autojump_clock: object, caplog: pytest.LogCaptureFixture,
) -> None:
    app = App()
    script = Script(app, {0: "crash", 1: "return"})
    sup = supervisor(app, FakeStore(), make_state())
    with caplog.at_level(logging.WARNING, logger="spectral.actor"):
        await sup.run_once()
        await sup.run_once()
    assert len(script.starts) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["actor scripted crashed; restarting it", "actor scripted returned; restarting it"]
    assert caplog.records[0].exc_info is not None


async def test_crashing_actor_is_restarted_with_growing_backoff(autojump_clock: object) -> None:
    app = App()
    script = Script(app)  # crashes every time
    sup = supervisor(app, FakeStore(), make_state())
    with trio.move_on_after(250):
        await sup.run()
    # Delays 1, 2, 4, ... seconds, capped at a minute.
    assert script.starts == [0, 1, 3, 7, 15, 31, 63, 123, 183, 243]
    assert RESTART_CAP == 60
    assert sup.restarts == 10


async def test_returning_actor_is_restarted_too(autojump_clock: object) -> None:
    app = App()
    script = Script(app, {i: "return" for i in range(10)})
    with trio.move_on_after(10):
        await supervisor(app, FakeStore(), make_state()).run()
    assert script.starts == [0, 1, 3, 7]


async def test_a_healthy_long_run_resets_the_backoff(autojump_clock: object) -> None:
    app = App()
    script = Script(app, {2: HEALTHY_AFTER + 1.0})
    with trio.move_on_after(70):
        await supervisor(app, FakeStore(), make_state()).run()
    # 0 crash, 1 crash (+2 s), 3 runs 61 s, then the delays start again from 1 s.
    assert script.starts == [0, 1, 3, 65, 67]


async def test_a_short_run_does_not_reset_the_backoff(autojump_clock: object) -> None:
    app = App()
    script = Script(app, {2: HEALTHY_AFTER - 1.0})
    with trio.move_on_after(70):
        await supervisor(app, FakeStore(), make_state()).run()
    assert script.starts == [0, 1, 3, 66]  # 3 + 59 s + a 4 s delay


async def test_cancellation_stops_it_during_the_backoff(autojump_clock: object) -> None:
    app = App()
    script = Script(app)
    with trio.move_on_after(5):
        await supervisor(app, FakeStore(), make_state()).run()
    assert script.starts == [0, 1, 3]
    await trio.sleep(100)
    assert script.starts == [0, 1, 3]


async def test_survives_a_store_error_inside_the_actor(autojump_clock: object) -> None:
    app = App()
    store, state = FakeStore(), make_state(generation=5)
    published: list[int] = []
    store.fail_next("publish", DatabaseUnavailableError("connection refused"))

    @app.actor
    async def ticker(ctx: ActorContext) -> None:
        published.append(await ctx.publish("tick", {"n": len(published)}))
        await trio.sleep_forever()

    with trio.move_on_after(10):
        await supervisor(app, store, state).run()
    assert store.count("publish") == 2
    assert len(published) == 1
    assert store.row(published[0]).generation == 5


async def test_context_publishes_with_the_generation_and_checks_input(autojump_clock: object) -> None:
    store, state = FakeStore(), make_state(generation=9, worker_id="w-9")
    ctx = ActorContext("noop", state.worker_id, state.generation, state.draining, store, 50)
    event_id = await ctx.publish("a.b", {"k": "v"})
    assert (store.row(event_id).topic, store.row(event_id).payload) == ("a.b", {"k": "v"})
    assert store.row(event_id).generation == 9
    with pytest.raises(InvalidTopicError):
        await ctx.publish("bad topic", {})
    assert store.count("publish") == 1, "a bad topic never reaches the database"
    assert await ctx.execute("delete from t where id = $1", 3) == "OK"
    assert store.calls[-1].args == ("delete from t where id = $1", 3)
