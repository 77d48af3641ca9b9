"""Spectral's database seam: the only package that imports asyncpg or trio_asyncio.

Everything here is trio-flavoured except :func:`publish`, which is for asyncio producers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from . import _aio, embedded
from ._aio import QueryMode
from .migrate import MigrationReport, applied_versions, latest_version, migrate, shipped
from .publish import publish, publish_trio
from .store import (
    CLEANUP_TIMEOUT,
    Ack,
    ClaimedRow,
    Connection,
    Fail,
    Handled,
    Release,
    Settled,
    Settlement,
    Store,
    TurnTx,
    asyncio_loop,
    hop,
    staging_pass,
)
from .urls import redact, scrub

__all__ = [
    "Ack", "ClaimedRow", "Connection", "Fail", "Handled", "MigrationReport", "QueryMode",
    "Release", "Settled", "Settlement", "Store", "TurnTx", "applied_versions", "asyncio_loop",
    "latest_version", "migrate", "open_database", "publish", "publish_trio", "redact",
    "resolve_url", "scrub", "shipped", "staging_pass",
]

log = logging.getLogger("spectral.db")


def resolve_url(database_url: str | None, data_dir: Path) -> str:
    """The URL to use: the given one, or the embedded server's (started if needed).

    Blocking (it may start a server): call it before ``trio.run`` or in a thread.
    """
    if database_url:
        return database_url
    server = embedded.start(data_dir)
    log.info("embedded PostgreSQL (%s) under %s", server.source, server.pgdata)
    return server.url


@asynccontextmanager
async def open_database(
    url: str, *, pool_size: int = 10, pooler: str = "none", listen_url: str | None = None,
    handler_role: str | None = None,
) -> AsyncIterator[Store]:
    """Open a connection pool to ``url`` inside the process's trio-asyncio loop.

    Args:
        pooler: what ``url`` reaches: 'none' (PostgreSQL itself), 'session' or
            'transaction' (a PgBouncer-style pooler in that mode).
        listen_url: a direct URL for LISTEN (behind a transaction pooler).
        handler_role: the role handlers' SQL runs as inside turn transactions.

    Cancellation: the pool is closed in a shielded, time-bounded ``finally`` before the
    loop can be torn down, so no query keeps running server-side.
    """
    async with asyncio_loop():
        pool = await hop(_aio.create_pool, url, 1, pool_size, pooler)
        store = Store(pool, url, pooler=pooler, listen_url=listen_url, handler_role=handler_role)
        try:
            yield store
        finally:
            # Shielded with no trio deadline: each close bounds its own time (see _aio).
            with trio.CancelScope(shield=True):
                await store.close_sessions(CLEANUP_TIMEOUT / 2)
                await hop(_aio.close_pool, pool, CLEANUP_TIMEOUT)
