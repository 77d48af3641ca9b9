"""Login roles for the least-privilege tests.

Roles are cluster-wide and the test server is shared: each test creates its own uniquely
named LOGIN roles, grants them Spectral's group roles, and drops them afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .acceptance.workload import EFFECTS_DDL
from .pg import admin


def as_user(url: str, user: str) -> str:
    """``url`` with its user replaced (no password: the test server trusts loopback)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Roles:
    producer: str  # login role granted spectral_producer
    worker: str  # login role granted spectral_worker and the handler role
    reader: str  # login role granted spectral_reader
    handler: str  # NOLOGIN role handlers' SQL runs as: writes effects, may publish

    def url(self, db_url: str, login: str) -> str:
        return as_user(db_url, login)


@contextmanager
def login_roles(db_url: str) -> Iterator[Roles]:
    """Create the roles (and the effects table) in ``db_url``'s database; drop them after."""
    prefix = f"spectral_t{uuid.uuid4().hex[:10]}"
    roles = Roles(f"{prefix}_producer", f"{prefix}_worker", f"{prefix}_reader", f"{prefix}_handler")
    admin(
        db_url,
        EFFECTS_DDL,
        f"CREATE ROLE {roles.producer} LOGIN IN ROLE spectral_producer",
        f"CREATE ROLE {roles.reader} LOGIN IN ROLE spectral_reader",
        f"CREATE ROLE {roles.handler} NOLOGIN IN ROLE spectral_producer",
        f"CREATE ROLE {roles.worker} LOGIN IN ROLE spectral_worker, {roles.handler}",
        f"GRANT SELECT, INSERT ON effects TO {roles.handler}",
    )
    try:
        yield roles
    finally:
        names = ", ".join((roles.producer, roles.worker, roles.reader, roles.handler))
        admin(
            db_url,
            # Their sessions first (this test's database only), then their privileges here.
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = current_database() AND usename IN ({_quoted(roles)})",
            f"DROP OWNED BY {names}",
            f"DROP ROLE {names}",
        )


def _quoted(roles: Roles) -> str:
    return ", ".join(f"'{r}'" for r in (roles.producer, roles.worker, roles.reader, roles.handler))
