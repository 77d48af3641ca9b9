"""Scratch databases for tests: a server, a migrated template, a fresh copy per test.

The server is ``SPECTRAL_TEST_DATABASE_URL`` when set, else an embedded one started for
the session (:mod:`spectral.db.embedded`) and stopped at the end. Each test database is a
``CREATE DATABASE ... TEMPLATE`` copy of one template migrated once, so a test starts
from the shipped schema in a few tens of milliseconds. Used by the pytest plugin of
:mod:`spectral.testing` and by Spectral's own test suite.

Everything here is blocking (it runs in pytest's sync fixtures, outside trio).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import trio

from ..rules import DEFAULT_MAX_PAYLOAD_BYTES
from . import embedded
from .migrate import migrate
from .store import asyncio_loop

ENV = "SPECTRAL_TEST_DATABASE_URL"


def with_database(url: str, name: str) -> str:
    """``url`` with its database name replaced by ``name``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def admin(url: str, *statements: str) -> None:
    """Run ``statements`` one by one on a connection of their own (outside any loop)."""

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def query(url: str, sql: str, *args: object) -> list[Any]:
    """The rows (asyncpg records) of one query, on a connection of its own."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


async def _migrate(url: str) -> None:
    async with asyncio_loop():
        await migrate(url, DEFAULT_MAX_PAYLOAD_BYTES)


class ScratchServer:
    """A PostgreSQL server for one test session and its migrated template database."""

    def __init__(self, url: str | None = None) -> None:
        self._embedded_dir: Path | None = None
        given = url or os.environ.get(ENV)
        if given:
            self.url = given
        else:
            self._embedded_dir = Path(tempfile.mkdtemp(prefix="spectral-test-"))
            self.url = embedded.start(self._embedded_dir).url
        self.template = f"spectral_tpl_{uuid.uuid4().hex[:10]}"
        admin(self.url, f"CREATE DATABASE {self.template}")
        template_url = with_database(self.url, self.template)
        trio.run(_migrate, template_url)
        self.created: list[str] = []
        self._dropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectral-drop")
        self._dropping: list[Future[None]] = []

    @property
    def embedded(self) -> bool:
        """Whether the server was started here (no SPECTRAL_TEST_DATABASE_URL)."""
        return self._embedded_dir is not None

    def fresh(self, *, migrated: bool = True) -> str:
        """A new database, copied from the migrated template or empty; returns its URL."""
        name = f"spectral_t_{uuid.uuid4().hex[:12]}"
        if migrated:
            admin(self.url, f"CREATE DATABASE {name} TEMPLATE {self.template}")
        else:
            admin(self.url, f"CREATE DATABASE {name}")
        self.created.append(name)
        return with_database(self.url, name)

    def drop(self, url: str, *, wait: bool = True) -> None:
        """Drop a database made by :meth:`fresh` (its sessions are terminated).

        With ``wait=False`` the drop runs in a background thread: DROP DATABASE forces a
        checkpoint, a few hundred milliseconds on a busy server, which a test's teardown
        need not wait for. :meth:`close` waits for those drops.
        """
        name = urlsplit(url).path.lstrip("/")
        if name in self.created:
            self.created.remove(name)
        if wait:
            admin(self.url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        else:
            self._dropping.append(self._dropper.submit(
                admin, self.url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            ))

    def close(self) -> None:
        """Drop every database made here and the template; stop an embedded server."""
        self._dropper.shutdown(wait=True)
        failed = [e for f in self._dropping if (e := f.exception()) is not None]
        for name in list(self.created):
            admin(self.url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin(self.url, f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")
        if self._embedded_dir is not None:
            embedded.stop(self._embedded_dir)
        if failed:
            raise failed[0]  # a test database could not be dropped: say so, once
