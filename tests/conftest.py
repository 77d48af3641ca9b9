from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from spectral.db import Store, open_database

from .pg import Server


@pytest.fixture(scope="session")
def pg_server(spectral_server: Server) -> Server:
    """The session's server: the one spectral.testing's plugin starts for spectral_db."""
    return spectral_server


@pytest.fixture
def db_url(spectral_db_url: str) -> str:
    """A fresh, migrated database for this test (the plugin's; dropped afterwards)."""
    return spectral_db_url


@pytest.fixture
def empty_db_url(pg_server: Server) -> Iterator[str]:
    """A fresh database with no core schema."""
    url = pg_server.fresh(migrated=False)
    yield url
    pg_server.drop(url, wait=False)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    async with open_database(db_url, pool_size=4) as s:
        yield s
