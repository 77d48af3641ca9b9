"""The ``spectral`` command. Every setting flag also reads its SPECTRAL_* variable."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import getpass
import importlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import logs, render
from ._version import __version__
from .actors._switch import ACTIONS as SWITCH_ACTIONS
from .app import App
from .config import Settings
from .db import Store, embedded, migrate, open_database, redact, resolve_url
from .db.rows import NewDeployment
from .db.urls import password_of
from .errors import (
    AppLoadError,
    ConfigurationError,
    InvalidEventError,
    InvalidPayloadError,
    NoGenerationError,
    RolloutRefusedError,
    SchemaNotReadyError,
    SpectralError,
)
from .events import check_topic, encode_payload, publish_extras
from .observe import health_view
from .verdicts import verdicts

if TYPE_CHECKING:
    from .rollout import RolloutResult

T = TypeVar("T")

DEMO_APP = "spectral.demo:app"
#: `spectral prune --dry-run` counts DONE and DEAD rows up to this many each.
DRY_RUN_CAP = 1_000_000
USER_ERRORS: tuple[type[SpectralError], ...] = (
    ConfigurationError, InvalidEventError, AppLoadError, NoGenerationError, SchemaNotReadyError,
    RolloutRefusedError)


_CONNECTION = ("database_url", "database_url_file", "pooler", "data_dir", "log_format", "log_level")

#: The settings each command reads, so its --help and flags name those only (None: every
#: setting). The environment still supplies all of them; a flag a command does not read
#: is a usage error instead of being silently ignored.
COMMAND_SETTINGS: dict[str, tuple[str, ...] | None] = {
    "run": None,
    "worker": None,
    "api": None,
    "migrate": (*_CONNECTION, "max_payload_bytes", "heartbeat_interval"),
    "publish": (*_CONNECTION, "generation", "environment", "max_payload_bytes"),
    "requeue": _CONNECTION,
    "skip": _CONNECTION,
    "inspect": (*_CONNECTION, "heartbeat_interval"),
    "prune": (*_CONNECTION, "prune_enabled", "prune_interval", "prune_batch", "retain_done",
              "retain_dead", "retain_workers", "retain_records", "worker_lost_after"),
    "deploy allocate": _CONNECTION,
    "deploy rollout": (*_CONNECTION, "generation", "environment", "drain_timeout",
                       "heartbeat_interval", "reconcile_interval"),
    "deploy history": _CONNECTION,
    "reconcile": _CONNECTION,
    "db": ("data_dir", "log_format", "log_level"),
}


def _settings_parser(command: str) -> argparse.ArgumentParser:
    used = COMMAND_SETTINGS[command]
    unknown = set(used or ()) - {f.name for f in Settings.fields()}
    assert not unknown, f"COMMAND_SETTINGS[{command!r}] names no setting {sorted(unknown)}"
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (flags override environment variables)")
    for f in Settings.fields():
        if not f.metadata["flag"]:
            # A secret with no flag (it would show in ps; its *_FILE setting has one). Every
            # command still parses it, to refuse it with a clear line that does not echo it
            # (argparse's "unrecognized arguments" would print the secret).
            group.add_argument("--" + f.name.replace("_", "-"), dest=f"refused_{f.name}",
                               help=argparse.SUPPRESS)
            continue
        if used is not None and f.name not in used:
            continue
        env = f.metadata["env"]
        also = f.metadata["also"]
        names = " or ".join((env, *also))
        default = "unset" if f.default is None else f.default
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f"setting_{f.name}", metavar="VALUE",
            help=f"{f.metadata['help']} [env: {names}; default: {default}]",
        )
    return parent


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spectral",
        description="A worker runtime for transactional-outbox systems on PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"spectral {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", parents=[_settings_parser("run")],
        help="run the workers and the HTTP server (default: the demo app)",
    )
    run.add_argument("app", nargs="?", default=DEMO_APP, help=f"MODULE:APP (default {DEMO_APP})")
    worker = sub.add_parser("worker", parents=[_settings_parser("worker")],
                            help="run the workers only (no HTTP)")
    worker.add_argument("app", help="MODULE:APP")
    api = sub.add_parser("api", parents=[_settings_parser("api")], help="serve HTTP only (no workers)")
    api.add_argument("app", help="MODULE:APP")

    sub.add_parser("migrate", parents=[_settings_parser("migrate")],
                   help="apply pending migrations of the core schema")

    pub = sub.add_parser("publish", parents=[_settings_parser("publish")], help="publish one event")
    pub.add_argument("topic")
    pub.add_argument("payload", help="a JSON object, e.g. '{\"order_id\": 1}'")
    pub.add_argument("--available-at", help="ISO-8601 time before which it must not run")
    pub.add_argument("--key", help="ordering key: events of one key run one at a time, in order")
    pub.add_argument("--idempotency-key",
                     help="publish at most once per topic and idempotency key (prints the first id)")
    pub.add_argument("--traceparent", help="a W3C trace context to store with the event")

    skip = sub.add_parser(
        "skip", parents=[_settings_parser("skip")],
        help="let the key of a DEAD keyed event move on (the event stays DEAD)",
    )
    skip.add_argument("--id", type=int, action="append", dest="ids", required=True,
                      help="a DEAD event id (repeatable)")

    req = sub.add_parser(
        "requeue", parents=[_settings_parser("requeue")],
        help="put DEAD events back to PENDING, or move a retired generation's leftovers",
    )
    target = req.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", type=int, action="append", dest="ids", help="an event id (repeatable)")
    target.add_argument("--topic", help="every DEAD event of this topic")
    target.add_argument("--retired-generation", type=int,
                        help="the PENDING events left in this retired generation "
                             "(needs --to-generation)")
    req.add_argument("--to-generation", type=int,
                     help="with --topic or --retired-generation: move them to this generation")

    prune = sub.add_parser(
        "prune", parents=[_settings_parser("prune")],
        help="run one prune pass now (retention by SPECTRAL_RETAIN_*), say what it would "
             "delete, or set the pruner's live kill switch",
    )
    prune.add_argument("switch", nargs="?", choices=(*SWITCH_ACTIONS, "status"),
                       help="on/off: enable or disable passes on every worker, live; default: "
                            "back to SPECTRAL_PRUNE_ENABLED; status: the override and the last "
                            "pass (without it: run one pass now)")
    prune.add_argument("--dry-run", action="store_true", help="count only; delete nothing")
    prune.add_argument("--json", action="store_true", help="print a JSON object")

    ins = sub.add_parser("inspect", parents=[_settings_parser("inspect")],
                         help="deployments, workers and the outbox")
    ins.add_argument("--json", action="store_true", help="one JSON object for scripts")

    dep = sub.add_parser("deploy", help="deployment generations")
    dep_sub = dep.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    alloc = dep_sub.add_parser("allocate", parents=[_settings_parser("deploy allocate")],
                               help="allocate the next generation")
    alloc.add_argument("--reference", required=True, help="what is deployed (a commit sha, a tag)")
    alloc.add_argument("--tag", help="a free-form label")
    alloc.add_argument("--deployed-by", help="who deploys")
    alloc.add_argument("--json", action="store_true", help="print a JSON object")

    rec = sub.add_parser("reconcile", help="the reconciler's live kill switch and last pass")
    rec_sub = rec.add_subparsers(dest="reconcile_command", required=True, metavar="ACTION")
    reconcile = _settings_parser("reconcile")
    rec_sub.add_parser("on", parents=[reconcile], help="enable passes on every worker, live")
    rec_sub.add_parser("off", parents=[reconcile], help="disable passes on every worker, live")
    rec_sub.add_parser("default", parents=[reconcile],
                       help="drop the override: SPECTRAL_RECONCILE_ENABLED decides again")
    rec_sub.add_parser("status", parents=[reconcile], help="the override and the last pass")

    roll = dep_sub.add_parser(
        "rollout", parents=[_settings_parser("deploy rollout")],
        help="start a new generation, health-check it, cut over or roll back",
    )
    roll.add_argument("--reference",
                      help="allocate a new generation for this reference first "
                           "(or give an allocated one with --generation)")
    roll.add_argument("--tag", help="with --reference: a label for the new generation")
    roll.add_argument("--deployed-by", help="with --reference: who deploys")
    roll.add_argument("--target", choices=("process", "docker"), default="process")
    roll.add_argument("--health-timeout", type=float, default=60.0,
                      help="seconds to wait for /health to answer 200 (default 60)")
    roll.add_argument("--app", default=DEMO_APP, help=f"process: MODULE:APP (default {DEMO_APP})")
    roll.add_argument("--pidfile", type=Path,
                      help="process: where the serving pid is kept (default DATA_DIR/spectral.pid)")
    roll.add_argument("--new-port", type=int, default=0,
                      help="process: the new process's HTTP port (default: a free port)")
    roll.add_argument("--image", help="docker: the image to run")
    roll.add_argument("--name", default="spectral", help="docker: container name prefix")
    roll.add_argument("--old-container", help="docker: the container serving now")
    roll.add_argument("--port", type=int,
                      help="docker: host port for the new container (default: a free one)")
    roll.add_argument("--env-file", help="docker: an env file for the container")
    roll.add_argument("--dry-run", action="store_true", help="docker: print the commands only")
    roll.add_argument("--json", action="store_true", help="print the outcome as JSON")
    roll.add_argument("--record", type=Path, help="also write the deploy record to this file")
    roll.add_argument("--staging-record", type=Path,
                      help="production: the staging rollout's record file (the gate's evidence)")
    roll.add_argument("--staging-database-url", metavar="URL",
                      help="production: the staging database, read only (the gate's evidence)")
    roll.add_argument("--override-staging-gate", metavar="REASON",
                      help="production: roll out without staging evidence; the reason is recorded")
    roll.add_argument("--yes", action="store_true",
                      help="cut over even when the pre-flight finds work in flight")
    roll.add_argument("--smoke-wait", type=float,
                      help="seconds to wait for a reconcile pass in the smoke checks "
                           "(default 2 x SPECTRAL_RECONCILE_INTERVAL + 5)")

    # --environment filters the records here; it is not the SPECTRAL_ENVIRONMENT setting.
    hist = dep_sub.add_parser("history", parents=[_settings_parser("deploy history")],
                              help="the deploy records, newest first")
    hist.add_argument("--environment", dest="history_environment",
                      help="only this environment's records")
    hist.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    hist.add_argument("--json", action="store_true", help="one JSON array for scripts")

    db = sub.add_parser("db", help="the embedded development database")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_settings = _settings_parser("db")
    db_sub.add_parser("start", parents=[db_settings], help="start it (or reuse it) and print its URL")
    db_sub.add_parser("stop", parents=[db_settings], help="stop it")
    return parser


def _load_settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key[len("setting_"):]: value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    for key, value in vars(args).items():
        if key.startswith("refused_") and value is not None:
            name = key[len("refused_"):]
            raise ConfigurationError(
                f"--{name.replace('_', '-')}: a secret on the command line shows in ps; use "
                f"SPECTRAL_{name.upper()} or --{name.replace('_', '-')}-file instead"
            )
    for name in ("database_url", "listen_database_url"):
        # A flag shows in `ps` to every user of the machine: a password goes in a file.
        if overrides.get(name) and password_of(overrides[name] or ""):
            flag = "--" + name.replace("_", "-")
            raise ConfigurationError(
                f"{flag}: the URL holds a password, which would show in ps; use "
                f"SPECTRAL_{name.upper()}, {flag}-file or a .pgpass file instead"
            )
    return Settings.load(overrides=overrides)


def _open(url: str, settings: Settings, pool_size: int = 1) -> AbstractAsyncContextManager[Store]:
    """The CLI's database: a small pool, through the configured pooler mode."""
    return open_database(url, pool_size=pool_size, pooler=settings.pooler)


