"""Registering handlers and actors on an App, and validating them."""

from __future__ import annotations

import pytest

from spectral.actors.user import ActorContext
from spectral.app import App
from spectral.config import TOPIC_MAX_LENGTH
from spectral.errors import ConfigurationError
from spectral.events import Event
from spectral.tx import Tx


async def on_order(event: Event, tx: Tx) -> None:
    pass


async def other(event: Event, tx: Tx) -> None:
    pass


def test_default_service_and_empty_registrations() -> None:
    app = App()
    assert app.service == "spectral"
    assert (app.handlers, app.actors, app.handlers_for("a")) == ([], [], [])


@pytest.mark.parametrize("service", ["", "   "])
def test_service_must_be_named(service: str) -> None:
    with pytest.raises(ConfigurationError, match="non-empty"):
        App(service=service)


def test_default_handler_name_is_module_qualified() -> None:
    app = App()
    app.handler("order.created")(on_order)
    (spec,) = app.handlers
    assert spec.name == f"{__name__}.on_order"
    assert spec.topic == "order.created"
    assert (spec.max_attempts, spec.timeout) == (None, None)


def test_decorator_returns_the_function_and_keeps_options() -> None:
    app = App()
    registered = app.handler("order.created", name="receipts", max_attempts=3, timeout=2.5)(on_order)
    assert registered is on_order
    (spec,) = app.handlers
    assert (spec.name, spec.fn, spec.max_attempts, spec.timeout) == ("receipts", on_order, 3, 2.5)


def test_fan_out_keeps_every_handler_of_a_topic_in_order() -> None:
    app = App()
    app.handler("order.created")(on_order)
    app.handler("order.created")(other)
    app.handler("order.paid", name="paid")(on_order)
    assert [h.name for h in app.handlers_for("order.created")] == [
        f"{__name__}.on_order", f"{__name__}.other"]
    assert [h.name for h in app.handlers_for("order.paid")] == ["paid"]
    assert app.handlers_for("order.shipped") == []
    assert len(app.handlers) == 3


@pytest.mark.parametrize("topic", ["", "has space", ".leading", "trailing.", "a..b", "ü",
                                   "x" * (TOPIC_MAX_LENGTH + 1), 42])
def test_bad_topic_is_rejected(topic: object) -> None:
    with pytest.raises(ConfigurationError, match="invalid topic"):
        App().handler(topic)  # type: ignore[arg-type]


@pytest.mark.parametrize("topic", ["a", "order.created", "A-b_c.9", "x" * TOPIC_MAX_LENGTH])
def test_good_topics_are_accepted(topic: str) -> None:
    app = App()
    app.handler(topic)(on_order)
    assert app.handlers[0].topic == topic


def test_sync_handler_is_rejected() -> None:
    def sync(event: Event, tx: Tx) -> None:
        pass

    with pytest.raises(ConfigurationError, match="must be an 'async def' function"):
        App().handler("order.created")(sync)  # type: ignore[arg-type]


def test_duplicate_handler_name_is_rejected() -> None:
    app = App()
    app.handler("order.created")(on_order)
    with pytest.raises(ConfigurationError, match="exists"):
        app.handler("order.paid")(on_order)
    app.handler("order.paid", name="paid")(on_order)
    with pytest.raises(ConfigurationError, match="'paid' exists"):
        app.handler("order.shipped", name="paid")(other)
    assert [h.name for h in app.handlers] == [f"{__name__}.on_order", "paid"]


@pytest.mark.parametrize("max_attempts", [0, -1, 1.5])
def test_bad_max_attempts_is_rejected(max_attempts: object) -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        App().handler("a", max_attempts=max_attempts)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "5"])
def test_bad_timeout_is_rejected(timeout: object) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        App().handler("a", timeout=timeout)  # type: ignore[arg-type]


def test_check_rejects_a_timeout_above_handler_max() -> None:
    app = App()
    app.handler("a", name="slow", timeout=90)(on_order)
    app.handler("a", name="fine", timeout=60)(other)
    with pytest.raises(ConfigurationError, match=r"slow: timeout 90s .* SPECTRAL_HANDLER_MAX \(60s\)"):
        app.check(60.0)
    app.check(90.0)  # the boundary is allowed


def test_check_accepts_handlers_without_a_timeout() -> None:
    app = App()
    app.handler("a")(on_order)
    app.check(0.5)
    assert app.handlers[0].timeout is None


def test_actors_register_with_or_without_arguments() -> None:
    app = App()

    @app.actor
    async def ticker(ctx: ActorContext) -> None:
        pass

    @app.actor(name="sweeper")
    async def sweep(ctx: ActorContext) -> None:
        pass

    assert [a.name for a in app.actors] == [
        f"{__name__}.test_actors_register_with_or_without_arguments.<locals>.ticker", "sweeper"]
    assert app.actors[1].fn is sweep


def test_sync_or_duplicate_actor_is_rejected() -> None:
    app = App()

    def sync(ctx: ActorContext) -> None:
        pass

    with pytest.raises(ConfigurationError, match="async def"):
        app.actor(sync)  # type: ignore[arg-type]

    async def twice(ctx: ActorContext) -> None:
        pass

    app.actor(twice, name="one")
    with pytest.raises(ConfigurationError, match="'one' exists"):
        app.actor(twice, name="one")
