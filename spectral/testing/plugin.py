"""The pytest plugin of :mod:`spectral.testing`, registered as the ``pytest11`` entry
point ``spectral``: installing the package makes its fixtures available.

Fixtures:
    spectral_server: (session, sync) the PostgreSQL server and a migrated template:
        ``SPECTRAL_TEST_DATABASE_URL`` when set, else an embedded server started once.
    spectral_db_url: (function, sync) a fresh database copied from the template, dropped
        after the test.
    spectral_db: (function, trio) that database as a :class:`~spectral.testing.TestDatabase`.

pytest-trio runs async fixtures in function scope only, so the session-wide server is a
sync fixture; nothing starts until a test asks for one of these fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ..db.scratch import ScratchServer
from ._database import TestDatabase, open_test_database


@pytest.fixture(scope="session")
def spectral_server() -> Iterator[ScratchServer]:
    """The session's PostgreSQL server and migrated template database."""
    server = ScratchServer()
    yield server
    server.close()


@pytest.fixture
def spectral_db_url(spectral_server: ScratchServer) -> Iterator[str]:
    """The URL of a fresh, migrated database for this test (dropped afterwards)."""
    url = spectral_server.fresh()
    yield url
    spectral_server.drop(url, wait=False)


@pytest.fixture
async def spectral_db(spectral_db_url: str) -> AsyncIterator[TestDatabase]:
    """A fresh, migrated database for this test, with trio-flavoured queries."""
    async with open_test_database(spectral_db_url) as db:
        yield db