def load_app(ref: str) -> App:
    """Import ``MODULE:APP`` and return the :class:`App` it names."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise AppLoadError(f"app must be given as MODULE:APP, got {ref!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppLoadError(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise AppLoadError(f"{ref!r} is not a spectral.App (got {type(app).__name__})")
    return app


def _print(line: str = "") -> None:
    print(line, flush=True)


def _say(lines: Sequence[str]) -> None:
    for line in lines:
        _print(line)


# --- commands ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, settings: Settings, url: str) -> int:
    from .runtime import serve

    app = load_app(args.app)
    workers = args.command in ("run", "worker")
    http = args.command in ("run", "api")
    # Everything imported so far lives as long as the process: keep it out of the cyclic
    # GC's full passes, and out of the final collection at exit (~100 ms of the drain).
    gc.freeze()
    return trio.run(functools.partial(serve, app, settings, url, workers=workers, http=http))


def cmd_migrate(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async def main() -> None:
        async with _open(url, settings):
            report = await migrate(url, settings.payload_cap_to_apply,
                                   stale_after=settings.heartbeat_stale_after)
        _say(render.migrated(report.applied, report.current))

    trio.run(main)
    return 0


async def _generation_for_producer(store: Any, settings: Settings) -> int | None:
    """The producer's generation: SPECTRAL_GENERATION, else the newest (None lets SQL pick);
    in development with none allocated, allocate one and say so."""
    if settings.generation is not None:
        return settings.generation
    if settings.environment != "production" and await store.newest_generation() is None:
        row = await store.allocate_generation("development", None, None)
        _print(f"allocated generation {row['generation']} for development")
    return None


def cmd_publish(args: argparse.Namespace, settings: Settings, url: str) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise InvalidPayloadError(f"invalid payload: not valid JSON ({exc})") from None
    check_topic(args.topic)
    # Without SPECTRAL_MAX_PAYLOAD_BYTES the database's own cap decides (core.publish).
    text = encode_payload(payload, settings.payload_cap_to_apply or sys.maxsize)
    available_at = None
    if args.available_at:
        try:
            available_at = datetime.fromisoformat(args.available_at)
        except ValueError:
            raise ConfigurationError(
                f"--available-at: not an ISO-8601 time: {args.available_at!r}"
            ) from None
        if available_at.tzinfo is None:
            raise ConfigurationError("--available-at: give a time zone, e.g. 2026-01-01T12:00:00+00:00")

    extras = publish_extras(args.key, args.idempotency_key, args.traceparent)

    async def main() -> None:
        async with _open(url, settings) as store:
            generation = await _generation_for_producer(store, settings)
            event_id = await store.publish(
                args.topic, text, available_at=available_at, generation=generation,
                extras=extras,
            )
        _print(str(event_id))

    trio.run(main)
    return 0


def cmd_requeue(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async def main() -> list[int]:
        async with _open(url, settings) as store:
            if args.ids:
                if args.to_generation is not None:
                    raise ConfigurationError("--to-generation goes with --topic or --retired-generation")
                return await store.requeue_ids(args.ids)
            if args.retired_generation is not None:
                if args.to_generation is None:
                    raise ConfigurationError("--retired-generation needs --to-generation")
                if not await store.generation_exists(args.to_generation):
                    raise NoGenerationError(
                        f"generation {args.to_generation} is not in core.deployments")
                return await store.requeue_retired(args.retired_generation, args.to_generation)
            check_topic(args.topic)
            return await store.requeue_topic(args.topic, args.to_generation)

    ids = trio.run(main)
    _print(render.requeued(ids))
    return 0


def cmd_skip(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async def main() -> list[int]:
        async with open_database(url, pool_size=1) as store:
            return await store.skip_ids(args.ids)

    ids = trio.run(main)
    _print(f"skipped {len(ids)} events" + (f": {', '.join(map(str, ids))}" if ids else "")
           + ("" if len(ids) == len(set(args.ids)) else " (the others are not DEAD or already skipped)"))
    return 0


def cmd_inspect(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async def main() -> dict[str, Any]:
        async with _open(url, settings) as store:
            return {
                "deployments": await store.latest_deployments(5),
                "workers": await store.workers(settings.heartbeat_stale_after),
                "outbox": await store.outbox_counts(),
                "tables": await store.table_health(),
                "xmin_horizon": await store.xmin_horizon(),
                "last_prune_pass": await store.last_prune_pass(),
                "blocked_keys": await store.blocked_keys(20),
            }

    view = trio.run(main)
    judged = verdicts(view["deployments"], view["workers"], view["outbox"],
                      settings.heartbeat_stale_after)
    tables, horizon = view.pop("tables"), view.pop("xmin_horizon")
    view["health"] = health_view(tables, horizon, sum(int(r["n"]) for r in view["outbox"]))
    if args.json:
        view["verdicts"] = [v.as_dict() for v in judged]
        _print(render.as_json(view, indent=2))
        return 0
    _say(render.inspection(view, judged))
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings, url: str) -> int:
    import os
    import socket

    from .actors.pruner import Pruner
    from .runtime import prune_settings
    from .state import RuntimeState

    configured = prune_settings(settings)
    if args.switch is not None:
        if args.dry_run or args.json:
            raise ConfigurationError(f"spectral prune {args.switch} takes no --dry-run or --json")
        return _prune_switch(args.switch, settings, url)

    async def main() -> dict[str, Any] | None:
        async with open_database(url, pool_size=1) as store:
            if args.dry_run:
                return await store.would_prune(
                    done=configured.retain_done, dead=configured.retain_dead,
                    workers=configured.retain_workers, records=configured.retain_records,
                    lost_after=configured.lost_after, cap=DRY_RUN_CAP,
                )
            # A manual pass ignores the interval, never a pass running elsewhere.
            state = RuntimeState(f"cli-{socket.gethostname()}-{os.getpid()}", 0)
            report = await Pruner(store, state, dataclasses.replace(configured, interval=0.0)
                                  ).run_once()
            return None if report is None else {**report.pruned, "errors": report.errors,
                                                "duration_seconds": round(report.duration, 3)}

    result = trio.run(main)
    if result is None:
        _print("another prune pass is running; nothing done")
        return 0
    if args.json:
        _print(render.as_json({"dry_run": args.dry_run, **result}))
        return 0
    if args.dry_run:
        _say(render.would_prune(
            result, cap=DRY_RUN_CAP, retain_done=configured.retain_done,
            retain_dead=configured.retain_dead, lost_after=configured.lost_after,
            retain_workers=configured.retain_workers, retain_records=configured.retain_records))
        return 0
    errors = result.pop("errors")
    took = result.pop("duration_seconds")
    _say(render.pruned(result, errors, took))
    return 1 if errors else 0


def _live_switch(
    action: str, settings: Settings, url: str,
    read: Callable[[Store], Awaitable[bool | None]],
    write: Callable[[Store, bool | None], Awaitable[None]],
    last_pass: Callable[[Store], Awaitable[T]],
) -> tuple[bool | None, T]:
    """`spectral prune|reconcile on|off|default|status`: set the override unless only
    asked for it, then read it back with the last pass."""
    async def main() -> tuple[bool | None, T]:
        async with _open(url, settings) as store:
            if action != "status":
                await write(store, SWITCH_ACTIONS[action])
            return await read(store), await last_pass(store)

    return trio.run(main)


def _prune_switch(action: str, settings: Settings, url: str) -> int:
    override, last = _live_switch(action, settings, url, Store.prune_enabled_override,
                                  Store.set_prune_enabled, Store.last_prune_pass)
    _say(render.prune_status(override, last))
    return 0


def cmd_rollout(args: argparse.Namespace, settings: Settings, url: str) -> int:
    from .records import Check, RolloutPlan, preflight, render_record, staging_gate
    from .rollout import (
        ProcessTarget,
        docker_commands,
        rollout_docker,
        rollout_process,
    )

    if args.target == "docker" and not args.image:
        raise ConfigurationError("--target docker needs --image")
    deployed_by = args.deployed_by or getpass.getuser()

    async def write_record(store: Any, rollout_id: int) -> None:
        if args.record is not None:
            args.record.parent.mkdir(parents=True, exist_ok=True)
            args.record.write_text(render_record(await store.rollout_record(rollout_id)), "utf-8")
            _print(f"deploy record written to {args.record}")

    async def refuse(store: Any, plan: RolloutPlan, generation: int | None, reason: str) -> None:
        row = await store.record_refused(
            generation, args.target, environment=plan.environment, reference=plan.reference,
            deployed_by=deployed_by, reason=reason, checks=[c.as_dict() for c in plan.checks])
        await write_record(store, int(row["id"]))
        raise RolloutRefusedError(reason)  # the one error line is the log of it

    async def main() -> RolloutResult:
        async with _open(url, settings, 2) as store:
            generation = settings.generation
            if generation is not None and args.reference:
                raise ConfigurationError("give --generation or --reference, not both")
            if generation is None and args.dry_run:
                raise ConfigurationError(
                    "--dry-run allocates nothing: give the generation with --generation N")
            if generation is None and not args.reference:
                raise ConfigurationError(
                    "give --generation N (an allocated generation) or --reference REF"
                )
            if generation is not None and not await store.generation_exists(generation):
                raise NoGenerationError(f"generation {generation} is not in core.deployments")
            reference = args.reference or (
                await store.generation_reference(generation) if generation is not None else None) or ""
            plan = RolloutPlan(settings.environment, reference, deployed_by)
            if not args.dry_run:
                gate = await staging_gate(
                    settings.environment, reference, record=args.staging_record,
                    database_url=args.staging_database_url, override=args.override_staging_gate)
                plan.staging_evidence, plan.override_reason = gate.evidence, gate.override_reason
                if gate.check is not None:
                    plan.checks.append(gate.check)
                if gate.override_reason:
                    logging.getLogger("spectral.rollout").warning(
                        "staging gate overridden: %s", gate.override_reason)
                if not gate.passed:
                    await refuse(store, plan, generation, gate.refusal)
                check, lines = await preflight(store, generation, settings.heartbeat_stale_after)
                for line in lines:
                    _print(f"pre-flight: {line}")
                if not check.passed and not args.yes:
                    plan.checks.append(check)
                    await refuse(store, plan, generation,
                                 f"pre-flight: {check.detail} in the old generations; cut over "
                                 "in a quiet window or give --yes")
                plan.checks.append(check if check.passed else
                                   Check("preflight", False, f"{check.detail}; confirmed with --yes"))
            if generation is None:
                row = await store.allocate_generation(args.reference, deployed_by, args.tag)
                generation = int(row["generation"])
                _print(f"allocated generation {generation}")
            result = await _roll(store, generation, plan)
            if result.rollout_id is not None:
                await write_record(store, result.rollout_id)
            return result

    async def _roll(store: Any, generation: int, plan: RolloutPlan) -> RolloutResult:
            if args.target == "process":
                target = ProcessTarget(
                    app=args.app, pidfile=args.pidfile or settings.data_dir / "spectral.pid",
                    log_dir=settings.data_dir / "logs", port=args.new_port,
                    extra_env=_child_database_env(settings, url),
                )
                smoke_wait = (2 * settings.reconcile_interval + 5 if args.smoke_wait is None
                              else args.smoke_wait)
                return await rollout_process(
                    store, target, generation, health_timeout=args.health_timeout,
                    drain_wait=settings.drain_timeout + 10, plan=plan, smoke_wait=smoke_wait,
                    say=_print,
                )
            commands = docker_commands(
                image=args.image, name=args.name, generation=generation,
                old_container=args.old_container, port=args.port,
                drain_seconds=settings.drain_timeout, env_file=args.env_file,
            )
            return await rollout_docker(
                store, commands, generation, health_timeout=args.health_timeout,
                old_container=args.old_container, new_container=f"{args.name}-g{generation}",
                dry_run=args.dry_run, plan=plan, say=_print,
            )

    result = trio.run(main)
    if not args.json:
        _say(render.checks(result.checks))
    if args.json:
        _print(render.as_json(result.as_dict()))
    elif result.status == "success":
        _print(f"success: generation {result.generation} serving ({result.new_process})")
    elif result.status == "rolled_back":
        _print(f"rolled back: {result.reason}")

    return 1 if result.status == "rolled_back" else 0


def _child_database_env(settings: Settings, url: str) -> dict[str, str]:
    """How the new process finds the database: the URL file when one was given (the
    child then reads the same file; the URL and its file together would be refused),
    else the URL in its environment (never on its command line)."""
    if settings.database_url_file is not None:
        return {"SPECTRAL_DATABASE_URL_FILE": str(settings.database_url_file.resolve())}
    return {"SPECTRAL_DATABASE_URL": url}


def cmd_deploy(args: argparse.Namespace, settings: Settings, url: str) -> int:
    if args.deploy_command == "rollout":
        return cmd_rollout(args, settings, url)
    if args.deploy_command == "history":
        return cmd_history(args, settings, url)
    return cmd_allocate(args, settings, url)


def cmd_history(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async def main() -> list[dict[str, Any]]:
        async with open_database(url, pool_size=1) as store:
            return await store.deploy_history(args.history_environment, args.limit)

    rows = trio.run(main)
    _say([render.as_json(rows, indent=2)] if args.json else render.deploy_history(rows))
    return 0


def cmd_allocate(args: argparse.Namespace, settings: Settings, url: str) -> int:
    async def main() -> NewDeployment:
        async with _open(url, settings) as store:
            return await store.allocate_generation(args.reference, args.deployed_by, args.tag)

    row = trio.run(main)
    if args.json:
        _print(render.as_json(row))
    else:
        _print(str(row["generation"]))
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    if args.db_command == "start":
        server = embedded.start(settings.data_dir)
        _print(f"embedded PostgreSQL ({server.source}) running under {server.pgdata}")
        _print(server.url)
        return 0
    stopped = embedded.stop(settings.data_dir)
    _print("stopped" if stopped else "not running")
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings, url: str) -> int:
    override, last = _live_switch(
        args.reconcile_command, settings, url, Store.reconcile_enabled_override,
        Store.set_reconcile_enabled, Store.last_reconcile_pass)
    _say(render.reconcile_status(override, last))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, str], int]] = {
    "run": cmd_run,
    "worker": cmd_run,
    "api": cmd_run,
    "migrate": cmd_migrate,
    "publish": cmd_publish,
    "requeue": cmd_requeue,
    "skip": cmd_skip,
    "inspect": cmd_inspect,
    "prune": cmd_prune,
    "deploy": cmd_deploy,
    "reconcile": cmd_reconcile,
}


def _first_spectral_error(exc: BaseException) -> SpectralError | None:
    if isinstance(exc, SpectralError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_spectral_error(inner)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    secrets: tuple[str, ...] = ()
    try:
        settings = _load_settings(args)
        secrets = settings.secrets()
        logs.configure(settings.log_format, settings.log_level, secrets)
        if args.command == "db":
            return cmd_db(args, settings)
        given = settings.database_url.reveal() if settings.database_url else None
        url = resolve_url(given, settings.data_dir)
        if not settings.database_url:
            logging.getLogger("spectral").info("database: %s", redact(url))
        return COMMANDS[args.command](args, settings, url)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: B036 - exception groups and SystemExit pass through
        if isinstance(exc, SystemExit):
            raise
        error = _first_spectral_error(exc)
        if error is None:
            raise
        from .db.urls import scrub

        message = scrub(str(error), *secrets).splitlines()[0] if str(error) else type(error).__name__
        print(f"spectral: error: {message}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, USER_ERRORS) else 1


def entrypoint() -> None:  # pragma: no cover - console script
    sys.exit(main())
