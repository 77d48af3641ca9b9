"""The supervisor: start order, signals, drain and exit codes.

Supervision policy, per actor:

============  ==========================================================================
heartbeat     reconnects with backoff; past SPECTRAL_RECONNECT_BUDGET the process fails
listener      reconnects with backoff (poll-only meanwhile); past the budget, fails
claimer       reconnects with backoff; past the budget, fails; on drain, finishes & returns
reaper        a failed pass is logged and the next runs on schedule
reconciler    a failed sweep or pass is logged and the next runs on schedule
pruner        a failed pass (or kind) is logged and the next runs on schedule
user actors   restarted with backoff (1 s doubling to 60 s)
============  ==========================================================================

Any other exception in a Spectral actor is a bug: it fails the process loudly (exit 1)
rather than running on in an unknown state; rows it held are recovered by the reaper.

Exit codes: 0 after a clean drain; 1 on failure; 2 for bad input or configuration;
3 when a turn stuck in blocking code outlived the drain; 130 after a second signal.
"""

from __future__ import annotations

import getpass
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import trio

from .actors.claimer import Claimer
from .actors.heartbeat import Heartbeat
from .actors.listener import OutboxListener
from .actors.pruner import Pruner, PruneSettings
from .actors.reaper import Reaper
from .actors.reconciler import Reconciler, ReconcileSettings
from .actors.supervisor import ActorSupervisor
from .app import App
from .config import Settings
from .db import Store, applied_versions, latest_version, migrate, open_database, shipped
from .errors import ConfigurationError, NoGenerationError, SchemaNotReadyError
from .metrics import Metrics
from .observe import QueueSnapshot
from .state import RuntimeState
from .turns import RetryPolicy, TurnRunner
from .version import VersionInfo
from .version import load as load_version

if TYPE_CHECKING:
    from .actors.http import HttpServer

log = logging.getLogger("spectral.runtime")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STUCK = 3
EXIT_SECOND_SIGNAL = 130

#: Seconds past the drain deadline before the watchdog declares a turn stuck.
WATCHDOG_GRACE = 5.0


def make_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{random.randbytes(3).hex()}"


async def ensure_schema(url: str, settings: Settings) -> None:
    """Migrate in development; elsewhere refuse to run on an old schema."""
    current = {m["version"] for m in await applied_versions(url)}
    missing = [m for m in shipped() if m.version not in current]
    if not missing:
        return
    if settings.environment in ("development", "test"):
        report = await migrate(url, settings.payload_cap_to_apply)
        log.info("migrated the database (%d migrations; development only)", len(report.applied))
        return
    raise SchemaNotReadyError(
        f"the database lacks {len(missing)} migrations: run 'spectral migrate' first"
    )


async def check_handler_role(store: Store, role: str) -> None:
    """Refuse to start when turns could not switch to SPECTRAL_HANDLER_ROLE (every turn
    would fail and its event end DEAD)."""
    usable = await store.can_set_role(role)
    if usable is None:
        raise ConfigurationError(f"SPECTRAL_HANDLER_ROLE: role {role!r} does not exist")
    if not usable:
        raise ConfigurationError(
            f"SPECTRAL_HANDLER_ROLE: the worker's login role is not a member of {role!r} "
            f"(GRANT {role} TO <the worker's login role>)"
        )


async def resolve_generation(store: Store, settings: Settings) -> int:
    """The generation this process runs (see the runbook's stamping invariants)."""
    if settings.generation is not None:
        if not await store.generation_exists(settings.generation):
            raise NoGenerationError(
                f"SPECTRAL_GENERATION={settings.generation} is not in core.deployments: "
                "allocate it with 'spectral deploy allocate'"
            )
        return settings.generation
    if settings.environment == "production":
        raise ConfigurationError(
            "SPECTRAL_ENVIRONMENT=production needs SPECTRAL_GENERATION set to an allocated generation"
        )
    newest = await store.newest_generation()
    if newest is not None:
        log.info("no SPECTRAL_GENERATION: running the newest generation %d (development)", newest)
        return newest
    row = await store.allocate_generation(
        "development", f"{getpass.getuser()}@{socket.gethostname()}", None
    )
    generation = int(row["generation"])
    log.info("allocated generation %d for development (no SPECTRAL_GENERATION given)", generation)
    return generation


