"""Named SQL queries loaded from the package's ``sql/*.sql`` files.

A file holds blocks that start with ``-- name: NAME``; the comment lines under it are the
query's documentation. Queries are loaded once, by name, and a missing name fails at import.
"""

from __future__ import annotations

from importlib import resources

_NAME_PREFIX = "-- name:"


def _parse(text: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(_NAME_PREFIX):
            if name is not None:
                queries[name] = "\n".join(lines).strip()
            name = line[len(_NAME_PREFIX):].strip()
            lines = []
        elif name is not None and not line.startswith("--"):
            lines.append(line)
    if name is not None:
        queries[name] = "\n".join(lines).strip()
    return queries


def load(filename: str) -> dict[str, str]:
    """Return the named queries of ``sql/<filename>``."""
    text = resources.files("spectral.db").joinpath("sql", filename).read_text("utf-8")
    return _parse(text)


class Queries:
    """Attribute access to the named queries of one file; unknown names raise at once."""

    def __init__(self, filename: str) -> None:
        self._queries = load(filename)
        self._filename = filename

    def __getattr__(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in {self._filename}") from None


OUTBOX = Queries("outbox.sql")
PUBLISH = Queries("publish.sql")
DEPLOYMENTS = Queries("deployments.sql")
WORKERS = Queries("workers.sql")
MIGRATE = Queries("migrate.sql")
RECONCILE = Queries("reconcile.sql")
OBSERVE = Queries("observe.sql")
DASHBOARD = Queries("dashboard.sql")
TESTING = Queries("testing.sql")
PRUNE = Queries("prune.sql")
SWITCHES = Queries("switches.sql")
