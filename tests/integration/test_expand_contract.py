"""Expand/contract: a contract migration waits until older generations' workers are gone."""

from __future__ import annotations

import pytest

from spectral.db import Store, migrate, shipped
from spectral.db.migrate import Migration
from spectral.errors import MigrationError

CONTRACT = Migration(
    shipped()[-1].version + 1, "drop_legacy", "contract",
    "-- kind: contract\nALTER TABLE core.outbox DROP COLUMN IF EXISTS legacy_flag;",
)
EXPAND = Migration(
    shipped()[-1].version + 1, "add_legacy", "expand",
    "-- kind: expand\nALTER TABLE core.outbox ADD COLUMN IF NOT EXISTS legacy_flag boolean;",
)


async def _two_generations_with_an_old_live_worker(store: Store) -> None:
    await store.execute("INSERT INTO core.deployments (reference) VALUES ('v1'), ('v2')")
    await store.execute(
        "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid)"
        " VALUES ('old-worker', 1, 'test', 's', 'h', 1), ('new-worker', 2, 'test', 's', 'h', 2)"
    )


async def test_contract_migration_is_refused_while_an_older_generation_is_live(
    store: Store, db_url: str
) -> None:
    await _two_generations_with_an_old_live_worker(store)
    with pytest.raises(MigrationError) as info:
        await migrate(db_url, 262_144, migrations=[*shipped(), CONTRACT])
    message = str(info.value)
    assert "\n" not in message
    assert "contracts the schema" in message and "old-worker (gen 1)" in message
    assert await store.fetchval(
        "SELECT count(*) FROM core.schema_migrations WHERE name = 'drop_legacy'") == 0


async def test_contract_migration_applies_once_the_old_workers_exited(
    store: Store, db_url: str
) -> None:
    await _two_generations_with_an_old_live_worker(store)
    await store.execute("UPDATE core.workers SET state = 'exited' WHERE worker_id = 'old-worker'")
    report = await migrate(db_url, 262_144, migrations=[*shipped(), CONTRACT])
    assert [m.name for m in report.applied] == ["drop_legacy"]


async def test_a_stale_old_worker_does_not_block_a_contract(store: Store, db_url: str) -> None:
    await _two_generations_with_an_old_live_worker(store)
    await store.execute(
        "UPDATE core.workers SET last_seen = clock_timestamp() - interval '10 minutes'"
        " WHERE worker_id = 'old-worker'"
    )
    report = await migrate(db_url, 262_144, stale_after=60, migrations=[*shipped(), CONTRACT])
    assert [m.kind for m in report.applied] == ["contract"]


async def test_expand_migrations_apply_with_old_workers_live(store: Store, db_url: str) -> None:
    await _two_generations_with_an_old_live_worker(store)
    report = await migrate(db_url, 262_144, migrations=[*shipped(), EXPAND])
    assert [m.name for m in report.applied] == ["add_legacy"]
