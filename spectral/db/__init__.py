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
from .migrate import MigrationReport, applied_versions, migrate, shipped
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
)
from .urls import redact, scrub

__all__ = [
    "Ack", "ClaimedRow", "Fail", "Handled", "QueryMode", "Release",
    "Connection", "MigrationReport", "Settled", "Settlement", "Store", "TurnTx",
    "applied_versions", "asyncio_loop", "migrate", "open_database", "publish", "publish_trio",
    "redact", "resolve_url", "scrub", "shipped",
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
async def open_database(url: str, *, pool_size: int = 10) -> AsyncIterator[Store]:
    """Open a connection pool to ``url`` inside the process's trio-asyncio loop.

    Cancellation: the pool is closed in a shielded, time-bounded ``finally`` before the
    loop can be torn down, so no query keeps running server-side.
    """
    async with asyncio_loop():
        pool = await hop(_aio.create_pool, url, 1, pool_size)
        try:
            yield Store(pool, url)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT + 1):
                await hop(_aio.close_pool, pool, CLEANUP_TIMEOUT)
