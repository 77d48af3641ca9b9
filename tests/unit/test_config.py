"""Settings: every SPECTRAL_* variable, flags over environment, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from spectral.cli import _build_parser
from spectral.config import Secret, Settings
from spectral.errors import ConfigurationError

# One non-default value per setting, and what it must parse to.
EVERY_VARIABLE: dict[str, tuple[str, str, object]] = {
    "database_url": ("SPECTRAL_DATABASE_URL", "postgresql://u@db.example:6543/app",
                     Secret("postgresql://u@db.example:6543/app")),
    "database_url_file": ("SPECTRAL_DATABASE_URL_FILE", "", None),
    "data_dir": ("SPECTRAL_DATA_DIR", "/tmp/spectral-data", Path("/tmp/spectral-data")),
    "generation": ("SPECTRAL_GENERATION", "7", 7),
    "environment": ("SPECTRAL_ENVIRONMENT", "production", "production"),
    "max_payload_bytes": ("SPECTRAL_MAX_PAYLOAD_BYTES", "1000", 1000),
    "concurrency": ("SPECTRAL_CONCURRENCY", "3", 3),
    "pool_size": ("SPECTRAL_POOL_SIZE", "4", 4),
    "batch_size": ("SPECTRAL_BATCH_SIZE", "5", 5),
    "poll_interval": ("SPECTRAL_POLL_INTERVAL", "0.25", 0.25),
    "handler_max": ("SPECTRAL_HANDLER_MAX", "12.5", 12.5),
    "claim_ttl": ("SPECTRAL_CLAIM_TTL", "99", 99.0),
    "drain_timeout": ("SPECTRAL_DRAIN_TIMEOUT", "3", 3.0),
    "heartbeat_interval": ("SPECTRAL_HEARTBEAT_INTERVAL", "2", 2.0),
    "reap_interval": ("SPECTRAL_REAP_INTERVAL", "1.5", 1.5),
    "reconnect_budget": ("SPECTRAL_RECONNECT_BUDGET", "45", 45.0),
    "max_attempts": ("SPECTRAL_MAX_ATTEMPTS", "4", 4),
    "retry_base": ("SPECTRAL_RETRY_BASE", "0.5", 0.5),
    "retry_max": ("SPECTRAL_RETRY_MAX", "30", 30.0),
    "reconcile_enabled": ("SPECTRAL_RECONCILE_ENABLED", "off", False),
    "reconcile_interval": ("SPECTRAL_RECONCILE_INTERVAL", "7.5", 7.5),
    "reconcile_grace": ("SPECTRAL_RECONCILE_GRACE", "60", 60.0),
    "reconcile_notify_unblock": ("SPECTRAL_RECONCILE_NOTIFY_UNBLOCK", "yes", True),
    "retire_policy": ("SPECTRAL_RETIRE_POLICY", "dead", "dead"),
    "retire_grace": ("SPECTRAL_RETIRE_GRACE", "90", 90.0),
    "listen_enabled": ("SPECTRAL_LISTEN_ENABLED", "0", False),
    "reaper_enabled": ("SPECTRAL_REAPER_ENABLED", "False", False),
    "prune_enabled": ("SPECTRAL_PRUNE_ENABLED", "off", False),
    "prune_interval": ("SPECTRAL_PRUNE_INTERVAL", "15", 15.0),
    "prune_batch": ("SPECTRAL_PRUNE_BATCH", "250", 250),
    "retain_done": ("SPECTRAL_RETAIN_DONE", "3600", 3600.0),
    "retain_dead": ("SPECTRAL_RETAIN_DEAD", "604800", 604800.0),
    "retain_workers": ("SPECTRAL_RETAIN_WORKERS", "86400", 86400.0),
    "retain_records": ("SPECTRAL_RETAIN_RECORDS", "172800", 172800.0),
    "worker_lost_after": ("SPECTRAL_WORKER_LOST_AFTER", "900", 900.0),
    "http_host": ("SPECTRAL_HTTP_HOST", "0.0.0.0", "0.0.0.0"),
    "http_port": ("SPECTRAL_HTTP_PORT", "0", 0),
    "detail_token": ("SPECTRAL_DETAIL_TOKEN", "0123456789abcdef", Secret("0123456789abcdef")),
    "detail_token_file": ("SPECTRAL_DETAIL_TOKEN_FILE", "/run/secrets/token", Path("/run/secrets/token")),
    "version_file": ("SPECTRAL_VERSION_FILE", "/srv/version.json", Path("/srv/version.json")),
    "ui_session_ttl": ("SPECTRAL_UI_SESSION_TTL", "90", 90.0),
    "log_format": ("SPECTRAL_LOG_FORMAT", "json", "json"),
    "log_level": ("SPECTRAL_LOG_LEVEL", "debug", "DEBUG"),
    "pooler": ("SPECTRAL_POOLER", "transaction", "transaction"),
    "listen_database_url": ("SPECTRAL_LISTEN_DATABASE_URL", "postgresql://u@direct/app",
                            Secret("postgresql://u@direct/app")),
    "listen_database_url_file": ("SPECTRAL_LISTEN_DATABASE_URL_FILE", "", None),
    "handler_role": ("SPECTRAL_HANDLER_ROLE", "orders_handler", "orders_handler"),
    "ops_host": ("SPECTRAL_OPS_HOST", "10.0.0.5", "10.0.0.5"),
    "ops_port": ("SPECTRAL_OPS_PORT", "9100", 9100),
    "ops_token_required": ("SPECTRAL_OPS_TOKEN_REQUIRED", "true", True),
}


def test_the_table_above_covers_every_setting() -> None:
    fields = {f.name: f.metadata["env"] for f in Settings.fields()}
    table = {name: env for name, (env, _, _) in EVERY_VARIABLE.items()}
    assert fields == table, "a new setting needs a row in EVERY_VARIABLE (tests/unit/test_config.py)"


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    settings = Settings.load(environ={})
    assert settings == Settings()
    assert settings.database_url is None
    assert settings.generation is None
    assert settings.environment == "development"
    assert settings.max_payload_bytes == 262_144
    assert settings.claim_ttl == 300.0
    assert settings.log_level == "INFO"


def test_load_parses_every_variable() -> None:
    environ = {env: raw for env, raw, _ in EVERY_VARIABLE.values()}
    settings = Settings.load(environ=environ)
    for name, (_, _, expected) in EVERY_VARIABLE.items():
        assert getattr(settings, name) == expected, name


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECTRAL_BATCH_SIZE", "17")
    assert Settings.load().batch_size == 17


def test_database_url_is_also_read_from_DATABASE_URL() -> None:
    settings = Settings.load(environ={"DATABASE_URL": "postgres://u@h/db"})
    assert settings.database_url == Secret("postgres://u@h/db")


def test_SPECTRAL_DATABASE_URL_wins_over_DATABASE_URL() -> None:
    settings = Settings.load(environ={
        "DATABASE_URL": "postgres://u@other/db",
        "SPECTRAL_DATABASE_URL": "postgresql://u@mine/db",
    })
    assert settings.database_url == Secret("postgresql://u@mine/db")


@pytest.mark.parametrize(("env", "field"), [
    ("SPECTRAL_GENERATION", "generation"),
    ("SPECTRAL_DATABASE_URL", "database_url"),
])
def test_an_empty_optional_variable_means_unset(env: str, field: str) -> None:
    assert getattr(Settings.load(environ={env: ""}), field) is None


def test_flags_override_the_environment() -> None:
    environ = {"SPECTRAL_CONCURRENCY": "3", "SPECTRAL_CLAIM_TTL": "400", "SPECTRAL_POOL_SIZE": "9"}
    settings = Settings.load(
        environ=environ, overrides={"concurrency": "8", "claim_ttl": "500", "pool_size": None}
    )
    assert settings.concurrency == 8
    assert settings.claim_ttl == 500.0
    # A flag that was not given (None) leaves the environment's value.
    assert settings.pool_size == 9


def test_a_flag_overrides_DATABASE_URL_too() -> None:
    settings = Settings.load(
        environ={"DATABASE_URL": "postgres://u@env/db"},
        overrides={"database_url": "postgresql://u@flag/db"},
    )
    assert settings.database_url == Secret("postgresql://u@flag/db")


BAD_VALUES = [
    ("SPECTRAL_CONCURRENCY", "0"),
    ("SPECTRAL_CONCURRENCY", "-3"),
    ("SPECTRAL_CONCURRENCY", "many"),
    ("SPECTRAL_POOL_SIZE", "2.5"),
    ("SPECTRAL_BATCH_SIZE", ""),
    ("SPECTRAL_MAX_PAYLOAD_BYTES", "1e6"),
    ("SPECTRAL_MAX_ATTEMPTS", "0"),
    ("SPECTRAL_GENERATION", "0"),
    ("SPECTRAL_GENERATION", "latest"),
    ("SPECTRAL_POLL_INTERVAL", "0"),
    ("SPECTRAL_POLL_INTERVAL", "-1"),
    ("SPECTRAL_POLL_INTERVAL", "nan"),
    ("SPECTRAL_HANDLER_MAX", "inf"),
    ("SPECTRAL_CLAIM_TTL", "five minutes"),
    ("SPECTRAL_DRAIN_TIMEOUT", "0"),
    ("SPECTRAL_HEARTBEAT_INTERVAL", "-0.5"),
    ("SPECTRAL_REAP_INTERVAL", "soon"),
    ("SPECTRAL_RECONNECT_BUDGET", "0"),
    ("SPECTRAL_RETRY_BASE", "x"),
    ("SPECTRAL_RETRY_MAX", "-600"),
    ("SPECTRAL_ENVIRONMENT", "prod"),
    ("SPECTRAL_LOG_FORMAT", "xml"),
    ("SPECTRAL_LOG_LEVEL", "verbose"),
    ("SPECTRAL_HTTP_PORT", "65536"),
    ("SPECTRAL_LISTEN_ENABLED", "maybe"),
    ("SPECTRAL_RETIRE_POLICY", "drop"),
    ("SPECTRAL_DATABASE_URL", "postgresql://u@db:notaport/app"),
    ("SPECTRAL_DATABASE_URL", "postgresql://u@db:65536/app"),
    ("SPECTRAL_DATABASE_URL", "postgresql://u@h1:5432,h2:x/app"),
    ("SPECTRAL_DATABASE_URL", "mysql://root@localhost/app"),
    ("DATABASE_URL", "localhost:5432"),
]


@pytest.mark.parametrize(("env", "raw"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_variable(env: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={env: raw})
    message = str(info.value)
    assert message.startswith(f"{env}: ")
    assert "\n" not in message
    assert "Traceback" not in message
    # The ValueError that caused it is not chained into the traceback.
    assert info.value.__suppress_context__


def test_a_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigurationError, match=r"^--batch-size: .*'zero'"):
        Settings.load(environ={"SPECTRAL_BATCH_SIZE": "5"}, overrides={"batch_size": "zero"})


def test_a_non_number_is_reported_as_such() -> None:
    with pytest.raises(ConfigurationError, match=r"^SPECTRAL_CONCURRENCY: is not a number \(got 'ten'\)$"):
        Settings.load(environ={"SPECTRAL_CONCURRENCY": "ten"})


@pytest.mark.parametrize("url", [
    "postgresql://u:pw@db.example:6543/app?sslmode=require",
    "postgres://db/app",
    "postgresql://u@h1:5432,h2:5433/app",
    "postgresql://u@[::1]:5432/app",
    "postgresql:///app?host=/var/run/postgresql",
    "postgresql://postgres:@/postgres?host=/tmp/pg",
])
def test_database_urls_libpq_accepts_are_accepted(url: str) -> None:
    assert Settings.load(environ={"SPECTRAL_DATABASE_URL": url}).database_url == Secret(url)


def test_a_bad_database_url_is_not_echoed() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={"SPECTRAL_DATABASE_URL": "mysql://root:hunter2@db/app"})
    assert "hunter2" not in str(info.value)
    assert "<redacted>" in str(info.value)


def test_a_bad_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={"SPECTRAL_DETAIL_TOKEN": "tooshort"})
    assert str(info.value).startswith("SPECTRAL_DETAIL_TOKEN: ")
    assert "tooshort" not in str(info.value)


def test_the_first_bad_variable_is_reported_even_with_good_ones_around() -> None:
    with pytest.raises(ConfigurationError, match="^SPECTRAL_LOG_LEVEL"):
        Settings.load(environ={"SPECTRAL_CONCURRENCY": "4", "SPECTRAL_LOG_LEVEL": "loud"})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.concurrency = 1  # type: ignore[misc]
    changed = settings.with_changes(concurrency=1)
    assert (settings.concurrency, changed.concurrency) == (100, 1)


def test_the_defaults_pass_runtime_validation() -> None:
    assert Settings().validate_runtime() is None


@pytest.mark.parametrize("claim_ttl", [5.0, 9.0, 10.0])
def test_validate_runtime_refuses_a_claim_ttl_that_does_not_cover_a_turn(claim_ttl: float) -> None:
    # handler_max + drain_timeout + heartbeat_interval = 4 + 3 + 3 = 10 seconds.
    settings = Settings(handler_max=4, drain_timeout=3, heartbeat_interval=3, claim_ttl=claim_ttl)
    with pytest.raises(ConfigurationError) as info:
        settings.validate_runtime()
    message = str(info.value)
    assert "\n" not in message
    assert "SPECTRAL_CLAIM_TTL" in message
    assert "(10s)" in message


def test_validate_runtime_accepts_a_claim_ttl_just_above_the_sum() -> None:
    settings = Settings(handler_max=4, drain_timeout=3, heartbeat_interval=3, claim_ttl=10.001)
    assert settings.validate_runtime() is None


def test_validate_runtime_sees_values_loaded_from_the_environment() -> None:
    settings = Settings.load(environ={
        "SPECTRAL_HANDLER_MAX": "100", "SPECTRAL_DRAIN_TIMEOUT": "20",
        "SPECTRAL_HEARTBEAT_INTERVAL": "30", "SPECTRAL_CLAIM_TTL": "150",
    })
    with pytest.raises(ConfigurationError, match="SPECTRAL_CLAIM_TTL"):
        settings.validate_runtime()


def test_validate_runtime_refuses_a_retry_base_above_the_retry_max() -> None:
    with pytest.raises(ConfigurationError, match="SPECTRAL_RETRY_BASE"):
        Settings(retry_base=10, retry_max=5).validate_runtime()


def test_a_worker_counts_as_stale_after_two_missed_beats() -> None:
    assert Settings(heartbeat_interval=7).heartbeat_stale_after == 14


def test_every_setting_has_a_flag_whose_help_names_its_variable() -> None:
    parser = _build_parser()
    subparsers = next(
        a for a in parser._actions if a.dest == "command"  # argparse has no public API for this
    )
    run = subparsers.choices["run"]  # type: ignore[index]
    by_flag = {a.option_strings[0]: a.help or "" for a in run._actions if a.option_strings}
    for f in Settings.fields():
        flag = "--" + f.name.replace("_", "-")
        if not f.metadata["flag"]:  # a secret with no flag (it would show in ps): hidden, refused
            assert by_flag.get(flag) == argparse.SUPPRESS, flag
            continue
        assert flag in by_flag, flag
        assert f.metadata["env"] in by_flag[flag], flag
    assert "DATABASE_URL" in by_flag["--database-url"]


def test_flags_parsed_by_the_cli_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from spectral.cli import _load_settings

    monkeypatch.setenv("SPECTRAL_BATCH_SIZE", "11")
    monkeypatch.setenv("SPECTRAL_CONCURRENCY", "12")
    args = _build_parser().parse_args(["run", "--batch-size", "21"])
    settings = _load_settings(args)
    assert (settings.batch_size, settings.concurrency) == (21, 12)


@pytest.mark.parametrize("value", ["1e12", "1000000001"])
def test_a_duration_the_database_cannot_hold_is_refused_with_one_line(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^SPECTRAL_RETRY_MAX: must be at most 1000000000 seconds"):
        Settings.load({"SPECTRAL_RETRY_MAX": value})


def test_validate_runtime_refuses_an_out_of_range_duration_built_in_code() -> None:
    with pytest.raises(ConfigurationError, match=r"^SPECTRAL_CLAIM_TTL: must be a positive number"):
        Settings(claim_ttl=1e12).validate_runtime()


def test_the_fence_comes_before_the_reconciler_may_take_claims() -> None:
    settings = Settings(heartbeat_interval=30)
    assert (settings.fence_after, settings.heartbeat_stale_after) == (45.0, 60.0)