@dataclass
class _Exit:
    code: int = EXIT_OK


class _DrainWatchdog:
    """Exits the process when a turn blocks the trio thread long past the drain deadline.

    trio cannot cancel blocking code, and while such code holds the trio thread trio's
    signal task never runs: the drain never begins there. A Python signal handler still
    runs (the blocking call is interrupted, the handler runs in the main thread), so the
    first SIGTERM/SIGINT arms the watchdog from a handler chained in front of trio's. The
    handler only writes a byte to a pipe: no lock is taken in signal context.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.state: RuntimeState | None = None
        self._finished = False
        self._armed = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        threading.Thread(target=self._run, name="spectral-drain-watchdog", daemon=True).start()

    def install(self, *signums: int) -> None:
        """Chain in front of the handlers installed now (trio's, restored when it exits)."""
        for signum in signums:
            previous = signal.getsignal(signum)

            def handler(num: int, frame: FrameType | None, previous: Any = previous) -> None:
                if not self._armed:
                    self._armed = True
                    self._poke()
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, handler)

    def finish(self) -> None:
        """The process is exiting normally (call after the signal handlers are restored)."""
        self._finished = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._write, b"x")
        except OSError:  # pragma: no cover - a full pipe has already woken the thread
            pass

    def _run(self) -> None:
        os.read(self._read, 1)
        if not self._finished:
            time.sleep(self.seconds)
        if self._finished:
            os.close(self._read)
            os.close(self._write)
            return
        stuck = self.state.stuck_turns() if self.state is not None else []
        names = ", ".join(f"{t.handler} on event {t.event_id}" for t in stuck) or "unknown"
        log.critical(
            "drain deadline passed %.0fs ago and the process is still running: a turn is stuck "
            "in blocking code (%s); exiting, the reaper will recover its row",
            WATCHDOG_GRACE, names,
            extra={"worker_id": self.state.worker_id if self.state is not None else None},
        )
        for handler in logging.getLogger("spectral").handlers:
            handler.flush()
        os._exit(EXIT_STUCK)


