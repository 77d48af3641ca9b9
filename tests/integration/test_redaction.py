"""A database password never reaches an error message, a log line or the CLI's output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from spectral import DatabaseUnavailableError, open_database
from spectral.db import asyncio_loop, migrate, redact, scrub
from spectral.db.urls import password_of
from spectral.errors import ConfigurationError
from spectral.logs import JsonFormatter, TextFormatter

SECRET = "s3cretpw"
SPECTRAL = [sys.executable, "-m", "spectral"]


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://app:s3cretpw@db:5432/orders", "postgresql://app:***@db:5432/orders"),
    ("postgres://app:s3cretpw@db/orders", "postgres://app:***@db/orders"),
    ("postgresql://app:s3c%40ret@db/orders", "postgresql://app:***@db/orders"),
    ("postgresql://:s3cretpw@db/orders", "postgresql://:***@db/orders"),
    ("postgresql://app@db/orders?password=s3cretpw", "postgresql://app@db/orders?password=***"),
    ("postgresql://app@db/orders?sslmode=require&PASSWORD=s3cretpw&application_name=x",
     "postgresql://app@db/orders?sslmode=require&PASSWORD=***&application_name=x"),
    ("postgresql://app:s3cretpw@db/orders?password=other",
     "postgresql://app:***@db/orders?password=***"),
    ("postgresql://app:s3cretpw@h1:5432,h2:5433/orders", "postgresql://app:***@h1:5432,h2:5433/orders"),
    ("postgresql:///orders?host=/run/postgresql&password=s3cretpw",
     "postgresql:///orders?host=/run/postgresql&password=***"),
    ("postgresql://app:p@ss@db/orders", "postgresql://app:***@db/orders"),
])
def test_redact_masks_the_password_and_keeps_the_rest(url: str, expected: str) -> None:
    assert redact(url) == expected


@pytest.mark.parametrize("url", [
    "postgresql://app@db:5432/orders",
    "postgresql://db/orders?sslmode=require",
    "postgresql://app:@db/orders",
    "postgresql:///orders?host=/var/run/postgresql",
])
def test_redact_leaves_a_url_without_a_password_alone(url: str) -> None:
    assert redact(url) == url


def test_scrub_masks_urls_and_given_secrets_anywhere_in_text() -> None:
    text = (
        "could not connect to postgresql://app:s3cretpw@db/orders (also tried "
        "postgres://u@h/x?sslmode=require&password=hunter2); token=tok-123"
    )
    scrubbed = scrub(text, "tok-123", "")
    assert "s3cretpw" not in scrubbed
    assert "hunter2" not in scrubbed
    assert "tok-123" not in scrubbed
    assert scrubbed.startswith("could not connect to postgresql://app:***@db/orders (also tried ")
    assert "postgres://u@h/x?sslmode=require&password=***" in scrubbed
    assert scrubbed.endswith("token=***")


def test_scrub_leaves_innocent_text_alone() -> None:
    text = "database unavailable: [Errno 111] Connect call failed ('127.0.0.1', 1)"
    assert scrub(text) == text


@pytest.mark.parametrize(("url", "password"), [
    ("postgresql://app:s3cretpw@db/orders", "s3cretpw"),
    ("postgresql://app@db/orders?password=s3cretpw", "s3cretpw"),
    ("postgresql://app@db/orders", None),
])
def test_password_of_finds_the_password_to_scrub(url: str, password: str | None) -> None:
    assert password_of(url) == password


def _messages(exc: BaseException) -> str:
    """Everything a user could see of ``exc``: str, repr, the formatted chain."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


@pytest.mark.parametrize("url", [
    f"postgresql://postgres:{SECRET}@127.0.0.1:1/x",
    f"postgresql://postgres@127.0.0.1:1/x?password={SECRET}",
])
async def test_a_refused_connection_error_does_not_contain_the_password(url: str) -> None:
    with pytest.raises(DatabaseUnavailableError) as info:
        async with open_database(url, pool_size=1):
            pass  # pragma: no cover - the connection is refused
    assert str(info.value).startswith("database unavailable: ")
    assert "\n" not in str(info.value)
    assert SECRET not in _messages(info.value)
    # The driver's exception is not chained (it could carry the DSN).
    assert info.value.__cause__ is None and info.value.__suppress_context__


