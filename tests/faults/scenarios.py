"""The fault scenarios: one fault each, driven against real ``spectral worker`` processes.

Each scenario is a function ``(scene, full)`` registered with :func:`scenario`; ``full``
selects the full run's numbers, otherwise the fast subset's. A scenario publishes, starts
workers, injects its fault, waits for everything to settle, and notes what it expects
(``scene.expect``); the history checker then counts what happened. :func:`run` runs one
and returns its figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

import spectral
from spectral.errors import SpectralError

from ..pg import Server
from .harness import FAKETIME_LIB, ROOT, Scene, fetch, scalar, url_via
from .history import Figures
from .relay import Relay

Body = Callable[[Scene, bool], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    body: Body
    private: bool = False  # needs a PostgreSQL of its own (stopped, restarted, or many clients)
    env: tuple[tuple[str, str], ...] = ()
    max_connections: int = 300  # of the private server


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, title: str, *, private: bool = False, max_connections: int = 300,
             **env: str) -> Callable[[Body], Body]:
    def register(body: Body) -> Body:
        SCENARIOS[name] = Scenario(name, title, body, private, tuple(env.items()), max_connections)
        return body

    return register


def run(name: str, shared: Server | None, *, full: bool = False) -> Figures:
    """Run scenario ``name`` in a fresh database; returns the checker's figures."""
    spec = SCENARIOS[name]
    scene = Scene(name, shared=None if spec.private else shared, private=spec.private,
                  env=dict(spec.env), max_connections=spec.max_connections)
    started = time.monotonic()
    try:
        try:
            spec.body(scene, full)
        except Exception as exc:  # noqa: BLE001 - a broken driver is a failed scenario, with its output
            scene.failures.append(f"driver: {type(exc).__name__}: {exc}")
        figures = scene.finish()
        figures.notes.append(f"ran {time.monotonic() - started:.0f}s")
        if figures.passed:
            shutil.rmtree(scene.log_dir, ignore_errors=True)
        else:
            figures.notes.append(f"logs in {scene.log_dir}")
        return figures
    finally:
        scene.close()


# --- processes killed, stopped, signalled -------------------------------------------------


@scenario("sigkill-mid-turn", "SIGKILL of a worker with turns mid-transaction")
def sigkill_mid_turn(s: Scene, full: bool) -> None:
    s.produce(3000 if full else 400, payload={"sleep": 0.05})
    s.publish_cli(3 if full else 1)
    workers = [s.spawn() for _ in range(3)]
    s.ready(*workers)
    s.wait_for(lambda: s.in_transaction() >= 5, 20, "turns mid-transaction")
    s.mark_fault()
    s.signal(workers[0], signal.SIGKILL)
    if full:
        time.sleep(1)
        s.signal(workers[1], signal.SIGKILL)
    s.ready(s.spawn())
    s.wait_settled(90)


@scenario("sigkill-after-commit",
          "SIGKILL after a handler committed and before the acknowledgement (fan-out)",
          SPECTRAL_HANDLER_MAX="5", SPECTRAL_CLAIM_TTL="9")
