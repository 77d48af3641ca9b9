"""The ``spectral_db`` fixture's object: one test database, used from trio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ..db import Store, open_database


class TestDatabase:
    """A fresh, migrated database of one test, with trio-flavoured queries.

    Each call runs in its own transaction (autocommit) on a small pool. Rows come back
    as dicts.
    """

    __test__ = False  # not a test class, whatever pytest's naming rules say

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def store(self) -> Store:
        """Spectral's own view of the database (what the kit's checks query through)."""
        return self._store

    @property
    def url(self) -> str:
        """The database's URL (pass it to your own code or to ``running``)."""
        return self._store.url

    async def execute(self, sql: str, *args: Any) -> str:
        """Run one statement; returns its status tag (e.g. ``'INSERT 0 1'``)."""
        return await self._store.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Every row, as dicts."""
        return await self._store.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        rows = await self._store.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        return await self._store.fetchval(sql, *args)


@asynccontextmanager
async def open_test_database(url: str, *, pool_size: int = 2) -> AsyncIterator[TestDatabase]:
    """A :class:`TestDatabase` on ``url`` (inside the process's trio-asyncio loop)."""
    async with open_database(url, pool_size=pool_size) as store:
        yield TestDatabase(store)