async def test_open_database_errors_are_bare_exceptions_not_groups(db_url: str) -> None:
    # trio-asyncio's nurseries wrap errors in exception groups; open_database unwraps a
    # single one so ``except DatabaseUnavailableError`` (or the user's own) just works.
    with pytest.raises(KeyError, match="mine"):
        async with open_database(db_url, pool_size=1) as store:
            assert await store.fetchval("SELECT 1") == 1
            raise KeyError("mine")
    try:
        async with open_database("postgresql://postgres@127.0.0.1:1/x", pool_size=1):
            pass  # pragma: no cover - the connection is refused
    except DatabaseUnavailableError as exc:
        assert exc.__cause__ is None
    else:  # pragma: no cover
        raise AssertionError("the connection was not refused")


async def test_migrate_on_a_refused_connection_does_not_show_the_password() -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:1/x"
    async with asyncio_loop():
        with pytest.raises(DatabaseUnavailableError) as info:
            await migrate(url, 262_144)
    assert SECRET not in _messages(info.value)


def _with_password(url: str, database: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or "postgres"
    return urlunsplit((parts.scheme, f"{user}:{SECRET}@{host}", "/" + database, parts.query, ""))


async def test_a_missing_database_error_does_not_contain_the_password(db_url: str) -> None:
    # The server answers this time (trust auth ignores the password): it refuses the name.
    url = _with_password(db_url, "spectral_no_such_database")
    with pytest.raises(DatabaseUnavailableError) as info:
        async with open_database(url, pool_size=1):
            pass  # pragma: no cover - the database does not exist
    assert "spectral_no_such_database" in str(info.value)
    assert SECRET not in _messages(info.value)


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
def test_log_lines_are_scrubbed(formatter: type[TextFormatter | JsonFormatter]) -> None:
    fmt = formatter()
    fmt.secrets = ("tok-123",)
    record = logging.LogRecord(
        "spectral.test", logging.INFO, __file__, 1,
        "connecting to %s with token %s", (f"postgresql://app:{SECRET}@db/orders", "tok-123"), None,
    )
    line = fmt.format(record)
    assert "postgresql://app:***@db/orders" in line
    assert SECRET not in line
    assert "tok-123" not in line


@pytest.mark.parametrize("url", [
    f"mysql://root:{SECRET}@db/app",
    f"postgresql://postgres:{SECRET}@db:notaport/app",
    f"postgresql://postgres:{SECRET}@db:99999/app",
])
def test_a_malformed_database_url_is_refused_without_echoing_it(url: str) -> None:
    from spectral import Settings

    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={"DATABASE_URL": url})
    assert str(info.value).startswith("DATABASE_URL: ")
    assert SECRET not in _messages(info.value)


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_") and k != "DATABASE_URL"}
    return subprocess.run(
        [*SPECTRAL, *args], env={**base, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize(("args", "env"), [
    pytest.param(("--database-url", f"postgresql://postgres:{SECRET}@127.0.0.1:1/x"), {}, id="flag"),
    pytest.param((), {"SPECTRAL_DATABASE_URL": f"postgresql://postgres:{SECRET}@127.0.0.1:1/x"},
                 id="env"),
    pytest.param(("--log-format", "json", "--log-level", "DEBUG"),
                 {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:1/x?password={SECRET}"},
                 id="query-param-json-logs"),
    pytest.param(("--database-url", f"postgresql://postgres:{SECRET}@127.0.0.1:notaport/x"), {},
                 id="bad-port"),
])
def test_the_cli_reports_an_unreachable_database_in_one_line_without_the_password(
    args: tuple[str, ...], env: dict[str, str], tmp_path: Path
) -> None:
    result = _cli("migrate", *args, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert SECRET not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spectral: error:")
    assert "Traceback" not in result.stderr
