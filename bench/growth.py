"""Growth: what years of history in core.outbox cost a Spectral worker.

Run with a venv that has this repository installed (the project's .venv or the bench's)::

    .venv/bin/python bench/growth.py [--sizes 0,1000000,10000000] [--max 10000000]

For each size N it creates a fresh database and fills it with N DONE rows and their N
ledger rows (acknowledged an hour ago: inside the default retention, so the worker's
pruner keeps them), then VACUUM ANALYZEs both tables (what autovacuum would have done).
Then it runs --rounds rounds, each measuring every size in turn (so drift on the machine
hits all sizes alike), and reports the median per size of:

* the snapshot refresh behind /ready, /queue and /metrics (QueueSnapshot.refresh, the
  code the HTTP server runs), median of --refreshes, and for comparison the full
  GROUP BY count over core.outbox that the snapshot ran before (``OUTBOX.counts``);
* claim latency: the claim statement taking 100 due rows (rolled back each time) and an
  idle claim that finds nothing due, medians of --claims;
* drain rate: --jobs no-op events drained by one ``spectral worker`` with its defaults;
* the same drain while another connection of the database holds a transaction open
  (a snapshot and a transaction id) for its whole duration, and what that left behind:
  the health verdict during the drain, and the dead tuples a VACUUM run right after the
  drain could not remove (with and without the transaction still open).

It prints a table and writes the figures to bench/results/growth.json. The machine is
shared: compare sizes within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import trio

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.apps import NOOP_TOPIC  # noqa: E402
from bench.run import (  # noqa: E402
    BIN,
    DEFAULT_URL,
    Worker,
    fresh_database,
    spectral_install,
    worker_env,
)
from spectral.db import open_database  # noqa: E402
from spectral.db._queries import OUTBOX  # noqa: E402
from spectral.observe import QueueSnapshot  # noqa: E402

#: Rows per INSERT while filling (one statement per chunk keeps memory flat).
CHUNK = 1_000_000
#: Unfinished rows only, from their partial indexes: polling must not scan the history.
REMAINING = ("SELECT (SELECT count(*) FROM core.outbox WHERE status = 'PENDING'"
             " AND deleted_at IS NULL) + (SELECT count(*) FROM core.outbox WHERE status = 'CLAIMED')")


def log(message: str) -> None:
    print(f"[growth {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def fill(url: str, generation: int, n: int) -> float:
    """N DONE rows acknowledged an hour ago, with one ledger row each; seconds taken."""
    t0 = time.monotonic()
    conn = await asyncpg.connect(url, timeout=30)
    try:
        done = 0
        while done < n:
            step = min(CHUNK, n - done)
            await conn.execute(
                "WITH rows AS ("
                " INSERT INTO core.outbox (generation, topic, payload, status, attempts,"
                "  created_at, updated_at, done_at)"
                " SELECT $1, $2, '{}'::jsonb, 'DONE', 1, now() - interval '1 hour',"
                "  now() - interval '1 hour', now() - interval '1 hour'"
                " FROM generate_series(1, $3) RETURNING id)"
                " INSERT INTO core.event_handled (handler, event_id, handled_at)"
                " SELECT 'bench.noop', id, now() - interval '1 hour' FROM rows",
                generation, NOOP_TOPIC, step)
            done += step
            log(f"  filled {done:,} / {n:,}")
        await conn.execute("VACUUM ANALYZE core.outbox")
        await conn.execute("VACUUM ANALYZE core.event_handled")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.monotonic() - t0


def snapshot_cost(url: str, repeats: int) -> dict[str, float]:
    """Median ms of QueueSnapshot.refresh and of the old full count (run under trio)."""

    async def main() -> dict[str, float]:
        async with open_database(url, pool_size=2) as store:
            snapshot = QueueSnapshot(store, stale_after=60.0)
            refresh: list[float] = []
            full: list[float] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                await snapshot.refresh()
                refresh.append((time.perf_counter() - t0) * 1000)
                assert snapshot.error is None, snapshot.error
                t0 = time.perf_counter()
                await store.fetch(OUTBOX.counts)
                full.append((time.perf_counter() - t0) * 1000)
            return {"refresh_ms": round(statistics.median(refresh), 2),
                    "full_count_ms": round(statistics.median(full), 2),
                    "done_estimate": snapshot.data["health"]["done_estimate"]}

    return trio.run(main)


async def claim_latency(url: str, generation: int, repeats: int) -> dict[str, float]:
    """The claim statement with 100 due rows, and idle; each round rolled back."""
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute(
            "INSERT INTO core.outbox (generation, topic, payload)"
            " SELECT $1, $2, '{}'::jsonb FROM generate_series(1, 100)", generation, NOOP_TOPIC)
        stmt = await conn.prepare(OUTBOX.claim)
        busy: list[float] = []
        idle: list[float] = []
        for _ in range(repeats):
            tr = conn.transaction()
            await tr.start()
            try:
                t0 = time.perf_counter()
                rows = await stmt.fetch(generation, 100, "bench", 60.0)
                busy.append((time.perf_counter() - t0) * 1000)
                assert len(rows) == 100, len(rows)
                t0 = time.perf_counter()
                assert await stmt.fetch(generation, 100, "bench", 60.0) == []
                idle.append((time.perf_counter() - t0) * 1000)
            finally:
                await tr.rollback()
        await conn.execute("DELETE FROM core.outbox WHERE status = 'PENDING'")
    finally:
        await conn.close()
    return {"claim_100_ms": round(statistics.median(busy), 3),
            "claim_idle_ms": round(statistics.median(idle), 3)}


async def drain(url: str, generation: int, jobs: int, *, hold: bool) -> dict[str, Any]:
    """--jobs no-op events drained by one default worker; optionally with a transaction
    held open on another connection for the whole drain."""
    conn = await asyncpg.connect(url, timeout=30)
    holder = await asyncpg.connect(url, timeout=30) if hold else None
    try:
        await conn.execute(
            "INSERT INTO core.outbox (generation, topic, payload)"
            " SELECT $1, $2, '{}'::jsonb FROM generate_series(1, $3)", generation, NOOP_TOPIC, jobs)
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
        dead_before = await conn.fetchval(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'core.outbox'::regclass")
        held = None
        if holder is not None:
            held = holder.transaction(isolation="repeatable_read")
            await held.start()
            await holder.fetchval("SELECT txid_current()")
        with tempfile.TemporaryDirectory(prefix="spectral-growth-") as tmp:
            probes = Path(tmp) / "starts"
            probes.touch()
            env = worker_env(SPECTRAL_DATABASE_URL=url, SPECTRAL_GENERATION=str(generation),
                             BENCH_LATENCY_FILE=str(probes))
            worker = await Worker.start([str(BIN / "spectral"), "worker", "bench.apps:noop_app"],
                                        env, b"spectral ready")
            try:
                began = await worker.wait_ready()
                cpu0 = worker.cpu_seconds()
                deadline = time.monotonic() + 600
                while await conn.fetchval(REMAINING):
                    if not worker.alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"drain failed:\n    {worker.tail()}")
                    await asyncio.sleep(0.05)
                seen = time.time()
                cpu = worker.cpu_seconds() - cpu0
                last = await conn.fetchval(
                    "SELECT extract(epoch FROM max(done_at))::float8 FROM core.outbox"
                    " WHERE status = 'DONE'")
                finished = min(seen, last) if last is not None and began < last <= seen else seen
            finally:
                await worker.stop()
        await asyncio.sleep(0.6)  # the statistics views are flushed about every second
        dead_after = await conn.fetchval(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'core.outbox'::regclass")
        verdict = health_now(url) if held is not None else None
        # What vacuum can do now, while the transaction (if any) is still open: the dead
        # tuples it leaves are those the held xmin horizon protects.
        await conn.execute("VACUUM core.outbox")
        await asyncio.sleep(0.6)
        kept = await conn.fetchval(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'core.outbox'::regclass")
        if held is not None:
            await held.rollback()
    finally:
        await conn.close()
        if holder is not None:
            await holder.close()
    return {"jobs": jobs, "drain_s": round(finished - began, 3),
            "drain_jobs_per_s": round(jobs / (finished - began), 1),
            "worker_cpu_us_per_job": round(cpu / jobs * 1e6, 1),
            "outbox_dead_tuples_added": int(dead_after) - int(dead_before),
            "dead_tuples_vacuum_kept": int(kept),
            "horizon_verdict": verdict, "loadavg_1m": os.getloadavg()[0]}


def health_now(url: str) -> dict[str, Any]:
    """The snapshot's xmin horizon view and verdict right now (a fresh trio run in a
    thread, as the asyncio loop of the harness is running)."""
    import threading

    out: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            async with open_database(url, pool_size=1) as store:
                snap = QueueSnapshot(store, stale_after=60.0)
                await snap.refresh()
                health = snap.data["health"]
                out["oldest_xact_seconds"] = health["xmin_horizon"]["oldest_xact_seconds"]
                out["verdict"] = health["verdicts"][0]["name"]

        trio.run(main)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    return out


async def measure_round(args: argparse.Namespace, url: str, generation: int) -> dict[str, Any]:
    """One round of every measurement on one filled database."""
    snap = await asyncio.to_thread(snapshot_cost, url, args.refreshes)
    claims = await claim_latency(url, generation, args.claims)
    plain = await drain(url, generation, args.jobs, hold=False)
    held = await drain(url, generation, args.jobs, hold=True)
    return {**snap, **claims, "drain": plain, "drain_held": held}


def _median(rounds: list[dict[str, Any]], *path: str) -> float:
    values = []
    for r in rounds:
        value: Any = r
        for key in path:
            value = value[key]
        values.append(value)
    return float(round(statistics.median(values), 3))


async def run_all(args: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    """Fill one database per size, then run --rounds rounds, each over every size in turn
    (drift on the machine hits all sizes alike); medians per size."""
    async with contextlib.AsyncExitStack() as stack:
        dbs: list[tuple[int, str, int, float]] = []
        for n in sizes:
            name = f"spectral_growth_{n}_{uuid.uuid4().hex[:6]}"
            url = await stack.enter_async_context(fresh_database(args.database_url, name))
            generation = await spectral_install(url)
            log(f"size {n:,}: filling")
            dbs.append((n, url, generation, await fill(url, generation, n)))
        rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
        for i in range(args.rounds):
            for n, url, generation, _ in dbs:
                log(f"round {i + 1}/{args.rounds}, size {n:,}")
                rounds[n].append(await measure_round(args, url, generation))
                log(json.dumps(rounds[n][-1]))
        results = []
        for n, url, _, fill_s in dbs:
            conn = await asyncpg.connect(url, timeout=30)
            try:
                size = await conn.fetchval("SELECT pg_total_relation_size('core.outbox')"
                                           " + pg_total_relation_size('core.event_handled')")
            finally:
                await conn.close()
            r = rounds[n]
            results.append({
                "finished_rows": n, "fill_s": round(fill_s, 1), "tables_mib": round(size / 1048576, 1),
                **{k: _median(r, k) for k in ("refresh_ms", "full_count_ms", "claim_100_ms",
                                               "claim_idle_ms")},
                "drain_jobs_per_s": _median(r, "drain", "drain_jobs_per_s"),
                "drain_held_jobs_per_s": _median(r, "drain_held", "drain_jobs_per_s"),
                "dead_kept": _median(r, "drain", "dead_tuples_vacuum_kept"),
                "dead_kept_held": _median(r, "drain_held", "dead_tuples_vacuum_kept"),
                "held_verdicts": [x["drain_held"]["horizon_verdict"] for x in r],
                "rounds": r,
            })
        return results


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| finished rows | snapshot refresh (/ready) ms | old snapshot's count alone ms | claim 100 ms | "
        "idle claim ms | drain jobs/s | drain jobs/s, xact held | dead tuples VACUUM kept "
        "(free / xact held) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['finished_rows']:,} | {r['refresh_ms']} | {r['full_count_ms']} | "
            f"{r['claim_100_ms']} | {r['claim_idle_ms']} | {r['drain_jobs_per_s']:,.0f} | "
            f"{r['drain_held_jobs_per_s']:,.0f} | {r['dead_kept']:,.0f} / {r['dead_kept_held']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--sizes", default="0,1000000,10000000",
                        help="finished rows per scenario, comma-separated")
    parser.add_argument("--max", type=int, default=10_000_000, help="skip sizes above this")
    parser.add_argument("--jobs", type=int, default=20_000, help="events per drain")
    parser.add_argument("--refreshes", type=int, default=20)
    parser.add_argument("--claims", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "growth.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if int(s) <= args.max]
    results = asyncio.run(run_all(args, sizes))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"results": results, "loadavg": os.getloadavg(),
                                       "cpus": os.cpu_count()}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
