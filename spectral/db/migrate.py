"""Forward-only, numbered SQL migrations shipped in ``spectral/db/migrations/``.

Each file is ``NNNN_name.sql`` and declares ``-- kind: expand`` or ``-- kind: contract`` in
its header. ``spectral migrate`` applies the pending ones in order, each in its own
transaction, under a transaction-scoped advisory lock (safe behind a transaction pooler):
concurrent runs wait for each other and re-running applies nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import asyncpg

from ..errors import MigrationError
from . import _aio
from ._errors import translated
from ._queries import MIGRATE, PUBLISH
from .store import hop

_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_KIND = re.compile(r"^--\s*kind:\s*(expand|contract)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    kind: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def shipped() -> list[Migration]:
    """The migrations in the package, in order. Malformed files fail loudly."""
    found: list[Migration] = []
    folder = resources.files("spectral.db").joinpath("migrations")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        match = _FILENAME.match(entry.name)
        if not match:
            continue
        sql = entry.read_text("utf-8")
        kind = _KIND.search(sql)
        if kind is None:
            raise MigrationError(f"migration {entry.name} does not declare '-- kind: expand|contract'")
        found.append(Migration(int(match.group(1)), match.group(2), kind.group(1), sql))
    versions = [m.version for m in found]
    # A gap means a migration file went missing: refuse rather than skip it.
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration numbers must run 1..N without gaps, found {versions}")
    return found


@dataclass(frozen=True)
class MigrationReport:
    applied: list[Migration]
    current: int


async def _refuse_contract_with_live_old_workers(
    conn: asyncpg.Connection, m: Migration, stale_after: float
) -> None:
    if m.kind != "contract" or not await conn.fetchval(MIGRATE.has_workers_table):
        return
    live = await conn.fetch(MIGRATE.live_older_workers, stale_after)
    if live:
        names = ", ".join(f"{r['worker_id']} (gen {r['generation']})" for r in live[:5])
        raise MigrationError(
            f"migration {m.version:04d}_{m.name} contracts the schema while {len(live)} workers of "
            f"older generations are live ({names}); let them drain first (expand/contract)"
        )


@translated
async def _migrate(
    url: str, migrations: list[Migration], max_payload_bytes: int | None, stale_after: float
) -> list[int]:
    # No statement cache: the migrator may run through a transaction pooler. Each of its
    # transactions takes the transaction-scoped lock first (one migrator at a time) and
    # reads what is applied under it, so a concurrent run finds the other's work done.
    conn = await asyncpg.connect(url, timeout=10, statement_cache_size=0)
    try:
        async with conn.transaction():
            await conn.execute(MIGRATE.lock)
            await conn.execute(MIGRATE.bootstrap)
        done: list[int] = []
        for m in migrations:
            async with conn.transaction():
                await conn.execute(MIGRATE.lock)
                applied = {r["version"]: r for r in await conn.fetch(MIGRATE.applied)}
                if m.version in applied:
                    if applied[m.version]["checksum"] != m.checksum:
                        raise MigrationError(
                            f"migration {m.version:04d}_{m.name} changed after it was applied; "
                            "migrations are forward-only: add a new one instead"
                        )
                    continue
                await _refuse_contract_with_live_old_workers(conn, m, stale_after)
                await conn.execute(m.sql)
                await conn.execute(MIGRATE.record, m.version, m.name, m.kind, m.checksum)
            done.append(m.version)
        async with conn.transaction():
            await conn.execute(MIGRATE.lock)
            applied = {r["version"]: r for r in await conn.fetch(MIGRATE.applied)}
            unknown = sorted(set(applied) - {m.version for m in migrations})
            if unknown:
                raise MigrationError(
                    f"the database has migrations this version does not know ({unknown}): "
                    "it was migrated by a newer Spectral"
                )
            if max_payload_bytes is not None:
                await conn.execute(PUBLISH.set_max_payload_bytes, max_payload_bytes)
        return done
    finally:
        await _aio.close_connection(conn, 5)


async def migrate(
    url: str, max_payload_bytes: int | None, *, stale_after: float = 60.0,
    migrations: list[Migration] | None = None,
) -> MigrationReport:
    """Apply every pending migration (trio-callable, one hop).

    ``max_payload_bytes`` sets the database's payload cap; None leaves it as it is (a
    cap raised by an operator is not lowered by a later migrate without the setting).

    A ``contract`` migration is refused while workers of a generation older than the
    newest deployment have a heartbeat fresher than ``stale_after`` seconds.
    """
    migrations = shipped() if migrations is None else migrations
    done = await hop(_migrate, url, migrations, max_payload_bytes, stale_after)
    return MigrationReport([m for m in migrations if m.version in done], latest_version(migrations))


def latest_version(migrations: list[Migration] | None = None) -> int:
    """The schema version a database is at once ``migrations`` (default: shipped) are applied."""
    migrations = shipped() if migrations is None else migrations
    return max((m.version for m in migrations), default=0)


@translated
async def _status(url: str) -> list[Any]:
    conn = await asyncpg.connect(url, timeout=10, statement_cache_size=0)
    try:
        if not await conn.fetchval(MIGRATE.has_schema):
            return []
        return [dict(r) for r in await conn.fetch(MIGRATE.applied)]
    finally:
        await _aio.close_connection(conn, 5)


async def applied_versions(url: str) -> list[dict[str, Any]]:
    """The migrations recorded in the database (empty before the first migrate)."""
    return await hop(_status, url)