def sigkill_after_commit(s: Scene, full: bool) -> None:
    n = 60 if full else 20
    victim = s.spawn(SPECTRAL_CONCURRENCY=str(n), SPECTRAL_POOL_SIZE="25")
    s.ready(victim)
    # fx.fan.a commits, fx.fan.out writes its line, fx.fan.b sleeps: the kill lands between
    # fx.fan.a's commit and the row's acknowledgement.
    s.produce(n, topic="fx.fan", payload={"b_sleep": 4}, rollback_every=3)
    committed_a = f"SELECT count(*) FROM fx_effects WHERE handler = 'fx.fan.a' AND pid = {victim.proc.pid}"
    s.wait_for(lambda: scalar(s.url, committed_a) >= n, 20, f"{n} fx.fan.a commits")
    s.mark_fault()
    s.signal(victim, signal.SIGKILL)
    victim.proc.wait(10)
    held = scalar(s.url, "SELECT count(*) FROM core.outbox AS o WHERE status = 'CLAIMED' AND EXISTS "
                         "(SELECT 1 FROM core.event_handled AS h WHERE h.event_id = o.id "
                         "AND h.handler = 'fx.fan.a')")
    s.expect(held >= n // 2, f"only {held} of {n} rows were between fx.fan.a's commit and the ack")
    s.ready(s.spawn())
    s.wait_settled(60)
    s.notes.append(f"{held} rows killed between fx.fan.a's commit and the ack")


@scenario("sigterm-burst", "SIGTERM during a burst, and SIGTERM twice (exit 130)")
def sigterm_burst(s: Scene, full: bool) -> None:
    # Turns of 0.5 s: the second SIGTERM lands while the first drain still waits for them.
    s.produce(2000 if full else 200, payload={"sleep": 0.5})
    workers = [s.spawn() for _ in range(3)]
    s.ready(*workers)
    with s.load(rate=100 if full else 30, payload={"sleep": 0.5}):
        s.wait_for(lambda: s.in_transaction() >= 5, 20, "turns in flight")
        s.mark_fault()
        s.signal(workers[0], signal.SIGTERM)
        s.signal(workers[1], signal.SIGTERM)
        time.sleep(0.1)
        s.signal(workers[1], signal.SIGTERM)
        codes = [w.proc.wait(20) for w in workers[:2]]
        s.expect(codes == [0, 130], f"exit codes after SIGTERM / SIGTERM twice: {codes}, expected [0, 130]")
        rounds = 3 if full else 1
        for _ in range(rounds):  # repeated SIGTERMs: replacements started and drained in turn
            extra = s.spawn()
            s.ready(extra)
            time.sleep(1)
            s.signal(extra, signal.SIGTERM)
            code = extra.proc.wait(20)
            s.expect(code == 0, f"a drained replacement exited {code}")
    s.ready(s.spawn())
    s.wait_settled(90)


@scenario("drain-deadline-ignored", "a handler that ignores cancellation past the drain deadline")
def drain_deadline_ignored(s: Scene, full: bool) -> None:
    victim = s.spawn()
    s.ready(victim)
    s.produce(3, payload={"stubborn": 15}, rollback_every=0)
    s.wait_for(lambda: s.in_transaction() >= 3, 20, "the stubborn turns running")
    s.produce(200 if full else 60, payload={"sleep": 0.05})
    s.mark_fault()
    started = time.monotonic()
    s.signal(victim, signal.SIGTERM)
    code = victim.proc.wait(30)
    elapsed = time.monotonic() - started
    s.expect(code == 3, f"exit {code} after the drain deadline, expected 3 (the watchdog)")
    s.notes.append(f"watchdog exit {code} {elapsed:.1f}s after SIGTERM (drain 2s + grace 5s)")
    s.ready(s.spawn(), s.spawn())
    s.wait_settled(60)


@scenario("sigstop", "a worker frozen (SIGSTOP) past the stale and claim windows, then SIGCONT")
def sigstop(s: Scene, full: bool) -> None:
    workers = [s.spawn() for _ in range(3)]
    s.ready(*workers)
    with s.load(rate=150, payload={"sleep": 0.02}):
        time.sleep(2)
        s.mark_fault()
        workers[0].signal(signal.SIGSTOP)
        time.sleep(6 + 4)  # claim TTL 6 s, stale after 1 s
        workers[0].signal(signal.SIGCONT)
        time.sleep(3)
    s.wait_settled(60)
    alive = workers[0].proc.poll() is None
    s.notes.append("the frozen worker " + ("kept serving after SIGCONT" if alive else
                                           f"exited {workers[0].proc.poll()} after SIGCONT"))
    if not alive:
        s.expected_exit.add(workers[0].proc.pid)


@scenario("blocking-handler", "a handler that blocks the event loop past the claim TTL")
def blocking_handler(s: Scene, full: bool) -> None:
    workers = [s.spawn(), s.spawn()]
    s.ready(*workers)
    with s.load(rate=100):
        s.produce(2, payload={"block": 9, "sleep": 0.01}, rollback_every=0)
        s.mark_fault()
        time.sleep(12)
    s.wait_settled(60)


# --- the database connection ------------------------------------------------------------


@scenario("pg-terminate", "pg_terminate_backend of random Spectral sessions every 300 ms")
def pg_terminate(s: Scene, full: bool) -> None:
    workers = [s.spawn() for _ in range(3)]
    s.ready(*workers)
    rng = random.Random(9)
    killed = 0
    with s.load(rate=150, payload={"sleep": 0.01}):
        time.sleep(1)
        s.mark_fault()
        until = time.monotonic() + (20 if full else 8)
        while time.monotonic() < until:
            killed += s.terminate_random(rng)
            time.sleep(0.3)
    s.wait_settled(60)
    s.notes.append(f"{killed} sessions terminated")


def _restart(mode: str) -> Body:
    def body(s: Scene, full: bool) -> None:
        assert s.private is not None
        workers = [s.spawn(), s.spawn()]
        s.ready(*workers)
        with s.load(rate=150, payload={"sleep": 0.01}):
            time.sleep(2)
            s.mark_fault()
            s.private.stop(mode)
            time.sleep(2)
            s.private.start()
            time.sleep(3)
        s.wait_settled(90)
        s.expect(all(w.proc.poll() is None for w in workers), "a worker did not ride out the restart")

    return body


scenario("pg-restart-fast", "PostgreSQL restarted -m fast under load", private=True)(_restart("fast"))
scenario("pg-restart-immediate", "PostgreSQL restarted -m immediate (crash) under load",
         private=True)(_restart("immediate"))


@scenario("pg-down-past-budget", "PostgreSQL down longer than the reconnect budget",
          private=True, SPECTRAL_RECONNECT_BUDGET="3")
def pg_down_past_budget(s: Scene, full: bool) -> None:
    assert s.private is not None
    workers = [s.spawn(), s.spawn()]
    s.ready(*workers)
    s.produce(300, payload={"sleep": 0.02})
    s.wait_for(lambda: scalar(s.url, "SELECT count(*) FROM core.outbox WHERE status = 'DONE'") >= 50,
               20, "50 events DONE")
    s.mark_fault()
    for w in workers:
        s.expected_exit.add(w.proc.pid)
    s.private.stop("fast")
    codes = []
    for w in workers:
        try:
            codes.append(w.proc.wait(30))
        except subprocess.TimeoutExpired:
            codes.append(None)
    s.expect(all(c not in (None, 0) for c in codes), f"exit codes with the database gone: {codes}")
    loud = [w for w in workers if "spectral: error:" in w.output and "SPECTRAL_RECONNECT_BUDGET" in w.output]
    s.expect(len(loud) == len(workers), "a worker exited without saying the database was gone")
    # The driver's retries are warnings of one line each, not tracebacks before the error.
    s.expect(not any("Traceback" in w.output for w in workers),
             "a traceback in a worker's output before its one-line error")
    s.notes.append(f"workers failed loud with exits {codes}")
    s.private.start()
    s.ready(s.spawn(), s.spawn())
    s.wait_settled(60)


# A private server: the relay needs a TCP port, and the test server may be a Unix socket.
@scenario("half-open", "a half-open connection: the relay forwards nothing for longer than the claim TTL",
          private=True)
def half_open(s: Scene, full: bool) -> None:
    host = s.url.split("@", 1)[1].split("/", 1)[0]
    name, _, port = host.rpartition(":")
    relay = Relay(name, int(port))
    try:
        relayed = s.spawn(url=url_via(s.url, relay.port))
        direct = s.spawn()
        s.ready(relayed, direct)
        with s.load(rate=100, payload={"sleep": 0.05}):
            time.sleep(2)
            s.mark_fault()
            relay.stall()
            time.sleep(6 + 4)
            relay.resume()
            time.sleep(3)
        s.wait_settled(90)
        s.notes.append(f"relayed worker {'alive' if relayed.proc.poll() is None else 'exited'} "
                       f"after the stall; {relay.connections} connections through the relay")
        if relayed.proc.poll() is not None:
            s.expected_exit.add(relayed.proc.pid)
    finally:
        relay.close()


@scenario("pool-exhaustion", "slow handlers hold every pooled connection; heartbeats go on",
          SPECTRAL_POOL_SIZE="4", SPECTRAL_CONCURRENCY="30")
def pool_exhaustion(s: Scene, full: bool) -> None:
    worker = s.spawn()
    s.ready(worker)
    s.produce(300 if full else 120, payload={"sleep": 0.5})
    s.mark_fault()
    oldest = 0.0
    deadline = time.monotonic() + 60
    while s.unsettled() and time.monotonic() < deadline:
        age = scalar(s.url, "SELECT extract(epoch FROM clock_timestamp() - max(last_seen))::float8 "
                            "FROM core.workers WHERE state <> 'exited'")
        oldest = max(oldest, age or 0.0)
        time.sleep(0.2)
    s.wait_settled(30)
    s.expect(oldest < 2.0, f"a heartbeat was {oldest:.2f}s old (interval 0.5s, stale after 1s)")
    s.notes.append(f"oldest heartbeat while the pool was exhausted: {oldest:.2f}s")


@scenario("open-transaction-drain", "a drain of 20,000 events with a transaction held open (no vacuum)")
def open_transaction_drain(s: Scene, full: bool) -> None:
    n = 20_000 if full else 3_000

    async def hold(stop: threading.Event) -> None:
        conn = await asyncpg.connect(s.url, server_settings={"application_name": "fx-holder"})
        try:
            async with conn.transaction(isolation="repeatable_read"):
                await conn.fetchval("SELECT txid_current()")
                await conn.fetchval("SELECT count(*) FROM core.outbox")
                await asyncio.to_thread(stop.wait)
        finally:
            await conn.close()

    holding = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
               "AND application_name = 'fx-holder' AND backend_xmin IS NOT NULL")
    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(hold(stop)), daemon=True)
    thread.start()
    try:
        s.wait_for(lambda: scalar(s.url, holding) == 1, 10, "the open transaction")
        s.produce_bulk(n)
        s.mark_fault()
        started = time.monotonic()
        workers = [s.spawn(SPECTRAL_BATCH_SIZE="100", SPECTRAL_CONCURRENCY="50", SPECTRAL_POOL_SIZE="10")
                   for _ in range(2)]
        s.ready(*workers)
        s.wait_settled(240 if full else 90)
        elapsed = time.monotonic() - started
        s.expect(scalar(s.url, holding) == 1, "the transaction was not held open for the whole drain")
        dead_tuples = scalar(s.url, "SELECT n_dead_tup FROM pg_stat_user_tables "
                                    "WHERE schemaname = 'core' AND relname = 'outbox'")
        s.notes.append(f"{n} events drained in {elapsed:.1f}s incl. start-up ({n / elapsed:.0f}/s) "
                       f"with a transaction open; outbox dead tuples {dead_tuples}")
    finally:
        stop.set()
        thread.join(10)


