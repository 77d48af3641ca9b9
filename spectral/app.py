"""The user's side of Spectral: an :class:`App` with handlers and actors registered on it."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, overload

from .config import TOPIC_MAX_LENGTH, TOPIC_RE
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .actors.user import ActorContext
    from .events import Event
    from .tx import Tx

#: What a keyed event that became DEAD does to its key (``@app.handler(on_dead=...)``).
ON_DEAD_POLICIES = ("block", "skip")

#: The reconciler's own sweeps; user sweeps may not take these names.
BUILTIN_SWEEPS = ("lost_wakeups", "orphaned_claims", "parked_heads", "retired_generations",
                  "stale_workers")

HandlerFn = Callable[["Event", "Tx"], Awaitable[None]]
ActorFn = Callable[["ActorContext"], Awaitable[None]]


@dataclass(frozen=True)
class HandlerSpec:
    """One registered handler.

    Attributes:
        name: the ledger key in ``core.event_handled``; keep it stable across deploys.
        topic: the topic it subscribes to.
        fn: ``async def fn(event, tx) -> None``.
        max_attempts: attempts before the event becomes DEAD (None: the setting's default).
        timeout: seconds this handler may run (None: HANDLER_MAX); never above HANDLER_MAX.
        on_dead: for keyed events, what the key does when this handler's failure makes
            the event DEAD: ``"block"`` (the key waits until the event is requeued or
            skipped) or ``"skip"`` (the key's next event runs).
    """

    name: str
    topic: str
    fn: HandlerFn = field(repr=False)
    max_attempts: int | None = None
    timeout: float | None = None
    on_dead: str = "block"


@dataclass(frozen=True)
class ActorSpec:
    """A long-running user actor, restarted with bounded backoff when it crashes."""

    name: str
    fn: ActorFn = field(repr=False)


SweepFn = Callable[["Tx", datetime], Awaitable[int]]
UnblockHook = Callable[[str, int, list[int]], Awaitable[None]]


@dataclass(frozen=True)
class SweepSpec:
    """A user reconcile sweep: ``async def fn(tx, cutoff) -> int`` (items unblocked).

    ``cutoff`` is the database clock minus the sweep's grace: items older than it and
    still waiting are stuck. ``fn`` runs in its own transaction each reconcile pass.
    """

    name: str
    fn: SweepFn = field(repr=False)
    grace: float | None = None


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


class App:
    """A Spectral application: the handlers and actors one deployment runs.

    Example::

        app = spectral.App(service="billing")

        @app.handler("order.created")
        async def send_receipt(event: spectral.Event, tx: spectral.Tx) -> None:
            await tx.execute("insert into receipts(order_id) values ($1)",
                             event.payload["order_id"])
    """

    def __init__(self, service: str = "spectral") -> None:
        if not service or not service.strip():
            raise ConfigurationError("App(service=...) must be a non-empty name")
        self.service = service
        self._handlers: dict[str, HandlerSpec] = {}
        self._by_topic: dict[str, list[HandlerSpec]] = {}
        self._actors: dict[str, ActorSpec] = {}
        self._sweeps: dict[str, SweepSpec] = {}
        self.unblock_hook: UnblockHook | None = None

    def handler(
        self,
        topic: str,
        *,
        name: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        on_dead: str = "block",
    ) -> Callable[[HandlerFn], HandlerFn]:
        """Register ``async def fn(event, tx)`` for ``topic``. Several may share a topic.

        ``on_dead`` (``"block"`` or ``"skip"``) decides whether a keyed event this
        handler fails for good holds its key (see docs/how-to/ordering.md).

        Raises:
            ConfigurationError: a bad topic, a duplicate name, a sync function, or a bad
                option value.
        """
        if not isinstance(topic, str) or not (
            1 <= len(topic) <= TOPIC_MAX_LENGTH and TOPIC_RE.match(topic)
        ):
            raise ConfigurationError(f"@app.handler: invalid topic {topic!r}")
        if max_attempts is not None and (
            not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1
        ):
            raise ConfigurationError(f"@app.handler: max_attempts must be >= 1, got {max_attempts!r}")
        if timeout is not None and not (
            isinstance(timeout, int | float) and not isinstance(timeout, bool)
            and 0 < timeout < math.inf
        ):
            raise ConfigurationError(f"@app.handler: timeout must be > 0 seconds, got {timeout!r}")
        if on_dead not in ON_DEAD_POLICIES:
            raise ConfigurationError(
                f"@app.handler: on_dead must be 'block' or 'skip', got {on_dead!r}"
            )

        def register(fn: HandlerFn) -> HandlerFn:
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"@app.handler: {_qualified_name(fn)} must be an 'async def' function"
                )
            spec = HandlerSpec(name or _qualified_name(fn), topic, fn, max_attempts, timeout,
                               on_dead)
            if spec.name in self._handlers:
                raise ConfigurationError(f"@app.handler: a handler named {spec.name!r} exists")
            self._handlers[spec.name] = spec
            self._by_topic.setdefault(topic, []).append(spec)
            return fn

        return register

    @overload
    def actor(self, fn: ActorFn, *, name: str | None = None) -> ActorFn: ...

    @overload
    def actor(
        self, fn: None = None, *, name: str | None = None
    ) -> Callable[[ActorFn], ActorFn]: ...

    def actor(
        self, fn: ActorFn | None = None, *, name: str | None = None
    ) -> ActorFn | Callable[[ActorFn], ActorFn]:
        """Register a long-running actor ``async def fn(ctx)`` (usable with or without args)."""

        def register(actor_fn: ActorFn) -> ActorFn:
            if not inspect.iscoroutinefunction(actor_fn):
                raise ConfigurationError(
                    f"@app.actor: {_qualified_name(actor_fn)} must be an 'async def' function"
                )
            spec = ActorSpec(name or _qualified_name(actor_fn), actor_fn)
            if spec.name in self._actors:
                raise ConfigurationError(f"@app.actor: an actor named {spec.name!r} exists")
            self._actors[spec.name] = spec
            return actor_fn

        return register(fn) if fn is not None else register

    def sweep(self, name: str, *, grace: float | None = None) -> Callable[[SweepFn], SweepFn]:
        """Register an application reconcile sweep, run by the reconciler every pass.

        ``grace`` (seconds) defaults to SPECTRAL_RECONCILE_GRACE.
        """
        if not name or not isinstance(name, str):
            raise ConfigurationError("@app.sweep: a name is required")
        if grace is not None and not (isinstance(grace, int | float) and 0 <= grace < math.inf):
            raise ConfigurationError(f"@app.sweep: grace must be >= 0 seconds, got {grace!r}")

        def register(fn: SweepFn) -> SweepFn:
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(f"@app.sweep: {_qualified_name(fn)} must be 'async def'")
            if name in self._sweeps or name in BUILTIN_SWEEPS:
                raise ConfigurationError(f"@app.sweep: a sweep named {name!r} exists")
            self._sweeps[name] = SweepSpec(name, fn, grace)
            return fn

        return register

    def on_unblock(self, fn: UnblockHook) -> UnblockHook:
        """Register ``async def hook(sweep, count, ids)``, called for unblocked items when
        SPECTRAL_RECONCILE_NOTIFY_UNBLOCK is on."""
        self.unblock_hook = fn
        return fn

    @property
    def sweeps(self) -> list[SweepSpec]:
        return list(self._sweeps.values())

    def handlers_for(self, topic: str) -> list[HandlerSpec]:
        return self._by_topic.get(topic, [])

    @property
    def handlers(self) -> list[HandlerSpec]:
        return list(self._handlers.values())

    @property
    def actors(self) -> list[ActorSpec]:
        return list(self._actors.values())

    def check(self, handler_max: float) -> None:
        """Validate the registrations against the runtime settings (called at start)."""
        for spec in self._handlers.values():
            if spec.timeout is not None and spec.timeout > handler_max:
                raise ConfigurationError(
                    f"handler {spec.name}: timeout {spec.timeout:g}s is larger than "
                    f"SPECTRAL_HANDLER_MAX ({handler_max:g}s)"
                )
