"""Test databases: a server (SPECTRAL_TEST_DATABASE_URL or an embedded one), a migrated
template, and a fresh database per test copied from it."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import trio

from spectral.db import embedded, migrate, open_database

ENV = "SPECTRAL_TEST_DATABASE_URL"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def admin(url: str, *statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


class Server:
    """A PostgreSQL server for the test session."""

    def __init__(self) -> None:
        self._embedded_dir: Path | None = None
        given = os.environ.get(ENV)
        if given:
            self.url = given
        else:
            self._embedded_dir = Path(tempfile.mkdtemp(prefix="spectral-test-"))
            self.url = embedded.start(self._embedded_dir).url
        self.template = f"spectral_tpl_{uuid.uuid4().hex[:10]}"
        admin(self.url, f"CREATE DATABASE {self.template}")
        template_url = with_database(self.url, self.template)

        async def migrate_template() -> None:
            async with open_database(template_url, pool_size=1):
                await migrate(template_url, 262_144)

        trio.run(migrate_template)
        self.created: list[str] = []

    @property
    def embedded(self) -> bool:
        return self._embedded_dir is not None

    def fresh(self, *, migrated: bool = True) -> str:
        name = f"spectral_t_{uuid.uuid4().hex[:12]}"
        if migrated:
            admin(self.url, f"CREATE DATABASE {name} TEMPLATE {self.template}")
        else:
            admin(self.url, f"CREATE DATABASE {name}")
        self.created.append(name)
        return with_database(self.url, name)

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        admin(self.url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if name in self.created:
            self.created.remove(name)

    def close(self) -> None:
        for name in list(self.created):
            admin(self.url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin(self.url, f"DROP DATABASE IF EXISTS {self.template} WITH (FORCE)")
        if self._embedded_dir is not None:
            embedded.stop(self._embedded_dir)