# --- bad events and bad input -----------------------------------------------------------


@scenario("poison", "poison events: exception, sys.exit(), HANDLER_MAX, exception group")
def poison(s: Scene, full: bool) -> None:
    workers = [s.spawn(), s.spawn()]
    s.ready(*workers)
    topics = ("fx.poison.raise", "fx.poison.exit", "fx.poison.slow", "fx.poison.group")
    with s.load(rate=100):
        for topic in topics:
            s.produce(3 if full else 2, topic=topic, connections=1, rollback_every=0)
        s.mark_fault()
        time.sleep(2)
    s.wait_settled(60)
    dead = {r["topic"]: r["n"] for r in fetch(
        s.url, "SELECT topic, count(*) AS n FROM core.outbox WHERE status = 'DEAD' "
               "AND dead_reason IS NOT NULL AND last_error IS NOT NULL GROUP BY topic")}
    want = 3 if full else 2
    s.expect(dead == dict.fromkeys(topics, want), f"DEAD with a reason by topic: {dead}")
    wrong = scalar(s.url, "SELECT count(*) FROM core.outbox WHERE topic LIKE 'fx.poison.%' "
                          "AND (status <> 'DEAD' OR attempts <> 2)")
    s.expect(wrong == 0, f"{wrong} poison rows not DEAD after exactly 2 attempts")
    for w in workers:
        s.expect(w.proc.poll() is None, f"worker pid {w.proc.pid} did not survive the poison")


