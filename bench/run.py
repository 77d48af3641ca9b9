"""Spectral against its peers, measured in one run on this machine.

Run with the benchmark's venv (see bench/setup.sh and bench/README.md)::

    /tmp/spectral-bench-venv/bin/python bench/run.py [--jobs 20000] [--repeat 3]

For each system, on a fresh database created (and dropped) on the server of
--database-url, it measures the median of --repeat runs of:

* drain throughput: --jobs no-op jobs inserted first, then one worker process drains them;
  jobs/s from the worker's ready line until the last job is finished;
* idle commit->handler-start latency: with that worker idle, --probes jobs published one
  at a time in their own transactions, --spacing-ms apart; p50 and p99 in ms;
* the worker's peak RSS (VmHWM) after the drain;

and, for Spectral only, the time from SIGTERM to exit with --inflight handlers sleeping
0.5 s, its exit code, and how many of those rows were acknowledged.

It prints a table and writes the same figures to bench/results/latest.json. Absolute
figures drift between runs on shared machines: read the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import peers  # noqa: E402 - the repository root is put on sys.path first
from bench.apps import NOOP_TOPIC, SLEEP_SECONDS, SLEEP_TOPIC  # noqa: E402

BIN = Path(sys.executable).parent
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The peer every ratio is taken against.
BASELINE = "pgqueuer-defaults"
#: The peer's best configuration: the second ratio column.
BEST_PEER = "pgqueuer-tuned"
#: Seconds between polls of the remaining-jobs count while a worker drains.
POLL = 0.05
#: A database timestamp may lead the poll that saw the queue empty by at most this.
CLOCK_SLACK = 0.005


# --- worker processes --------------------------------------------------------------------


class WorkerFailedError(RuntimeError):
    """A worker process exited or never became ready."""


class Worker:
    """One worker subprocess; notes when it logs its ready line and tracks its VmHWM."""

    def __init__(self, proc: asyncio.subprocess.Process, ready_marker: bytes) -> None:
        self.proc = proc
        self.spawned_at = time.time()
        self.ready_at: float | None = None
        self.lines: deque[str] = deque(maxlen=40)
        self._ready = asyncio.Event()
        self._marker = ready_marker
        self._reader = asyncio.create_task(self._read())
        self.peak_rss_kib = 0

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str], ready_marker: bytes,
                    cwd: Path = REPO) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        return cls(proc, ready_marker)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if not self._ready.is_set() and self._marker in line:
                self.ready_at = time.time()
                self._ready.set()
            self.lines.append(line.decode(errors="replace").rstrip())

    def tail(self) -> str:
        return "\n    ".join(list(self.lines)[-12:])

    def alive(self) -> bool:
        return self.proc.returncode is None

    async def wait_ready(self, within: float = 60.0) -> float:
        waiter = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            exited.cancel()
        if self.ready_at is None:
            await asyncio.sleep(0.1)  # let the reader collect the last lines
            state = "exited" if not self.alive() else f"not ready after {within:g}s"
            raise WorkerFailedError(f"worker {state}:\n    {self.tail()}")
        return self.ready_at

    def sample_rss(self) -> int:
        """Read VmHWM (the process's peak resident set) while it is alive; KiB."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        return self.peak_rss_kib

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (0 once it is gone)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            return 0.0
        # utime and stime are fields 14 and 15 of stat(5), counted after the ")".
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def peak_rss_mib(self) -> float:
        return round(self.peak_rss_kib / 1024, 1)

    async def stop(self, grace: float = 15.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        # A grandchild holding the pipe open must not hang the harness.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._reader, 2)
        assert self.proc.returncode is not None
        return self.proc.returncode


class Workers:
    """Several worker processes of one system draining one database, seen as one: ready
    when the first is (the drain clock starts then), alive while all are, CPU summed,
    peak RSS the largest of them."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.spawned_at = min(w.spawned_at for w in workers)

    async def wait_ready(self, within: float = 60.0) -> float:
        return min([await w.wait_ready(within) for w in self.workers])

    def alive(self) -> bool:
        return all(w.alive() for w in self.workers)

    def tail(self) -> str:
        return "\n    ".join(w.tail() for w in self.workers)

    def sample_rss(self) -> int:
        return max(w.sample_rss() for w in self.workers)

    def cpu_seconds(self) -> float:
        return sum(w.cpu_seconds() for w in self.workers)

    @property
    def peak_rss_mib(self) -> float:
        return max(w.peak_rss_mib for w in self.workers)

    async def stop(self) -> None:
        for w in self.workers:
            await w.stop()


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPECTRAL_", "PGQUEUER_", "PROCRASTINATE_", "BENCH_"))
           and k != "DATABASE_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --- databases ---------------------------------------------------------------------------


def database_url(admin_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str, name: str) -> AsyncIterator[str]:
    """Create database ``name`` on the server of ``admin_url``; drop it afterwards."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield database_url(admin_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def clock_offset(url: str) -> float:
    """Seconds the database's clock_timestamp() is ahead of this process's time.time()."""
    conn = await asyncpg.connect(url)
    try:
        best: tuple[float, float] | None = None
        for _ in range(5):
            before = time.time()
            db = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
            after = time.time()
            if best is None or after - before < best[0]:
                best = (after - before, db - (before + after) / 2)
        assert best is not None
        return best[1]
    finally:
        await conn.close()


# --- the systems -------------------------------------------------------------------------


class Producer(Protocol):
    async def bulk(self, n: int) -> None: ...
    async def one(self, seq: int) -> None: ...


@dataclass(frozen=True)
class System:
    key: str
    label: str
    kind: str  # "spectral", "pgqueuer", "procrastinate" or "raw"
    settings: dict[str, int] = field(default_factory=dict)  # concurrency, batch_size
    max_jobs: int | None = None  # a slow system drains fewer jobs (its rate does not depend on it)
    tree: Path | None = None  # Spectral only: run this source tree instead of the installed one
    processes: int = 1  # worker processes draining the same database

    def jobs(self, args: argparse.Namespace) -> int:
        return min(args.jobs, self.max_jobs) if self.max_jobs else args.jobs

    def describe(self, args: argparse.Namespace) -> str:
        names = {"concurrency": "C", "batch_size": "batch"}
        shown = " ".join(f"{names[k]}={v}" for k, v in self.settings.items()) or "defaults"
        if self.processes > 1:
            shown += f", {self.processes} procs"
        if self.jobs(args) != args.jobs:
            shown += f", {self.jobs(args)} jobs"
        return shown


class SpectralProducer:
    """Bulk: one INSERT ... SELECT into core.outbox; probes: core.publish, autocommit."""

    def __init__(self, conn: asyncpg.Connection, generation: int, topic: str = NOOP_TOPIC) -> None:
        self._conn = conn
        self._generation = generation
        self._topic = topic

    async def bulk(self, n: int) -> None:
        await self._conn.execute(
            "INSERT INTO core.outbox (generation, topic, payload) "
            "SELECT $1, $2, '{}'::jsonb FROM generate_series(1, $3)",
            self._generation, self._topic, n,
        )

    async def one(self, seq: int) -> None:
        await self._conn.fetchval(
            "SELECT core.publish($1, $2::jsonb, NULL, $3)",
            self._topic, json.dumps({"seq": seq}), self._generation,
        )


async def spectral_install(url: str) -> int:
    """Apply Spectral's migrations with its CLI and allocate one generation."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "spectral"), "migrate", cwd=REPO,
        env=worker_env(SPECTRAL_DATABASE_URL=url), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise WorkerFailedError(f"spectral migrate failed:\n{out.decode(errors='replace')}")
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "INSERT INTO core.deployments (reference, tag) VALUES ('bench', 'bench') "
            "RETURNING generation"
        ))
    finally:
        await conn.close()


class Driver:
    """How the harness installs, fills, runs and watches one kind of system."""

    table = ""
    remaining_sql = ""
    finished_at_sql = ""
    ready_marker = b"bench ready"

    async def install(self, url: str) -> dict[str, Any]:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def producer(self, conn: asyncpg.Connection, url: str,
                       ctx: dict[str, Any]) -> AsyncIterator[Producer]:
        raise NotImplementedError
        yield

    def command(self, system: System, url: str, ctx: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError


class SpectralDriver(Driver):
    table = "core.outbox"
    remaining_sql = "SELECT count(*) FROM core.outbox WHERE status <> 'DONE'"
    finished_at_sql = "SELECT extract(epoch FROM max(done_at))::float8 FROM core.outbox"
    ready_marker = b"spectral ready"

    async def install(self, url: str) -> dict[str, Any]:
        return {"generation": await spectral_install(url)}

    @contextlib.asynccontextmanager
    async def producer(self, conn: asyncpg.Connection, url: str,
                       ctx: dict[str, Any]) -> AsyncIterator[Producer]:
        yield SpectralProducer(conn, ctx["generation"])

    def command(self, system: System, url: str, ctx: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        env = {"SPECTRAL_DATABASE_URL": url, "SPECTRAL_GENERATION": str(ctx["generation"])}
        for name, value in system.settings.items():
            env[f"SPECTRAL_{name.upper()}"] = str(value)
        if system.tree is not None:
            # Run from the tree (first on sys.path); in development the worker applies
            # any migration the tree adds before it logs ready.
            return [sys.executable, "-m", "spectral", "worker", "bench.apps:noop_app"], env
        return [str(BIN / "spectral"), "worker", "bench.apps:noop_app"], env


class RawDriver(SpectralDriver):
    ready_marker = b"bench ready"

    def command(self, system: System, url: str, ctx: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-m", "bench.peers", "raw", "--database-url", url,
                "--generation", str(ctx["generation"]),
                "--batch-size", str(system.settings.get("batch_size", 100))], {}


class PgqueuerDriver(Driver):
    table = "pgqueuer"
    remaining_sql = "SELECT count(*) FROM pgqueuer"
    finished_at_sql = (
        "SELECT extract(epoch FROM max(created))::float8 FROM pgqueuer_log WHERE status = 'successful'"
    )

    async def install(self, url: str) -> dict[str, Any]:
        await peers.pgqueuer_install(url)
        return {}

    @contextlib.asynccontextmanager
    async def producer(self, conn: asyncpg.Connection, url: str,
                       ctx: dict[str, Any]) -> AsyncIterator[Producer]:
        yield peers.PgqueuerProducer(conn)

    def command(self, system: System, url: str, ctx: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, "-m", "bench.peers", "pgqueuer", "--database-url", url]
        if "batch_size" in system.settings:
            argv += ["--batch-size", str(system.settings["batch_size"])]
        if "concurrency" in system.settings:
            argv += ["--concurrency", str(system.settings["concurrency"])]
        return argv, {}


class ProcrastinateDriver(Driver):
    table = "procrastinate_jobs"
    remaining_sql = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    finished_at_sql = (
        "SELECT extract(epoch FROM max(at))::float8 FROM procrastinate_events WHERE type = 'succeeded'"
    )

    async def install(self, url: str) -> dict[str, Any]:
        await peers.procrastinate_install(url)
        return {}

    @contextlib.asynccontextmanager
    async def producer(self, conn: asyncpg.Connection, url: str,
                       ctx: dict[str, Any]) -> AsyncIterator[Producer]:
        async with peers.ProcrastinateProducer(url) as producer:
            yield producer

    def command(self, system: System, url: str, ctx: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-m", "bench.peers", "procrastinate", "--database-url", url,
                "--concurrency", str(system.settings.get("concurrency", 10))], {}


DRIVERS: dict[str, Driver] = {
    "spectral": SpectralDriver(),
    "raw": RawDriver(),
    "pgqueuer": PgqueuerDriver(),
    "procrastinate": ProcrastinateDriver(),
}

#: The module each kind needs importable in this venv.
REQUIRES = {"spectral": "spectral", "raw": "asyncpg", "pgqueuer": "pgqueuer",
            "procrastinate": "procrastinate"}


def systems(args: argparse.Namespace) -> list[System]:
    candidate = []
    if args.candidate is not None:
        tuned = {"concurrency": args.tuned_concurrency, "batch_size": args.tuned_batch}
        tree = args.candidate.resolve()
        candidate = [
            System("candidate-defaults", "candidate (defaults)", "spectral", tree=tree),
            System("candidate-tuned", "candidate (tuned)", "spectral", tuned, tree=tree),
        ]
    return [
        System("spectral-defaults", "spectral (defaults)", "spectral"),
        System("spectral-tuned", "spectral (tuned)", "spectral",
               {"concurrency": args.tuned_concurrency, "batch_size": args.tuned_batch}),
        System("spectral-2procs", "spectral (2 workers)", "spectral", processes=2),
        *candidate,
        System("pgqueuer-defaults", "pgqueuer (defaults)", "pgqueuer"),
        System("pgqueuer-tuned", "pgqueuer (tuned)", "pgqueuer", {"batch_size": 100}),
        System("procrastinate", "procrastinate", "procrastinate", {"concurrency": 10},
               max_jobs=args.slow_jobs),
        System("raw-asyncpg", "raw asyncpg loop (ceiling)", "raw", {"batch_size": 100}),
    ]


# --- measurements ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile of sorted-or-not ``values``, q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def wait_drained(conn: asyncpg.Connection, sql: str, worker: Workers, limit: float) -> float:
    """Poll ``sql`` (a count of unfinished jobs) every POLL seconds; the time it read 0."""
    deadline = time.monotonic() + limit
    while True:
        remaining = await conn.fetchval(sql)
        if remaining == 0:
            return time.time()
        if not worker.alive():
            raise WorkerFailedError(f"worker exited with {remaining} jobs left:\n    {worker.tail()}")
        if time.monotonic() > deadline:
            raise WorkerFailedError(f"{remaining} jobs left after {limit:g}s")
        worker.sample_rss()
        await asyncio.sleep(POLL)


def read_starts(path: Path) -> dict[int, float]:
    """The probe file: ``seq start_time`` lines; the first start of each seq counts."""
    started: dict[int, float] = {}
    for line in path.read_text().splitlines():
        seq_text, _, at = line.partition(" ")
        started.setdefault(int(seq_text), float(at))
    return started


async def probe_latency(producer: Producer, path: Path, count: int, spacing: float,
                        patience: float = 15.0) -> dict[str, Any]:
    """Publish ``count`` probes one at a time; commit->handler-start percentiles in ms."""
    committed: dict[int, float] = {}
    next_at = time.monotonic()
    for seq in range(count):
        await producer.one(seq)
        committed[seq] = time.time()  # the INSERT's autocommit has returned
        next_at += spacing
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    deadline = time.monotonic() + patience
    while True:
        started = read_starts(path)
        if len(started) >= count or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    latencies = [(started[s] - committed[s]) * 1000 for s in committed if s in started]
    if not latencies:
        raise WorkerFailedError("no latency probe reached a handler")
    return {
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "received": len(latencies),
        "sent": count,
    }


async def measure(system: System, args: argparse.Namespace, run: int, offset_ok: bool) -> dict[str, Any]:
    """One fresh database: drain --jobs, then probe latency on the idle worker."""
    driver = DRIVERS[system.kind]
    name = f"spectral_bench_{system.key.replace('-', '_')}_{os.getpid()}_{run}"
    async with fresh_database(args.database_url, name) as url:
        ctx = await driver.install(url)
        conn = await asyncpg.connect(url)
        try:
            async with driver.producer(conn, url, ctx) as producer:
                await producer.bulk(system.jobs(args))
                if args.analyze:
                    await conn.execute(f"ANALYZE {driver.table}")
                # Start every drain with the bulk insert's pages flushed, so no system pays
                # for the previous one's checkpoint (needs superuser; skipped otherwise).
                with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("CHECKPOINT")
                with tempfile.TemporaryDirectory(prefix="spectral-bench-") as tmp:
                    probes = Path(tmp) / "starts"
                    probes.touch()
                    argv, env = driver.command(system, url, ctx)
                    worker = Workers([
                        await Worker.start(argv, worker_env(BENCH_LATENCY_FILE=str(probes), **env),
                                           driver.ready_marker, cwd=system.tree or REPO)
                        for _ in range(system.processes)
                    ])
                    try:
                        return await _measure_worker(worker, conn, driver, producer, probes, args,
                                                     system.jobs(args), offset_ok)
                    finally:
                        await worker.stop()
        finally:
            await conn.close()


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of the machine's CPUs busy between two ``cpu_ticks()`` (1.0 = all of them)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


async def _measure_worker(worker: Workers, conn: asyncpg.Connection, driver: Driver,
                          producer: Producer, probes: Path, args: argparse.Namespace,
                          jobs: int, offset_ok: bool) -> dict[str, Any]:
    began = await worker.wait_ready()
    cpu_began = worker.cpu_seconds()
    ticks_began = cpu_ticks()
    seen_empty = await wait_drained(conn, driver.remaining_sql, worker, args.drain_limit)
    cpu_used = worker.cpu_seconds() - cpu_began
    machine_busy = busy_share(ticks_began, cpu_ticks())
    finished = seen_empty
    # The last job's own completion timestamp (same host clock) is sharper than the
    # 50 ms poll; used only when it falls between the two.
    db_finished = await conn.fetchval(driver.finished_at_sql)
    if offset_ok and db_finished is not None and began < db_finished <= seen_empty + CLOCK_SLACK:
        finished = min(db_finished, seen_empty)
    worker.sample_rss()
    result: dict[str, Any] = {
        "jobs": jobs,
        "startup_s": round(began - worker.spawned_at, 3),
        "drain_s": round(finished - began, 4),
        "drain_jobs_per_s": round(jobs / (finished - began), 1),
        "end_from": "database" if finished != seen_empty else "poll",
        # The worker process's own CPU per job while draining (PostgreSQL's is not in it).
        "worker_cpu_us_per_job": round(cpu_used / jobs * 1e6, 1),
        # Other processes on the machine skew everything: the 1-minute load after the drain.
        "loadavg_1m": os.getloadavg()[0],
        "worker_cpu_share": round(cpu_used / (seen_empty - began), 2),
        # Everything on the machine (worker, PostgreSQL, this harness): near 1.0 the CPUs
        # are what bounds the drain, and a second worker process cannot add much.
        "machine_cpu_busy": machine_busy,
        "peak_rss_mib": worker.peak_rss_mib,
    }
    await asyncio.sleep(args.settle)  # idle: let the worker fall back to waiting
    result["latency"] = await probe_latency(producer, probes, args.probes, args.spacing_ms / 1000)
    return result


async def sigterm_drain(args: argparse.Namespace, run: int) -> dict[str, Any]:
    """Spectral only: K handlers sleeping 0.5 s in flight, then SIGTERM; time to exit."""
    k = args.inflight
    name = f"spectral_bench_sigterm_{os.getpid()}_{run}"
    async with fresh_database(args.database_url, name) as url:
        generation = await spectral_install(url)
        conn = await asyncpg.connect(url)
        try:
            env = worker_env(SPECTRAL_DATABASE_URL=url, SPECTRAL_GENERATION=str(generation),
                             SPECTRAL_CONCURRENCY=str(max(k, 50)))
            worker = await Worker.start(
                [str(BIN / "spectral"), "worker", "bench.apps:sleep_app"], env, b"spectral ready"
            )
            try:
                await worker.wait_ready()
                await asyncio.sleep(args.settle)
                await SpectralProducer(conn, generation, SLEEP_TOPIC).bulk(k)
                deadline = time.monotonic() + 10
                while await conn.fetchval(
                    "SELECT count(*) FROM core.outbox WHERE status = 'CLAIMED'"
                ) < k:
                    if time.monotonic() > deadline:
                        raise WorkerFailedError(f"{k} sleeping handlers never all started")
                    await asyncio.sleep(0.005)
                claimed_at = time.time()
                await asyncio.sleep(0.02)  # the turns start right after the claim returns
                worker.sample_rss()
                signalled = time.time()
                worker.proc.send_signal(signal.SIGTERM)
                while worker.alive() and time.time() - signalled < 60:
                    worker.sample_rss()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(worker.proc.wait(), 0.02)
                exited = time.time()
            finally:
                code = await worker.stop()
            acked = await conn.fetchval(
                "SELECT count(*) FROM core.outbox WHERE status = 'DONE' AND topic = $1", SLEEP_TOPIC
            )
        finally:
            await conn.close()
    left = max(0.0, SLEEP_SECONDS - (signalled - claimed_at))
    return {
        "inflight": k,
        "drain_s": round(exited - signalled, 3),
        "handler_time_left_s": round(left, 3),
        "overhead_s": round(exited - signalled - left, 3),
        "exit_code": code,
        "acknowledged": acked,
        "peak_rss_mib": worker.peak_rss_mib,
    }


# --- summary and output ------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values.append(value)
    return round(statistics.median(values), 2) if values else None


def summarise(system: System, args: argparse.Namespace, runs: list[dict[str, Any]],
              error: str | None) -> dict[str, Any]:
    return {
        "label": system.label,
        "settings": system.describe(args),
        "jobs": system.jobs(args),
        "drain_jobs_per_s": median_of(runs, "drain_jobs_per_s"),
        "latency_p50_ms": median_of(runs, "latency", "p50_ms"),
        "latency_p99_ms": median_of(runs, "latency", "p99_ms"),
        "peak_rss_mib": median_of(runs, "peak_rss_mib"),
        "worker_cpu_us_per_job": median_of(runs, "worker_cpu_us_per_job"),
        "worker_cpu_share": median_of(runs, "worker_cpu_share"),
        "machine_cpu_busy": median_of(runs, "machine_cpu_busy"),
        "startup_s": median_of(runs, "startup_s"),
        "runs": runs,
        "error": error,
    }


def versions() -> dict[str, str]:
    found = {}
    for dist in ("spectral-outbox", "pgqueuer", "procrastinate", "asyncpg", "psycopg",
                 "trio", "trio-asyncio"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def render(report: dict[str, Any]) -> str:
    results = report["systems"]
    header = (f"{'system':<28} {'settings':<24} {'drain jobs/s':>12} {'vs ' + BASELINE:>21} "
              f"{'vs ' + BEST_PEER:>18} {'p50 ms':>7} {'p99 ms':>7} {'RSS MiB':>8} {'CPU us/job':>10} "
              f"{'CPUs busy':>9}")
    lines = [header, "-" * len(header)]
    for key, r in results.items():
        rate = r["drain_jobs_per_s"]
        ratio = f"{r['ratio_vs_baseline']:.2f}x" if r.get("ratio_vs_baseline") else "n/a"
        best = f"{r['ratio_vs_best_peer']:.2f}x" if r.get("ratio_vs_best_peer") else "n/a"
        lines.append(
            f"{r['label']:<28} {r['settings']:<24} {fmt(rate):>12} {ratio:>21} {best:>18} "
            f"{fmt(r['latency_p50_ms'], 1):>7} {fmt(r['latency_p99_ms'], 1):>7} "
            f"{fmt(r['peak_rss_mib'], 1):>8} {fmt(r['worker_cpu_us_per_job'], 0):>10} "
            f"{pct(r.get('machine_cpu_busy')):>9}"
        )
        if r["error"]:
            lines.append(f"    {key}: could not be measured: {r['error']}")
    sig = report.get("spectral_sigterm")
    if sig:
        lines.append("")
        if sig.get("error"):
            lines.append(f"spectral drain after SIGTERM: could not be measured: {sig['error']}")
        else:
            lines.append(
                f"spectral drain after SIGTERM ({sig['inflight']} handlers sleeping {SLEEP_SECONDS} s): "
                f"{sig['drain_s']:.2f} s to exit (median; handlers had {sig['handler_time_left_s']:.2f} s "
                f"left, overhead {sig['overhead_s']:.2f} s), exit codes {sig['exit_codes']}, "
                f"acknowledged {sig['acknowledged']}"
            )
            lines.append(f"spectral peak RSS: {fmt(sig['peak_rss_mib'], 1)} MiB in the SIGTERM run; "
                         + ", ".join(f"{fmt(results[k]['peak_rss_mib'], 1)} MiB after draining "
                                     f"{report['meta']['jobs']} ({results[k]['settings']})"
                                     for k in ("spectral-defaults", "spectral-tuned") if k in results))
    one, two = (results.get(k, {}).get("drain_jobs_per_s") for k in ("spectral-defaults", "spectral-2procs"))
    if one and two:
        lines.append("")
        lines.append(f"spectral, two worker processes against one (defaults): {two / one:.2f}x")
    meta = report["meta"]
    loads = [r["loadavg_1m"] for v in results.values() for r in v["runs"] if "loadavg_1m" in r]
    if loads and max(loads) > 2 * meta["cpus"]:  # this benchmark alone keeps about 2 busy
        lines.append("")
        lines.append(f"note: the machine was busy with other processes (1-minute load up to "
                     f"{max(loads):.1f} on {meta['cpus']} CPUs): absolute figures are depressed "
                     "and noisy; the ratios of one run are the figures to read")
    lines.append("")
    lines.append(
        f"median of {meta['repeat']} runs; {meta['jobs']} drain jobs, {meta['probes']} latency probes "
        f"{meta['spacing_ms']} ms apart; PostgreSQL {meta['server']}; Python {meta['python']}; "
        f"{meta['cpus']} CPUs; spectral at {meta['commit']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL),
                   help="server to create the fresh databases on (a database there to connect "
                        f"to; default {DEFAULT_URL})")
    p.add_argument("--repeat", type=int, default=3, help="runs per system; medians are reported")
    p.add_argument("--jobs", "-n", type=int, default=20_000, help="no-op jobs per drain run")
    p.add_argument("--slow-jobs", type=int, default=5_000,
                   help="jobs for procrastinate, whose drain of 20,000 alone takes minutes")
    p.add_argument("--probes", "-m", type=int, default=300, help="latency probes per run")
    p.add_argument("--spacing-ms", type=float, default=20.0, help="ms between latency probes")
    p.add_argument("--inflight", "-k", type=int, default=50,
                   help="sleeping handlers in flight at SIGTERM (Spectral only)")
    p.add_argument("--tuned-concurrency", type=int, default=200)
    p.add_argument("--tuned-batch", type=int, default=100)
    p.add_argument("--analyze", action="store_true",
                   help="ANALYZE the queue table after the bulk insert (statistics that say "
                        "every row is pending, as after a backlog; see README)")
    p.add_argument("--candidate", type=Path,
                   help="a copy of this repository with changes to spectral/: its worker runs as "
                        "candidate-defaults and candidate-tuned beside the installed one (A/B)")
    p.add_argument("--systems", help="comma-separated keys to run (default: all)")
    p.add_argument("--no-sigterm", action="store_true", help="skip the SIGTERM drain runs")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds to let a worker go idle before probing latency")
    p.add_argument("--drain-limit", type=float, default=240.0,
                   help="seconds a drain may take before the run is declared failed")
    p.add_argument("--output", type=Path, default=BENCH / "results" / "latest.json")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    chosen = systems(args)
    if args.systems:
        wanted = set(args.systems.split(","))
        unknown = wanted - {s.key for s in chosen}
        if unknown:
            raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
        chosen = [s for s in chosen if s.key in wanted]

    admin = await asyncpg.connect(args.database_url)
    server = await admin.fetchval("SHOW server_version")
    await admin.close()
    offset = await clock_offset(args.database_url)
    offset_ok = abs(offset) < 0.002
    if not offset_ok:
        print(f"note: database clock is {offset * 1000:+.1f} ms off this host's; drain ends "
              "come from polling only", file=sys.stderr)

    runs: dict[str, list[dict[str, Any]]] = {s.key: [] for s in chosen}
    errors: dict[str, str | None] = {s.key: None for s in chosen}
    for s in chosen:
        if importlib.util.find_spec(REQUIRES[s.kind]) is None:
            errors[s.key] = f"{REQUIRES[s.kind]} is not installed here (run bench/setup.sh)"
    started = time.monotonic()
    # Interleaved (every system once per round) so drift hits all systems alike.
    for run in range(args.repeat):
        for s in chosen:
            if errors[s.key]:
                continue
            try:
                result = await measure(s, args, run, offset_ok)
            except Exception as exc:  # a peer that cannot run is reported, never faked
                errors[s.key] = f"{type(exc).__name__}: {exc}".strip()
                print(f"[{time.monotonic() - started:6.1f}s] {s.key} run {run + 1}: FAILED "
                      f"{errors[s.key]}", file=sys.stderr)
                continue
            runs[s.key].append(result)
            print(f"[{time.monotonic() - started:6.1f}s] {s.key} run {run + 1}: "
                  f"{result['drain_jobs_per_s']:,.0f} jobs/s, p50 {result['latency']['p50_ms']} ms, "
                  f"p99 {result['latency']['p99_ms']} ms, RSS {result['peak_rss_mib']} MiB, "
                  f"CPU {result['worker_cpu_us_per_job']} us/job ({result['worker_cpu_share']:.0%}), "
                  f"load {result['loadavg_1m']:.1f}",
                  file=sys.stderr)

    report: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "jobs": args.jobs, "probes": args.probes, "spacing_ms": args.spacing_ms,
            "repeat": args.repeat, "analyze": args.analyze, "server": server,
            "python": platform.python_version(),
            "cpus": os.cpu_count(), "versions": versions(), "clock_offset_ms": round(offset * 1000, 3),
            "commit": _git_commit(),
        },
        "systems": {s.key: summarise(s, args, runs[s.key], errors[s.key]) for s in chosen},
    }
    base = report["systems"].get(BASELINE, {}).get("drain_jobs_per_s")
    best = report["systems"].get(BEST_PEER, {}).get("drain_jobs_per_s")
    for summary in report["systems"].values():
        rate = summary["drain_jobs_per_s"]
        summary["ratio_vs_baseline"] = round(rate / base, 3) if rate and base else None
        summary["ratio_vs_best_peer"] = round(rate / best, 3) if rate and best else None
    report["meta"]["baseline"] = BASELINE
    report["meta"]["best_peer"] = BEST_PEER

    if not args.no_sigterm and (not args.systems or any(s.kind == "spectral" for s in chosen)):
        sig_runs: list[dict[str, Any]] = []
        sig_error = None
        for run in range(args.repeat):
            try:
                sig_runs.append(await sigterm_drain(args, run))
            except Exception as exc:
                sig_error = f"{type(exc).__name__}: {exc}"
                break
            print(f"[{time.monotonic() - started:6.1f}s] sigterm run {run + 1}: {sig_runs[-1]}",
                  file=sys.stderr)
        report["spectral_sigterm"] = {
            "inflight": args.inflight,
            "drain_s": median_of(sig_runs, "drain_s"),
            "handler_time_left_s": median_of(sig_runs, "handler_time_left_s"),
            "overhead_s": median_of(sig_runs, "overhead_s"),
            "exit_codes": sorted({r["exit_code"] for r in sig_runs}),
            "acknowledged": [f"{r['acknowledged']}/{r['inflight']}" for r in sig_runs],
            "peak_rss_mib": median_of(sig_runs, "peak_rss_mib"),
            "runs": sig_runs,
            "error": sig_error,
        }
    report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def _git_commit() -> str | None:
    """HEAD's short hash, with '+dirty' when spectral/ has uncommitted changes (the
    editable install measures the working tree, not the commit)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "spectral"],
                               capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(amain(args))
    text = render(report)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