async def _watch_signals(
    signals: AsyncIterator[int], state: RuntimeState, settings: Settings,
    root: trio.CancelScope, exit: _Exit,
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not state.draining.is_set():
            log.info("%s: draining (stop claiming; %.0fs for in-flight turns)", name,
                     settings.drain_timeout,
                     extra={"worker_id": state.worker_id, "generation": state.generation})
            # The drain watchdog was armed by the signal handler itself (_DrainWatchdog).
            state.begin_drain(settings.drain_timeout)
        else:
            log.warning("%s again: cancelling everything", name,
                        extra={"worker_id": state.worker_id})
            exit.code = EXIT_SECOND_SIGNAL
            root.cancel()
            return


def reconcile_settings(settings: Settings) -> ReconcileSettings:
    return ReconcileSettings(
        enabled=settings.reconcile_enabled, interval=settings.reconcile_interval,
        grace=settings.reconcile_grace, notify_unblock=settings.reconcile_notify_unblock,
        stale_after=settings.heartbeat_stale_after, retire_policy=settings.retire_policy,
        retire_grace=settings.retire_grace, max_payload_bytes=settings.max_payload_bytes,
    )


def prune_settings(settings: Settings) -> PruneSettings:
    return PruneSettings(
        enabled=settings.prune_enabled, interval=settings.prune_interval,
        batch=settings.prune_batch, retain_done=settings.retain_done,
        retain_dead=settings.retain_dead, retain_workers=settings.retain_workers,
        retain_records=settings.retain_records, lost_after=settings.worker_lost_after,
    )


async def run_workers(
    app: App, settings: Settings, store: Store, state: RuntimeState,
    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the worker actors in order; return once drained."""
    policy = RetryPolicy(settings.max_attempts, settings.retry_base, settings.retry_max)
    turns = TurnRunner(app, store, state, handler_max=settings.handler_max, policy=policy,
                       max_payload_bytes=settings.max_payload_bytes)
    claimer = Claimer(
        store, state, turns, concurrency=settings.concurrency, batch_size=settings.batch_size,
        claim_ttl=settings.claim_ttl, poll_interval=settings.poll_interval,
        reconnect_budget=settings.reconnect_budget, fence_after=settings.fence_after,
    )
    async with trio.open_nursery() as background:
        await background.start(
            Heartbeat(store, state, interval=settings.heartbeat_interval,
                      reconnect_budget=settings.reconnect_budget,
                      environment=settings.environment, service=app.service).run
        )
        if settings.listen_enabled and store.can_listen:
            await background.start(
                OutboxListener(store, state, reconnect_budget=settings.reconnect_budget).listen
            )
        elif settings.listen_enabled:
            state.listener_mode = "poll-only"
            state.listener_note = ("SPECTRAL_POOLER=transaction without "
                                   "SPECTRAL_LISTEN_DATABASE_URL: LISTEN does not stick")
            log.warning("%s; no NOTIFY wake-ups, polling every %gs", state.listener_note,
                        settings.poll_interval, extra={"worker_id": state.worker_id})
        else:
            state.listener_mode = "poll-only"
            state.listener_note = "SPECTRAL_LISTEN_ENABLED=false"
            log.warning("SPECTRAL_LISTEN_ENABLED=false: no NOTIFY wake-ups, polling only")
        if settings.reaper_enabled:
            await background.start(Reaper(store, state, interval=settings.reap_interval).run)
        else:
            log.warning("SPECTRAL_REAPER_ENABLED=false: lapsed claims are not reaped here")
        await background.start(Reconciler(store, state, app, reconcile_settings(settings)).run)
        # Started either way: 'spectral prune on|off' overrides SPECTRAL_PRUNE_ENABLED live.
        await background.start(Pruner(store, state, prune_settings(settings)).run)
        if not settings.prune_enabled:
            log.warning("SPECTRAL_PRUNE_ENABLED=false: finished rows are not pruned here "
                        "unless 'spectral prune on' overrides it")
        for spec in app.actors:
            await background.start(
                ActorSupervisor(spec, store, state,
                                max_payload_bytes=settings.max_payload_bytes).run
            )
        async with trio.open_nursery() as claiming:
            await claiming.start(claimer.run)
            task_status.started()
        background.cancel_scope.cancel()
    log.info("drained", extra={"worker_id": state.worker_id, "acked": state.counters.acked})
    state.stopped.set()


async def _http_server(
    app: App, settings: Settings, store: Store, state: RuntimeState, snapshot: QueueSnapshot,
    metrics: Metrics, version: VersionInfo, token: str | None, *, workers: bool,
) -> HttpServer:
    # Imported here: `spectral worker` never loads the web stack (about a third of the
    # start-up imports and several MiB of resident memory).
    from .actors.http import HttpServer

    deployed_at = await store.deployed_at(state.generation)
    return HttpServer(
        state=state, snapshot=snapshot, metrics=metrics, version=version,
        service=app.service, environment=settings.environment,
        deployed_at=None if deployed_at is None else deployed_at.isoformat(),
        detail_token=token, host=settings.http_host, port=settings.http_port,
        drain_budget=settings.drain_timeout, workers=workers, schema_version=latest_version(),
        listen_enabled=settings.listen_enabled and store.can_listen, dashboard_store=store,
        ui_session_ttl=settings.ui_session_ttl, stale_after=settings.heartbeat_stale_after,
        ops_host=settings.ops_host, ops_port=settings.ops_port,
        ops_token_required=settings.ops_token_required,
    )


async def _api_only(state: RuntimeState) -> None:
    await state.draining.wait()
    state.stopped.set()


async def boot(
    store: Store, url: str, settings: Settings, *, check_role: bool = True,
) -> tuple[Settings, RuntimeState]:
    """Check the schema (and, for workers, the handler role), resolve the generation and
    build the process's state.

    Returns the settings with the payload cap the database enforces (producers'
    pre-checks use it) and a fresh :class:`RuntimeState`.
    """
    await ensure_schema(url, settings)
    if check_role and settings.handler_role is not None:
        await check_handler_role(store, settings.handler_role)
    generation = await resolve_generation(store, settings)
    settings = settings.with_changes(max_payload_bytes=await store.max_payload_bytes())
    return settings, RuntimeState(make_worker_id(), generation)


async def supervise(
    app: App, settings: Settings, store: Store, state: RuntimeState,
    signals: AsyncIterator[int], *, workers: bool = True, server: HttpServer | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run the workers and/or the HTTP server until drained; returns the exit code.

    Args:
        signals: where SIGTERM and SIGINT arrive. ``spectral worker`` passes trio's
            signal receiver; :func:`spectral.testing.running` a channel it feeds, so a
            test's ``sigterm()`` takes this same path.
        server: the HTTP server to run beside the workers, if any.
        task_status: started with the HTTP binds once every actor is running.

    Cancellation:
        Everything stops at once. With ``state.abandoned`` set (a simulated SIGKILL) the
        claims and the worker row are left as a killed process leaves them.
    """
    exit = _Exit()
    async with trio.open_nursery() as root:
        root.start_soon(_watch_signals, signals, state, settings, root.cancel_scope, exit)
        async with trio.open_nursery() as serving:
            if workers:
                await serving.start(run_workers, app, settings, store, state)
            else:
                serving.start_soon(_api_only, state)
            binds: list[str] = await serving.start(server.run) if server is not None else []
            log.info("spectral ready", extra={
                "worker_id": state.worker_id, "generation": state.generation,
                "service": app.service, "handlers": len(app.handlers) if workers else 0,
                "http": " ".join(binds) or None, "pid": os.getpid(),
            })
            task_status.started(binds)
        root.cancel_scope.cancel()
    return exit.code


def check_startup(app: App, settings: Settings, *, workers: bool = True) -> None:
    """The checks of the settings and the app made before anything starts."""
    if workers:
        settings.validate_runtime()
    app.check(settings.handler_max)


async def serve(
    app: App, settings: Settings, url: str, *, workers: bool = True, http: bool = True
) -> int:
    """Run the workers and/or the HTTP server until drained; returns the exit code."""
    check_startup(app, settings, workers=workers)
    token = settings.resolved_detail_token()
    if http and settings.ops_token_required and token is None:
        raise ConfigurationError(
            "SPECTRAL_OPS_TOKEN_REQUIRED=true needs SPECTRAL_DETAIL_TOKEN or "
            "SPECTRAL_DETAIL_TOKEN_FILE (the bearer token /queue and /metrics then ask for)"
        )
    version = load_version(settings.version_file)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        watchdog = _DrainWatchdog(settings.drain_timeout + WATCHDOG_GRACE)
        watchdog.install(signal.SIGTERM, signal.SIGINT)
        listen_url = settings.listen_database_url
        async with open_database(
            url, pool_size=settings.pool_size, pooler=settings.pooler,
            listen_url=None if listen_url is None else listen_url.reveal(),
            handler_role=settings.handler_role,
        ) as store:
            settings, state = await boot(store, url, settings, check_role=workers)
            watchdog.state = state
            server = None
            if http:
                snapshot = QueueSnapshot(store, stale_after=settings.heartbeat_stale_after)
                server = await _http_server(
                    app, settings, store, state, snapshot, Metrics(state, snapshot), version,
                    token, workers=workers,
                )
            code = await supervise(app, settings, store, state, signals, workers=workers,
                                   server=server)
    # Leaving the receiver restored the default actions. The drain is over and every
    # outcome is written, so a signal between here and the exit changes nothing: ignore
    # it rather than let it kill the process with a misleading status.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watchdog.finish()
    log.info("exiting", extra={"exit_code": code})
    return code
