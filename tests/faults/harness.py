"""The fault driver's parts: databases, a private PostgreSQL, producers, workers, settling.

A :class:`Scene` is one scenario's world: a fresh migrated database (on the shared test
server, or on a private server the scenario may stop and restart), a log folder for the
outside effects, the producers' records, and ``spectral worker`` subprocesses of
:mod:`tests.faults.workload`. :meth:`Scene.finish` reads the history and returns the
checker's figures.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import trio

import spectral
from spectral.db import migrate, open_database

from ..acceptance.proc import Spectral
from ..pg import Server, admin, query, with_database
from . import history
from .workload import EFFECTS_DDL

ROOT = Path(__file__).parents[2]
APP = "tests.faults.workload:app"

def _pg_bin() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    if not candidates:
        raise RuntimeError("no pg_ctl: install PostgreSQL's server binaries")
    return Path(candidates[0]).parent


#: Debian's libfaketime (.ci/run installs it).
FAKETIME_LIB = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))),
                    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

#: What a producer or a probe may meet while the database restarts or ends its session.
DB_GONE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

#: Short intervals for every worker (validate_runtime: 6 > 2 + 2 + 0.5 + margin).
FAST = {
    "SPECTRAL_ENVIRONMENT": "test",
    "SPECTRAL_LOG_LEVEL": "INFO",
    "SPECTRAL_POLL_INTERVAL": "0.5",
    "SPECTRAL_HANDLER_MAX": "2",
    "SPECTRAL_DRAIN_TIMEOUT": "2",
    "SPECTRAL_HEARTBEAT_INTERVAL": "0.5",
    "SPECTRAL_CLAIM_TTL": "6",
    "SPECTRAL_REAP_INTERVAL": "0.5",
    "SPECTRAL_RECONCILE_INTERVAL": "1",
    "SPECTRAL_RETRY_BASE": "0.1",
    "SPECTRAL_RETRY_MAX": "0.5",
    "SPECTRAL_MAX_ATTEMPTS": "10",
    "SPECTRAL_CONCURRENCY": "20",
    "SPECTRAL_POOL_SIZE": "8",
    "SPECTRAL_RECONNECT_BUDGET": "30",
    "SPECTRAL_HTTP_PORT": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PrivateServer:
    """A PostgreSQL 15 of our own on a free TCP port, which scenarios may stop and start.

    Never the shared cluster: stopping that would break everyone else's tests.
    """

    def __init__(self, max_connections: int = 300) -> None:
        self.max_connections = max_connections
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="spectral-faults-pg-"))
        self.pgdata = self.dir / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            for path in (self.dir, *self.dir.parents):
                path.chmod(path.stat().st_mode | 0o001)
        subprocess.run([*_run_as_postgres(), str(self.bin / "initdb"), "-D", str(self.pgdata),
                        "-U", "postgres", "--auth=trust", "--encoding=UTF8"],
                       check=True, capture_output=True, timeout=120)
        self.start()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(
            [*_run_as_postgres(), str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60",
             "-l", str(self.dir / "server.log"), "-o",
             f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
             f"-c max_connections={self.max_connections}",
             "start"],
            check=True, capture_output=True, timeout=90,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*_run_as_postgres(), str(self.bin / "pg_ctl"), "-D", str(self.pgdata),
                        "-w", "-t", "60", "-m", mode, "stop"], capture_output=True, timeout=90)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _migrate(url: str) -> None:
    async def run() -> None:
        async with open_database(url, pool_size=1):
            await migrate(url, 262_144)

    trio.run(run)


def fetch(url: str, sql: str, *args: object) -> list[dict[str, Any]]:
    return [dict(r) for r in query(url, sql, *args)]


def scalar(url: str, sql: str, *args: object) -> Any:
    return query(url, sql, *args)[0][0]


class Scene:
    """One scenario's database, workers, producers and history."""

    def __init__(self, name: str, *, shared: Server | None = None, private: bool = False,
                 env: dict[str, str] | None = None, max_connections: int = 300) -> None:
        self.name = name
        self.private = PrivateServer(max_connections) if private else None
        self._shared = shared
        if self.private is not None:
            admin(self.private.url, "CREATE DATABASE faults")
            self.url = with_database(self.private.url, "faults")
            _migrate(self.url)
        else:
            assert shared is not None
            self.url = shared.fresh()
        admin(self.url, EFFECTS_DDL)
        self.generation = int(scalar(
            self.url, "INSERT INTO core.deployments (reference) VALUES ('faults') RETURNING generation"))
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"spectral-faults-{name}-"))
        self.env = {**FAST, **(env or {})}
        self.workers: list[Spectral] = []
        self.expected_exit: set[int] = set()
        self.history = history.History()
        self._uncertain: set[int] = set()
        self._lock = threading.Lock()
        self.notes: list[str] = []
        self.failures: list[str] = []

    @property
    def dbname(self) -> str:
        return urlsplit(self.url).path.lstrip("/")

    # --- workers ------------------------------------------------------------------------

    def spawn(self, *, url: str | None = None, preload: dict[str, str] | None = None,
              **env: str) -> Spectral:
        full = {**self.env, "SPECTRAL_DATABASE_URL": url or self.url,
                "SPECTRAL_GENERATION": str(self.generation), "FAULTS_LOG_DIR": str(self.log_dir),
                **(preload or {}), **env}
        proc = Spectral("worker", APP, env=full, cwd=ROOT)
        self.workers.append(proc)
        return proc

    def ready(self, *procs: Spectral, timeout: float = 60) -> None:
        for p in procs:
            p.wait_for("spectral ready", timeout=timeout)

    def signal(self, proc: Spectral, signum: int) -> None:
        if signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            self.expected_exit.add(proc.proc.pid)
        proc.signal(signum)

    def live(self) -> list[Spectral]:
        return [w for w in self.workers if w.proc.poll() is None]

    # --- producers ----------------------------------------------------------------------

    def produce(self, n: int, *, topic: str = "fx.work", connections: int = 4, per_tx: int = 5,
                rollback_every: int = 4, payload: dict[str, Any] | None = None,
                url: str | None = None, generation: int | None = None) -> None:
        """Publish ``n`` committed events from ``connections`` connections, ``per_tx`` per
        transaction, alternating Python (spectral.publish) and SQL (core.publish); every
        ``rollback_every``-th transaction publishes the same amount and rolls back."""
        asyncio.run(self._produce(n, topic, connections, per_tx, rollback_every, payload or {},
                                  url or self.url, generation or self.generation))

    async def _produce(self, n: int, topic: str, connections: int, per_tx: int, rollback_every: int,
                       payload: dict[str, Any], url: str, generation: int) -> None:
        shares = [n // connections + (1 if i < n % connections else 0) for i in range(connections)]
        await asyncio.gather(*(self._producer(i, share, topic, per_tx, rollback_every, payload, url,
                                              generation) for i, share in enumerate(shares)))

    async def _producer(self, index: int, share: int, topic: str, per_tx: int, rollback_every: int,
                        payload: dict[str, Any], url: str, generation: int) -> None:
        conn = await asyncpg.connect(url, timeout=30, server_settings={"application_name": "fx-producer"})
        try:
            done, txn = 0, 0
            while done < share:
                txn += 1
                rollback = rollback_every > 0 and txn % rollback_every == 0
                size = min(per_tx, share - done)
                marker = f"rb-{uuid.uuid4().hex[:12]}" if rollback else None
                ids: list[int] = []
                tr = conn.transaction()
                await tr.start()
                try:
                    for _ in range(size):
                        body = {**payload, "m": marker} if marker else dict(payload)
                        if index % 2 == 0:
                            ids.append(await spectral.publish(conn, topic, body, generation=generation,
                                                              max_payload_bytes=64 << 20))
                        else:
                            ids.append(await conn.fetchval(
                                "SELECT core.publish($1, $2::jsonb, NULL, $3)", topic,
                                json.dumps(body), generation))
                except BaseException:
                    await tr.rollback()
                    raise
                if rollback:
                    await tr.rollback()
                    with self._lock:
                        self.history.rolled_back_ids.update(ids)
                        self.history.rolled_back_markers.add(marker or "")
                    continue
                try:
                    await tr.commit()
                except DB_GONE:
                    with self._lock:  # the commit may or may not have landed
                        self._uncertain.update(ids)
                    raise
                with self._lock:
                    self.history.committed.update(dict.fromkeys(ids, topic))
                done += size
        finally:
            await conn.close()

    def produce_bulk(self, n: int, *, topic: str = "fx.work", per_tx: int = 1000,
                     payload: dict[str, Any] | None = None) -> None:
        """Publish ``n`` events through core.publish, ``per_tx`` per statement and transaction."""
        async def run() -> None:
            conn = await asyncpg.connect(self.url, timeout=30,
                                         server_settings={"application_name": "fx-producer"})
            try:
                left = n
                while left:
                    size = min(per_tx, left)
                    async with conn.transaction():
                        ids = await conn.fetch(
                            "SELECT core.publish($1, $2::jsonb, NULL, $3) AS id FROM generate_series(1, $4)",
                            topic, json.dumps(payload or {}), self.generation, size)
                    self.history.committed.update({r["id"]: topic for r in ids})
                    left -= size
            finally:
                await conn.close()

        asyncio.run(run())

    def publish_cli(self, count: int, topic: str = "fx.work") -> None:
        """Publish through ``spectral publish`` (the CLI path): one process per event."""
        for _ in range(count):
            result = subprocess.run(
                [sys.executable, "-m", "spectral", "publish", topic, "{}"], cwd=ROOT,
                env={**os.environ, "SPECTRAL_DATABASE_URL": self.url,
                     "SPECTRAL_GENERATION": str(self.generation)},
                capture_output=True, text=True, timeout=60,
            )
            if result.returncode != 0:
                raise AssertionError(f"spectral publish failed: {result.stderr}")
            self.history.committed[int(result.stdout.strip().splitlines()[-1])] = topic

    @contextmanager
    def load(self, rate: float = 200.0, topic: str = "fx.work",
             payload: dict[str, Any] | None = None) -> Iterator[None]:
        """Publish in the background (about ``rate`` events/s, every 4th transaction rolled
        back) while the block runs; producers ride out database outages by retrying."""
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                try:
                    self.produce(max(int(rate / 5), 1), topic=topic, connections=2,
                                 payload=payload)
                except DB_GONE:
                    time.sleep(0.2)  # the database is down or our session was ended
                time.sleep(0.2)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(120)

    # --- faults and settling ----------------------------------------------------------

    def mark_fault(self, url: str | None = None) -> None:
        """Note the moment of the fault, by the database clock."""
        if self.history.fault_at is None:
            self.history.fault_at = scalar(url or self.url, "SELECT clock_timestamp()")

    def unsettled(self) -> int:
        return int(scalar(
            self.url, "SELECT count(*) FROM core.outbox WHERE status IN ('PENDING', 'CLAIMED')"))

    def wait_settled(self, timeout: float, *, what: str = "every event settled") -> float:
        """Wait until no row is PENDING or CLAIMED; returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            try:
                left = self.unsettled()
            except DB_GONE:
                left = -1
            if left == 0:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                self.failures.append(f"timed out after {timeout:g}s waiting for {what} ({left} left)")
                return time.monotonic() - started
            time.sleep(0.2)

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return True
            except DB_GONE:
                pass
            time.sleep(0.05)
        self.failures.append(f"timed out after {timeout:g}s waiting for {what}")
        return False

    def expect(self, condition: bool, failure: str) -> None:
        if not condition:
            self.failures.append(failure)

    def in_transaction(self) -> int:
        return int(scalar(
            self.url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'spectral' AND state = 'idle in transaction'"))

    def terminate_random(self, rng: random.Random, count: int = 1) -> int:
        """pg_terminate_backend of random Spectral sessions of THIS database only."""
        pids = [r["pid"] for r in fetch(
            self.url, "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
            "AND application_name LIKE 'spectral%' AND pid <> pg_backend_pid()", self.dbname)]
        chosen = rng.sample(pids, min(count, len(pids)))
        for pid in chosen:
            fetch(self.url, "SELECT pg_terminate_backend($1) AND datname = $2 AS ok "
                  "FROM pg_stat_activity WHERE pid = $1", pid, self.dbname)
        return len(chosen)

    # --- the end ------------------------------------------------------------------------

    def finish(self, *, stop_workers: bool = True) -> history.Figures:
        """Stop the workers (SIGTERM), read the history, return the figures."""
        for w in self.workers:
            code = w.proc.poll()
            if code is not None and w.proc.pid not in self.expected_exit:
                self.failures.append(f"worker pid {w.proc.pid} exited {code} on its own")
        if stop_workers:
            for w in self.live():
                self.signal(w, signal.SIGTERM)
            for w in self.workers:
                try:
                    w.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.failures.append(f"worker pid {w.proc.pid} did not exit within 30s of SIGTERM")
        # A row in the outbox was committed by someone: one a producer could not record
        # (its COMMIT went unanswered) counts as committed too.
        untracked = {r["id"]: r["topic"] for r in fetch(self.url, "SELECT id, topic FROM core.outbox")
                     if r["id"] not in self.history.committed}
        rolled_back_rows = set(untracked) & self.history.rolled_back_ids
        for event_id in rolled_back_rows:
            del untracked[event_id]  # the checker counts these as effects of a rollback
        if untracked:
            self.history.committed.update(untracked)
            self.notes.append(f"{len(untracked)} committed events the producers could not record "
                              f"({len(self._uncertain)} COMMITs went unanswered)")
        for r in fetch(self.url, "SELECT id, topic, status, attempts, claimed_by, last_error "
                                 "FROM core.outbox WHERE status IN ('PENDING', 'CLAIMED') "
                                 "ORDER BY id LIMIT 5"):
            self.notes.append(f"unsettled: {r}"[:400])
        if self.failures:
            for r in fetch(self.url, "SELECT application_name, state, "
                                     "extract(epoch FROM clock_timestamp() - xact_start)::int AS xact_s, "
                                     "left(query, 80) AS query FROM pg_stat_activity "
                                     "WHERE datname = current_database() AND state LIKE 'idle in%'"):
                self.notes.append(f"open transaction: {r}")
        history.read(self.url, self.log_dir, self.history)
        figures = history.check(self.name, self.history)
        figures.notes = list(self.notes)
        figures.failures = list(self.failures)
        (self.log_dir / "workers.log").write_text(
            "\n\n".join(f"--- pid {w.proc.pid} exit {w.proc.poll()}\n{w.output}" for w in self.workers))
        return figures

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        if self.private is not None:
            self.private.close()
        elif self._shared is not None:
            self._shared.drop(self.url)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- pid {w.proc.pid} (exit {w.proc.poll()}):\n" + "\n".join(w.lines[-lines:])
                         for w in self.workers)


def now_db(url: str) -> datetime:
    value: datetime = scalar(url, "SELECT clock_timestamp()")
    return value


def url_via(url: str, port: int) -> str:
    """``url`` with its port replaced (to go through the relay)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
