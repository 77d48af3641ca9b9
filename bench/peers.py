"""Worker processes of the peers Spectral is measured against, one per invocation.

    python -m bench.peers pgqueuer      --database-url URL [--batch-size 10] [--concurrency 0]
    python -m bench.peers procrastinate --database-url URL [--concurrency 10]
    python -m bench.peers raw           --database-url URL --generation G [--batch-size 100]

Each prints ``bench ready`` on stderr just before it starts consuming, runs a no-op
handler per job (calling :func:`bench._probe.record_start` for latency probes) and stops
on SIGTERM. The producer side of each peer (schema, bulk and single enqueue) is here too,
so ``run.py`` talks to every peer through its own API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ._probe import record_start

#: The queue/entrypoint/task name the peers' no-op jobs use.
NOOP = "noop"


def ready() -> None:
    print("bench ready", file=sys.stderr, flush=True)


def _on_sigterm(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)


# --- pgqueuer ----------------------------------------------------------------------------


async def pgqueuer_install(url: str) -> None:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(url)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


class PgqueuerProducer:
    """Enqueues through ``pgqueuer.Queries.enqueue`` on one connection."""

    def __init__(self, conn: Any) -> None:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        self._queries = Queries(AsyncpgDriver(conn))

    async def bulk(self, n: int) -> None:
        # One statement: the list form of enqueue is pgqueuer's batch insert.
        await self._queries.enqueue([NOOP] * n, [None] * n, [0] * n)

    async def one(self, seq: int) -> None:
        await self._queries.enqueue(NOOP, str(seq).encode())


async def pgqueuer_worker(url: str, batch_size: int, concurrency: int) -> None:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(NOOP)
    async def noop(job: Job) -> None:
        record_start(job.payload.decode() if job.payload else None)

    _on_sigterm(qm.shutdown.set)
    ready()
    await qm.run(batch_size=batch_size, max_concurrent_tasks=concurrency or None)
    await conn.close()


# --- procrastinate -----------------------------------------------------------------------


def procrastinate_app(url: str) -> tuple[Any, Any]:
    """A procrastinate App on ``url`` and its no-op task."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name=NOOP)
    async def noop(seq: int | None = None) -> None:
        record_start(seq)

    return app, noop


async def procrastinate_install(url: str) -> None:
    app, _ = procrastinate_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


class ProcrastinateProducer:
    """Defers through the task's ``batch_defer_async`` / ``defer_async``."""

    def __init__(self, url: str) -> None:
        self._app, self._task = procrastinate_app(url)

    async def __aenter__(self) -> ProcrastinateProducer:
        await self._app.open_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._app.close_async()

    async def bulk(self, n: int) -> None:
        chunk = 5_000
        for start in range(0, n, chunk):
            await self._task.batch_defer_async(*({} for _ in range(min(chunk, n - start))))

    async def one(self, seq: int) -> None:
        await self._task.defer_async(seq=seq)


async def procrastinate_worker(url: str, concurrency: int) -> None:
    app, _ = procrastinate_app(url)
    async with app.open_async():
        ready()
        # procrastinate installs its own SIGTERM/SIGINT handlers (graceful stop).
        await app.run_worker_async(concurrency=concurrency)


# --- a raw asyncpg claim + ack loop on Spectral's own table (the ceiling) ----------------

RAW_CLAIM = """
WITH picked AS (
    SELECT id FROM core.outbox
    WHERE generation = $1 AND status = 'PENDING' AND deleted_at IS NULL
      AND available_at <= now()
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE core.outbox AS o
SET status = 'CLAIMED', claimed_by = 'bench-raw', claim_token = gen_random_uuid(),
    claim_expires_at = now() + interval '5 minutes', updated_at = now()
FROM picked
WHERE o.id = picked.id
RETURNING o.id, o.payload::text AS payload, o.claim_token
"""

RAW_ACK = """
UPDATE core.outbox AS o
SET status = 'DONE', done_at = now(), updated_at = now(),
    claim_token = NULL, claim_expires_at = NULL
FROM unnest($1::bigint[], $2::uuid[]) AS a(id, token)
WHERE o.id = a.id AND o.claim_token = a.token AND o.status = 'CLAIMED'
"""


async def raw_worker(url: str, generation: int, batch_size: int, poll_interval: float) -> None:
    """Claim a batch, run the no-ops, acknowledge the batch: two statements per batch on
    one connection, which also LISTENs for Spectral's outbox NOTIFY."""
    import asyncpg

    conn = await asyncpg.connect(url)
    wake = asyncio.Event()
    stop = asyncio.Event()
    await conn.add_listener("spectral_outbox_v1", lambda *_: wake.set())

    def halt() -> None:
        stop.set()
        wake.set()

    _on_sigterm(halt)
    ready()
    while not stop.is_set():
        wake.clear()
        rows = await conn.fetch(RAW_CLAIM, generation, batch_size)
        if rows:
            for row in rows:
                record_start(json.loads(row["payload"]).get("seq"))
            await conn.execute(RAW_ACK, [r["id"] for r in rows], [r["claim_token"] for r in rows])
            continue
        try:
            await asyncio.wait_for(wake.wait(), poll_interval)
        except TimeoutError:
            pass
    await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("system", choices=("pgqueuer", "procrastinate", "raw"))
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--generation", type=int)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    run: Callable[[], Awaitable[None]]
    if args.system == "pgqueuer":
        # pgqueuer's own defaults: batch_size=10, no cap on concurrent tasks.
        def run() -> Awaitable[None]:
            return pgqueuer_worker(args.database_url, args.batch_size or 10, args.concurrency or 0)
    elif args.system == "procrastinate":
        def run() -> Awaitable[None]:
            return procrastinate_worker(args.database_url, args.concurrency or 10)
    else:
        if args.generation is None:
            parser.error("raw needs --generation")

        def run() -> Awaitable[None]:
            return raw_worker(args.database_url, args.generation, args.batch_size or 100,
                              args.poll_interval)
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
