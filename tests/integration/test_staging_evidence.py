"""The staging gate reads the staging database on a read-only session."""

from __future__ import annotations

import pytest

from spectral.db import Store, _aio, asyncio_loop, hop, staging_pass
from spectral.errors import DatabaseError


async def test_the_newest_passed_staging_rollout_of_the_reference_is_the_evidence(
    store: Store, db_url: str
) -> None:
    await store.execute(
        "INSERT INTO core.rollouts (generation, target, environment, reference, status, verdict, checks)"
        " VALUES (1, 'process', 'staging', 'abc', 'success', 'SUCCESS', '[{\"result\": \"PASS\"}]'),"
        " (2, 'process', 'staging', 'abc', 'rolled_back', 'ROLLED_BACK', '[]'),"
        " (3, 'process', 'production', 'def', 'success', 'SUCCESS', '[]')")
    found = await staging_pass(db_url, "abc")
    assert found is not None and (found["generation"], found["checks"]) == (1, [{"result": "PASS"}])
    assert await staging_pass(db_url, "def") is None  # a production pass is no staging pass
    assert await staging_pass(db_url, "nope") is None


async def test_the_staging_session_cannot_write(store: Store, db_url: str) -> None:
    async with asyncio_loop():
        with pytest.raises(DatabaseError, match="read-only"):
            await hop(_aio.read_only_fetch, db_url,
                      "INSERT INTO core.settings (key, value) VALUES ('x', 'y') RETURNING key", ())
    assert await store.fetchval("SELECT count(*) FROM core.settings WHERE key = 'x'") == 0
