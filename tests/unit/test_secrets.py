"""Secrets in settings never print, and the log scrubber knows every configured one."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import pytest

from spectral import logs
from spectral.config import Secret, Settings
from spectral.errors import ConfigurationError

PASSWORD = "pw-unit-5Gh7Jk"
LISTEN_PASSWORD = "pw-unit-listen-2Xc4"
TOKEN = "tok-unit-8Mn1Bv3Cx5Za"


def _settings(tmp_path: Path) -> Settings:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    url_file = tmp_path / "url"
    url_file.write_text(f"postgresql://app:{PASSWORD}@db:5432/orders\n")
    return Settings.load(environ={
        "SPECTRAL_DATABASE_URL_FILE": str(url_file),
        "SPECTRAL_LISTEN_DATABASE_URL": f"postgresql://app@db/orders?password={LISTEN_PASSWORD}",
        "SPECTRAL_DETAIL_TOKEN_FILE": str(token_file),
    })


def test_a_secret_never_prints_through_repr_str_or_format() -> None:
    secret = Secret(PASSWORD)
    percent = "%s %r" % (secret, secret)  # noqa: UP031 - logging formats with %
    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", percent, format(secret, ">40")]
    assert [PASSWORD in s for s in shown] == [False] * len(shown)
    assert secret.reveal() == PASSWORD
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_the_settings_repr_holds_no_secret(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    text = repr(settings) + str(settings)
    assert [s for s in (PASSWORD, LISTEN_PASSWORD, TOKEN) if s in text] == []
    token_setting = Settings.load(environ={"SPECTRAL_DETAIL_TOKEN": TOKEN})
    assert TOKEN not in repr(token_setting)


def test_the_database_url_file_is_read_at_load(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.database_url is not None
    assert settings.database_url.reveal() == f"postgresql://app:{PASSWORD}@db:5432/orders"


def test_the_scrubber_covers_every_configured_secret(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert sorted(settings.secrets()) == sorted((PASSWORD, LISTEN_PASSWORD, TOKEN))
    for fmt in ("text", "json"):
        logs.configure(fmt, "INFO", settings.secrets())
        handler = logging.getLogger("spectral").handlers[0]
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("spectral.test").warning(
            "leaked %s %s %s", PASSWORD, LISTEN_PASSWORD, TOKEN, extra={"token": TOKEN})
        line = stream.getvalue()
        assert "leaked" in line
        assert [s for s in (PASSWORD, LISTEN_PASSWORD, TOKEN) if s in line] == [], fmt


@pytest.mark.parametrize(("content", "message"), [
    (None, "SPECTRAL_DATABASE_URL_FILE: cannot read"),
    ("", "is empty"),
    (f"mysql://u:{PASSWORD}@h/db", "must start with postgresql://"),
])
def test_a_bad_database_url_file_is_one_line_without_the_url(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "url"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={"SPECTRAL_DATABASE_URL_FILE": str(path)})
    assert message in str(info.value)
    assert PASSWORD not in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_the_url_and_its_file_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "url"
    path.write_text("postgresql://u@h/db")
    with pytest.raises(ConfigurationError, match="give SPECTRAL_DATABASE_URL or SPECTRAL_DATABASE_URL_FILE"):
        Settings.load(environ={"SPECTRAL_DATABASE_URL_FILE": str(path),
                               "SPECTRAL_DATABASE_URL": "postgresql://u@h/db"})
