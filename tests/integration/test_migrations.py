"""Migrations: from zero, idempotent, safe under concurrency, forward-only; and the claim
query stays an index scan however many finished rows the outbox holds."""

from __future__ import annotations

import asyncio
import dataclasses
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
import trio
import trio_asyncio

from spectral.db import applied_versions, asyncio_loop, migrate, shipped
from spectral.db._queries import MIGRATE, OUTBOX
from spectral.errors import MigrationError

# spectral.db re-exports the function ``migrate`` under the submodule's name.
migrate_module = import_module("spectral.db.migrate")

CAP = 262_144
CORE_TABLES = {"deployments", "workers", "settings", "outbox", "event_handled", "schema_migrations"}


async def _fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One query on a fresh connection, from trio (inside ``asyncio_loop()``)."""
    return await trio_asyncio.aio_as_trio(_fetch)(url, sql, *args)  # type: ignore[no-any-return]


def fetch_sync(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(url, sql, *args))


async def test_migrate_builds_the_core_schema_on_an_empty_database(empty_db_url: str) -> None:
    async with asyncio_loop():
        assert await applied_versions(empty_db_url) == []
        report = await migrate(empty_db_url, CAP)
        assert [m.version for m in report.applied] == [m.version for m in shipped()]
        assert report.current == shipped()[-1].version
        tables = await fetch(
            empty_db_url,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'core'",
        )
        recorded = await applied_versions(empty_db_url)
    assert {r["table_name"] for r in tables} >= CORE_TABLES
    assert [(r["version"], r["name"], r["kind"], r["checksum"]) for r in recorded] == [
        (m.version, m.name, m.kind, m.checksum) for m in shipped()
    ]


async def test_migrating_again_applies_nothing(empty_db_url: str) -> None:
    async with asyncio_loop():
        await migrate(empty_db_url, CAP)
        before = await fetch(empty_db_url, "SELECT version, applied_at FROM core.schema_migrations")
        again = await migrate(empty_db_url, CAP)
        after = await fetch(empty_db_url, "SELECT version, applied_at FROM core.schema_migrations")
    assert again.applied == []
    assert again.current == shipped()[-1].version
    assert [tuple(r) for r in after] == [tuple(r) for r in before]


async def test_concurrent_migrations_wait_for_each_other_and_apply_each_migration_once(
    empty_db_url: str,
) -> None:
    reports: list[migrate_module.MigrationReport] = []

    async def run() -> None:
        reports.append(await migrate(empty_db_url, CAP))

    async with asyncio_loop():
        # Hold the migrators' lock so both runs are provably inside migrate() at once.
        holder = await trio_asyncio.aio_as_trio(asyncpg.connect)(empty_db_url, timeout=10)
        try:
            await trio_asyncio.aio_as_trio(holder.execute)("BEGIN")
            await trio_asyncio.aio_as_trio(holder.execute)(MIGRATE.lock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                nursery.start_soon(run)
                with trio.fail_after(10):
                    while True:
                        waiting = await trio_asyncio.aio_as_trio(holder.fetchval)(
                            "SELECT count(*) FROM pg_locks"
                            " WHERE locktype = 'advisory' AND NOT granted"
                            "   AND database = (SELECT oid FROM pg_database"
                            "                   WHERE datname = current_database())"
                        )
                        if waiting == 2:
                            break
                        await trio.sleep(0.01)
                await trio_asyncio.aio_as_trio(holder.execute)("COMMIT")
        finally:
            await trio_asyncio.aio_as_trio(holder.close)()
        recorded = await fetch(
            empty_db_url, "SELECT version, count(*) AS n FROM core.schema_migrations GROUP BY version"
        )

    everything = [m.version for m in shipped()]
    # Each migration takes the lock in its own transaction: the two runs may share the
    # work, but every migration is applied by exactly one of them, once.
    applied = [m.version for r in reports for m in r.applied]
    assert sorted(applied) == everything
    assert {r["version"]: r["n"] for r in recorded} == dict.fromkeys(everything, 1)


def test_every_shipped_migration_declares_its_kind() -> None:
    folder = Path(migrate_module.__file__).parent / "migrations"
    files = sorted(p for p in folder.glob("*.sql"))
    assert files, "no migrations shipped"
    migrations = shipped()
    assert [f"{m.version:04d}_{m.name}.sql" for m in migrations] == [f.name for f in files]
    for m, path in zip(migrations, files, strict=True):
        assert m.kind in ("expand", "contract")
        header = path.read_text("utf-8").splitlines()[:5]
        assert f"-- kind: {m.kind}" in header, path.name


def _fake_migrations(monkeypatch: pytest.MonkeyPatch, root: Path, files: dict[str, str]) -> None:
    folder = root / "migrations"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, "utf-8")
    monkeypatch.setattr(migrate_module, "resources", SimpleNamespace(files=lambda _pkg: root))


def test_a_migration_without_a_kind_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_migrations(monkeypatch, tmp_path, {
        "0001_core.sql": "-- kind: expand\nSELECT 1;\n",
        "0002_more.sql": "-- no kind here\nSELECT 2;\n",
    })
    with pytest.raises(MigrationError, match=r"0002_more\.sql does not declare '-- kind"):
        shipped()


def test_a_repeated_migration_number_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_migrations(monkeypatch, tmp_path, {
        "0001_core.sql": "-- kind: expand\nSELECT 1;\n",
        "0003_more.sql": "-- kind: expand\nSELECT 3;\n",
        "0003_other.sql": "-- kind: expand\nSELECT 3;\n",
    })
    with pytest.raises(MigrationError, match=r"without gaps, found \[1, 3, 3\]"):
        shipped()


def test_a_gap_in_migration_numbers_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_migrations(monkeypatch, tmp_path, {
        "0001_core.sql": "-- kind: expand\nSELECT 1;\n",
        "0003_more.sql": "-- kind: contract\nSELECT 3;\n",
    })
    with pytest.raises(MigrationError, match=r"without gaps, found \[1, 3\]"):
        shipped()


async def test_a_migration_changed_after_it_was_applied_is_refused(
    empty_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with asyncio_loop():
        await migrate(empty_db_url, CAP)
        edited = [dataclasses.replace(m, sql=m.sql + "\n-- an edit\n") for m in shipped()]
        monkeypatch.setattr(migrate_module, "shipped", lambda: edited)
        with pytest.raises(MigrationError) as info:
            await migrate(empty_db_url, CAP)
        recorded = await applied_versions(empty_db_url)
    first = shipped()[0]
    message = str(info.value)
    assert f"{first.version:04d}_{first.name} changed after it was applied" in message
    assert "\n" not in message
    # The recorded history is untouched.
    assert [r["checksum"] for r in recorded] == [m.checksum for m in shipped()]


async def test_a_tampered_checksum_in_the_database_is_refused(empty_db_url: str) -> None:
    async with asyncio_loop():
        await migrate(empty_db_url, CAP)
        await fetch(empty_db_url, "UPDATE core.schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(empty_db_url, CAP)
        # The advisory lock was released: a later run gets as far as the same check.
        with trio.fail_after(5), pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(empty_db_url, CAP)


async def test_a_database_migrated_by_a_newer_version_is_refused(empty_db_url: str) -> None:
    async with asyncio_loop():
        await migrate(empty_db_url, CAP)
        await fetch(
            empty_db_url,
            "INSERT INTO core.schema_migrations (version, name, kind, checksum)"
            " VALUES (9999, 'future', 'expand', 'f')",
        )
        with pytest.raises(MigrationError, match=r"does not know \(\[9999\]\)"):
            await migrate(empty_db_url, CAP)


async def test_migrate_applies_the_payload_cap_to_the_settings_and_the_table(
    empty_db_url: str,
) -> None:
    async with asyncio_loop():
        await migrate(empty_db_url, 1000)
        rows = await fetch(
            empty_db_url,
            "SELECT (SELECT value FROM core.settings WHERE key = 'max_payload_bytes') AS cap,"
            "       (SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            "        WHERE conname = 'outbox_payload_size_check') AS constraint_def",
        )
        # Re-running with the same cap is a no-op; with another cap it moves again.
        await migrate(empty_db_url, 1000)
        await migrate(empty_db_url, 5000)
        later = await fetch(empty_db_url, "SELECT value FROM core.settings WHERE key = 'max_payload_bytes'")
    assert rows[0]["cap"] == "1000"
    assert "<= 1000" in rows[0]["constraint_def"]
    assert later[0]["value"] == "5000"


def _claim_plan(url: str) -> tuple[str, str, str]:
    """EXPLAIN of the claim query: custom plan, generic plan, and without the index."""

    async def run() -> tuple[str, str, str]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute("INSERT INTO core.deployments (reference) VALUES ('v1')")
            await conn.execute(
                "INSERT INTO core.outbox (generation, topic, payload, status, done_at)"
                " SELECT 1, 'orders.created', jsonb_build_object('n', i), 'DONE', now()"
                " FROM generate_series(1, 200000) AS i"
            )
            await conn.execute(
                "INSERT INTO core.outbox (generation, topic, payload)"
                " SELECT 1, 'orders.created', jsonb_build_object('n', i)"
                " FROM generate_series(1, 5) AS i"
            )
            await conn.execute("ANALYZE core.outbox")
            args = (1, 100, "worker-1", 60.0)
            custom = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + OUTBOX.claim, *args))
            # asyncpg's prepared statements may switch to a generic plan: check it too.
            await conn.execute(
                "PREPARE claim_stmt (bigint, integer, text, float8) AS " + OUTBOX.claim
            )
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            generic = "\n".join(
                r[0] for r in await conn.fetch("EXPLAIN EXECUTE claim_stmt (1, 100, 'w', 60)")
            )
            # The check can fail: without the partial index the same query scans the table.
            async with conn.transaction():
                await conn.execute("DROP INDEX core.outbox_due_idx")
                without = "\n".join(
                    r[0] for r in await conn.fetch("EXPLAIN " + OUTBOX.claim, *args)
                )
                raise _Rollback
        except _Rollback:
            return custom, generic, without
        finally:
            await conn.close()

    return asyncio.run(run())


class _Rollback(Exception):
    pass


def test_the_claim_query_is_an_index_scan_with_200k_finished_rows(db_url: str) -> None:
    custom, generic, without = _claim_plan(db_url)
    for plan in (custom, generic):
        assert "outbox_due_idx" in plan, plan
        assert "Seq Scan on outbox" not in plan, plan
    assert "generation = $1" in generic
    assert "outbox_due_idx" not in without
    assert "Seq Scan on outbox" in without, without
    # The index survived (the DROP was rolled back).
    assert fetch_sync(db_url, "SELECT to_regclass('core.outbox_due_idx') IS NOT NULL")[0][0]
