"""Generation stamping: only allocated, in-service generations are ever stamped."""

from __future__ import annotations

import pytest

import spectral
from spectral.db import Store

from ..pg import admin, query


async def test_publishing_to_an_unallocated_generation_is_refused(store: Store) -> None:
    await store.allocate_generation("v1", None, None)
    with pytest.raises(spectral.NoGenerationError) as info:
        await store.publish("a.b", "{}", generation=999)
    assert "not in core.deployments" in str(info.value)
    assert await store.fetchval("SELECT count(*) FROM core.outbox") == 0


def test_a_direct_insert_into_an_unallocated_generation_is_refused(db_url: str) -> None:
    admin(db_url, "INSERT INTO core.deployments (reference) VALUES ('v1')")
    with pytest.raises(Exception, match="outbox_generation_fkey"):
        admin(db_url, "INSERT INTO core.outbox (generation, topic, payload) VALUES (7, 'a.b', '{}')")
    assert query(db_url, "SELECT count(*) AS n FROM core.outbox")[0]["n"] == 0


def test_sql_producers_skip_retired_generations(db_url: str) -> None:
    admin(db_url, "INSERT INTO core.deployments (reference) VALUES ('v1'), ('v2')",
          "UPDATE core.deployments SET retired_at = now() WHERE generation = 2")
    assert query(db_url, "SELECT core.publish('a.b', '{}'::jsonb) AS id")[0]["id"] > 0
    assert query(db_url, "SELECT generation FROM core.outbox")[0]["generation"] == 1


async def test_the_producer_generation_comes_from_its_own_variable_only(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spectral.db.publish import _producer_generation

    await store.allocate_generation("v1", None, None)
    monkeypatch.setenv("SPECTRAL_GENERATION", "1")
    monkeypatch.setenv("SPECTRAL_CONCURRENCY", "not-a-number")  # unrelated and bad
    assert _producer_generation(None) == 1
    assert _producer_generation(5) == 5
    monkeypatch.setenv("SPECTRAL_GENERATION", "zero")
    with pytest.raises(spectral.ConfigurationError, match="SPECTRAL_GENERATION"):
        _producer_generation(None)