def _one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip()


@scenario("malformed-input", "malformed input through Python, SQL and the CLI")
def malformed_input(s: Scene, full: bool) -> None:
    # A cap below the kernel's 128 KiB limit on one argument, so the CLI can be sent one too big.
    scalar(s.url, "SELECT core.set_max_payload_bytes(100000)")
    before = scalar(s.url, "SELECT count(*) FROM core.outbox")
    python_cases: list[tuple[str, object]] = [
        ("bad topic!", {}), ("", {}), ("a..b", {}), ("fx.work", [1, 2]), ("fx.work", "text"),
        ("fx.work", {"nan": float("nan")}), ("fx.work", {"big": "x" * 300_000}), ("x" * 129, {}),
    ]

    async def python_path() -> list[str]:
        conn = await asyncpg.connect(s.url)
        errors = []
        try:
            for topic, payload in python_cases:
                try:
                    async with conn.transaction():
                        await spectral.publish(conn, topic, payload)  # type: ignore[arg-type]
                    errors.append(f"accepted {topic!r}")
                except SpectralError as exc:
                    if not _one_line(str(exc)):
                        errors.append(f"not one line: {exc!r}")
            for sql in ("SELECT core.publish('bad topic!', '{}')", "SELECT core.publish('fx.work', '[1]')",
                        "SELECT core.publish(NULL, '{}')", "SELECT core.publish('fx.work', NULL)",
                        "SELECT core.publish('a\nb', '{}')",
                        "SELECT core.publish('fx.work', jsonb_build_object('big', repeat('x', 300000)))"):
                try:
                    await conn.fetchval(sql)
                    errors.append(f"accepted {sql!r}")
                except asyncpg.PostgresError as exc:
                    # The message (psql's "ERROR:" line); a HINT may follow on its own line.
                    if not _one_line(exc.args[0] if exc.args else str(exc)):
                        errors.append(f"not one line: {exc!r}")
        finally:
            await conn.close()
        return errors

    errors = asyncio.run(python_path())
    env = {**os.environ, "SPECTRAL_DATABASE_URL": s.url, "SPECTRAL_GENERATION": str(s.generation)}
    for args in (["bad topic!", "{}"], ["fx.work", "{not json"], ["fx.work", "[1]"],
                 ["fx.work", '"text"'], ["fx.work", "{}", "--available-at", "yesterday"],
                 ["fx.work", json.dumps({"big": "x" * 120_000})]):
        result = subprocess.run([sys.executable, "-m", "spectral", "publish", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        if result.returncode == 0 or not _one_line(result.stderr) or \
                not result.stderr.startswith("spectral: error:"):
            errors.append(f"CLI {args[:2]!r}: exit {result.returncode}, stderr {result.stderr[-300:]!r}")
    after = scalar(s.url, "SELECT count(*) FROM core.outbox")
    s.expect(after == before, f"malformed input changed the outbox: {before} -> {after} rows")
    for e in errors:
        s.failures.append(e[:300])
    # The good path still works, by every producer.
    s.produce(20)
    s.publish_cli(1)
    s.ready(s.spawn())
    s.wait_settled(30)
    s.notes.append(f"{len(python_cases)} Python, 6 SQL and 6 CLI malformed inputs refused")


@scenario("payload-10mb", "a 10 MB payload (cap raised to 16 MB), and one over the cap")
def payload_10mb(s: Scene, full: bool) -> None:
    scalar(s.url, "SELECT core.set_max_payload_bytes(16777216)")
    s.mark_fault()
    s.produce(2, payload={"blob": "x" * 10_000_000}, connections=2, per_tx=1, rollback_every=0)
    try:
        s.produce(1, payload={"blob": "x" * 17_000_000}, connections=1, rollback_every=0)
        s.failures.append("a 17 MB payload was accepted over a 16 MB cap")
    except (SpectralError, asyncpg.PostgresError) as exc:
        s.expect(_one_line(str(exc)), f"over-cap error is not one line: {exc!r}"[:300])
    s.ready(s.spawn())
    s.wait_settled(60)


# --- load, deploys, clocks -------------------------------------------------------------


@scenario("producers-1000", "1,000 concurrent producers publishing 100,000 events, NOTIFY on and off",
          private=True, max_connections=1100)
def producers_1000(s: Scene, full: bool) -> None:
    # Each producer has a connection of its own; the numbers are per NOTIFY mode (the full
    # run publishes 100,000 events in all, half with NOTIFY on, half with it off).
    producers, per = (1000, 50) if full else (100, 20)
    for listen in ("true", "false"):
        workers = [s.spawn(SPECTRAL_LISTEN_ENABLED=listen, SPECTRAL_CONCURRENCY="50",
                           SPECTRAL_POOL_SIZE="10") for _ in range(3)]
        s.ready(*workers)
        started = time.monotonic()
        s.produce(producers * per, connections=producers, per_tx=10 if full else 5, rollback_every=5)
        published = time.monotonic() - started
        s.mark_fault()
        s.wait_settled(600 if full else 60)
        elapsed = time.monotonic() - started
        s.notes.append(f"NOTIFY {'on' if listen == 'true' else 'off'}: {producers} producers, "
                       f"{producers * per} events published in {published:.1f}s, all settled "
                       f"{elapsed:.1f}s after the first publish")
        for w in workers:
            s.signal(w, signal.SIGTERM)
        for w in workers:
            w.proc.wait(30)


@scenario("generations-rollout", "two generations live, then a rollout under load",
          SPECTRAL_RETIRE_GRACE="2")
def generations_rollout(s: Scene, full: bool) -> None:
    old = [s.spawn(), s.spawn()]
    s.ready(*old)
    with s.load(rate=150, payload={"sleep": 0.02}):
        time.sleep(2)
        first = s.generation
        s.generation = int(scalar(
            s.url, "INSERT INTO core.deployments (reference) VALUES ('faults-2') RETURNING generation"))
        new = [s.spawn(), s.spawn()]
        s.ready(*new)
        time.sleep(2)  # two generations live, each handling its own events
        s.mark_fault()
        for w in old:
            s.signal(w, signal.SIGTERM)
        codes = [w.proc.wait(30) for w in old]
        s.expect(codes == [0, 0], f"old generation exits {codes}")
        time.sleep(2)
    s.wait_settled(60)
    by_gen = {r["generation"]: r["n"] for r in fetch(
        s.url, "SELECT generation, count(*) AS n FROM core.outbox GROUP BY generation")}
    s.notes.append(f"rows by generation {by_gen} (generation {first} drained, then retired)")


@scenario("clock-skew", "a worker whose clock is 10 minutes ahead (libfaketime)")
def clock_skew(s: Scene, full: bool) -> None:
    skewed = s.spawn(preload={"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": "+10m"})
    normal = s.spawn()
    s.ready(skewed, normal)
    # The log's timestamps come from each process's own clock: proof the skew took hold.
    seen = [datetime.fromisoformat(p.wait_for("spectral ready")[:19]) for p in (skewed, normal)]
    ahead = (seen[0] - seen[1]).total_seconds()
    s.expect(590 <= ahead <= 620, f"the skewed worker's clock is {ahead:.0f}s ahead, expected 600")
    with s.load(rate=100, payload={"sleep": 0.02}):
        s.produce(1000 if full else 300, payload={"sleep": 0.02})
        s.mark_fault()
        time.sleep(6 if full else 3)  # past a claim TTL of live claims by both workers
    s.wait_settled(60)
    retried = scalar(s.url, "SELECT count(*) FROM core.outbox WHERE attempts > 0 OR last_error IS NOT NULL")
    s.expect(retried == 0, f"{retried} rows retried or reaped: some time arithmetic used a worker clock")
    shares = {r["claimed_by"]: r["n"] for r in fetch(
        s.url, "SELECT claimed_by, count(*) AS n FROM core.outbox GROUP BY claimed_by")}
    s.expect(len(shares) == 2, f"both workers should have claimed rows: {shares}")
    s.notes.append(f"skewed worker {ahead:.0f}s ahead; rows per worker {sorted(shares.values())}")
