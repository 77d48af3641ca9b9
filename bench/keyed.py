"""Keyed against unkeyed drain: the cost of per-key ordering, measured in one run.

    .venv/bin/python bench/keyed.py [--events 100000] [--keys 10000] [--repeat 3]

For each run, on a fresh database: --events no-op events are inserted (one statement,
not timed) either unkeyed or spread over --keys keys in random order, then one
``spectral worker bench.apps:noop_app`` drains them (SPECTRAL_CONCURRENCY and
SPECTRAL_BATCH_SIZE as given). The clock runs from the worker's ready line to the last
``done_at``. Runs alternate keyed / unkeyed so drift on the machine hits both alike; the
medians and their ratio are printed (the target is keyed >= 70 % of unkeyed).

    .venv/bin/python bench/keyed.py --hot-key 20000

measures instead what one hot key costs every other claim: the claim statement (batch
--batch, acknowledged at once, in a loop over an unkeyed backlog) on a fresh database
with no hot key, with --hot-key rows waiting behind a key whose head is DEAD (blocked),
and with them waiting behind a head that is running (claimed, not acknowledged).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import asyncpg

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.apps import NOOP_TOPIC  # noqa: E402 - the repository root is put on sys.path first
from bench.run import (  # noqa: E402
    BIN,
    DEFAULT_URL,
    Worker,
    fresh_database,
    spectral_install,
    wait_drained,
    worker_env,
)


async def fill(url: str, generation: int, events: int, keys: int | None) -> None:
    conn = await asyncpg.connect(url)
    try:
        # Keys in a random order, as aggregates' events interleave in a real outbox.
        await conn.execute(
            "INSERT INTO core.outbox (generation, topic, payload, key) "
            "SELECT $1, $2, '{}'::jsonb, CASE WHEN $4::int IS NULL THEN NULL "
            "ELSE 'key-' || (hashint4(i) % $4::int + $4::int) % $4::int END "
            "FROM generate_series(1, $3) AS i",
            generation, NOOP_TOPIC, events, keys,
        )
        await conn.execute("ANALYZE core.outbox")
    finally:
        await conn.close()


async def drain_once(args: argparse.Namespace, keyed: bool, run: int) -> float:
    name = f"spectral_bench_keyed_{run}_{'k' if keyed else 'u'}"
    async with fresh_database(args.database_url, name) as url:
        generation = await spectral_install(url)
        await fill(url, generation, args.events, args.keys if keyed else None)
        env = worker_env(SPECTRAL_DATABASE_URL=url, SPECTRAL_GENERATION=str(generation),
                         SPECTRAL_CONCURRENCY=str(args.concurrency),
                         SPECTRAL_BATCH_SIZE=str(args.batch))
        worker = await Worker.start([str(BIN / "spectral"), "worker", "bench.apps:noop_app"],
                                    env, b"spectral ready")
        conn = await asyncpg.connect(url)
        try:
            await worker.wait_ready()
            started = time.time()
            await wait_drained(conn, "SELECT count(*) FROM core.outbox WHERE status <> 'DONE'",
                               worker, args.limit)
            last = await conn.fetchval("SELECT extract(epoch FROM max(done_at))::float8 "
                                       "FROM core.outbox")
        finally:
            await conn.close()
            await worker.stop()
        return args.events / max(last - started, 1e-6)


async def claim_loop(url: str, generation: int, batches: int, batch: int) -> list[float]:
    """Milliseconds per claim statement, each batch acknowledged before the next."""
    from spectral.db._queries import OUTBOX

    conn = await asyncpg.connect(url)
    try:
        times: list[float] = []
        for _ in range(batches):
            t0 = time.perf_counter()
            rows = await conn.fetch(OUTBOX.claim, generation, batch, "bench", 60.0)
            times.append((time.perf_counter() - t0) * 1000)
            await conn.execute(
                "UPDATE core.outbox SET status = 'DONE', done_at = now(), claim_token = NULL,"
                " claim_expires_at = NULL WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        return times
    finally:
        await conn.close()


async def hot_key_once(args: argparse.Namespace, hot: str) -> list[float]:
    async with fresh_database(args.database_url, f"spectral_bench_hot_{hot}") as url:
        generation = await spectral_install(url)
        conn = await asyncpg.connect(url)
        try:
            if hot != "none":
                head = await conn.fetchval(
                    "SELECT core.publish($2, '{}', generation => $1, key => 'hot')",
                    generation, NOOP_TOPIC)
                status = "DEAD" if hot == "blocked" else "CLAIMED"
                await conn.execute(
                    "UPDATE core.outbox SET status = $2, claim_token = CASE WHEN $2 = 'CLAIMED'"
                    " THEN gen_random_uuid() END, claim_expires_at = CASE WHEN $2 = 'CLAIMED'"
                    " THEN now() + interval '1 hour' END WHERE id = $1", head, status)
                await conn.execute(
                    "INSERT INTO core.outbox (generation, topic, payload, key)"
                    " SELECT $1, $2, '{}', 'hot' FROM generate_series(1, $3)",
                    generation, NOOP_TOPIC, args.hot_key)
            batches = 200
            await conn.execute(
                "INSERT INTO core.outbox (generation, topic, payload)"
                " SELECT $1, $2, '{}' FROM generate_series(1, $3)",
                generation, NOOP_TOPIC, batches * args.batch)
            await conn.execute("ANALYZE core.outbox")
        finally:
            await conn.close()
        return await claim_loop(url, generation, batches, args.batch)


async def hot_key(args: argparse.Namespace) -> None:
    print(f"claim statement, batch {args.batch}, over an unkeyed backlog; "
          f"hot key: {args.hot_key:,} rows waiting behind its head")
    baseline = None
    for hot in ("none", "blocked", "running"):
        times = await hot_key_once(args, hot)
        p50 = statistics.median(times)
        baseline = baseline or p50
        print(f"  hot key {hot:<8} first claim {times[0]:8.1f} ms   median {p50:6.2f} ms"
              f"   p99 {sorted(times)[int(len(times) * 0.99) - 1]:6.2f} ms"
              f"   {p50 / baseline:5.2f}x")


async def main(args: argparse.Namespace) -> None:
    if args.hot_key:
        await hot_key(args)
        return
    rates: dict[bool, list[float]] = {True: [], False: []}
    for run in range(args.repeat):
        for keyed in (False, True):
            rate = await drain_once(args, keyed, run)
            rates[keyed].append(rate)
            print(f"run {run + 1}: {'keyed' if keyed else 'unkeyed'} {rate:,.0f} events/s",
                  file=sys.stderr, flush=True)
    unkeyed, keyed_rate = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"{args.events:,} events, concurrency {args.concurrency}, batch {args.batch}, "
          f"median of {args.repeat}")
    print(f"  unkeyed                 {unkeyed:>10,.0f} events/s")
    print(f"  keyed ({args.keys:,} keys)  {keyed_rate:>10,.0f} events/s")
    print(f"  keyed / unkeyed         {keyed_rate / unkeyed:>10.0%}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default=DEFAULT_URL)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--limit", type=float, default=900.0, help="seconds a drain may take")
    p.add_argument("--hot-key", type=int, default=0,
                   help="measure claims beside a key with this many waiting rows instead")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
