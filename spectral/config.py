"""Every setting Spectral reads, in one place.

Each setting is read from a ``SPECTRAL_*`` environment variable (the database URL also
from ``DATABASE_URL``) and can be overridden by the CLI flag of the same name. Values are
parsed and validated once, at start, into a frozen :class:`Settings`; a bad value is a
:class:`~spectral.errors.ConfigurationError` whose message is one line naming the variable.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError

# The topic rule lives with the rest of the publish contract (spectral.rules).
from .rules import TOPIC_MAX_LENGTH as TOPIC_MAX_LENGTH
from .rules import TOPIC_PATTERN as TOPIC_PATTERN
from .rules import TOPIC_RE as TOPIC_RE
from .rules import generation_number

ENVIRONMENTS = ("development", "test", "staging", "production")

#: The claim-safety rule (docs/explanation/adr/0002): a claim is taken from a worker only
#: when that worker can no longer be running it. The reaper takes claims whose TTL lapsed
#: (the TTL exceeds HANDLER_MAX + DRAIN_TIMEOUT + HEARTBEAT_INTERVAL, checked at start);
#: the reconciler takes the claims of a worker that exited, or wrote no heartbeat for
#: STALE_BEATS of its own intervals, while the worker fences itself after FENCE_BEATS.
STALE_BEATS = 2.0
FENCE_BEATS = 1.5


class Secret:
    """A secret setting (a password-bearing URL, a token) that never prints.

    ``repr``, ``str`` and ``format`` show ``***``; :meth:`reveal` returns the value, for
    the one place that hands it to the driver or compares it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:  # pickling would write the value out
        raise TypeError("a Secret cannot be pickled")


POOLERS = ("none", "session", "transaction")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


#: Longest duration a setting may hold, in seconds (about 31 years). Every duration ends
#: up in database time arithmetic (``now() + make_interval(secs => ...)``); far larger
#: values overflow PostgreSQL's timestamps and would fail every statement that uses them.
MAX_SECONDS = 1_000_000_000.0


def _seconds(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    if value > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS:.0f} seconds")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be one of true/false, yes/no, on/off, 1/0")


_generation = generation_number


def _environment(raw: str) -> str:
    if raw not in ENVIRONMENTS:
        raise ValueError(f"must be one of {', '.join(ENVIRONMENTS)}")
    return raw


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError("must be 'text' or 'json'")
    return raw


def _log_level(raw: str) -> str:
    upper = raw.upper()
    if upper not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return upper


def _url(raw: str) -> str | None:
    if raw.strip() == "":
        return None
    if not raw.startswith(("postgres://", "postgresql://")):
        raise ValueError("must start with postgresql:// or postgres://")
    # A bad port would otherwise surface later as a driver traceback. The messages here
    # never echo the URL: it may hold a password.
    try:
        hosts = urlsplit(raw).netloc.rpartition("@")[2]
        for host in hosts.split(","):  # libpq's multi-host form: h1:5432,h2:5433
            _ = urlsplit("//" + host).port  # raises on a non-numeric or out-of-range port
    except ValueError:
        raise ValueError("is not a valid URL (check the host and port)") from None
    return raw


def _secret_url(raw: str) -> Secret | None:
    value = _url(raw)
    return None if value is None else Secret(value)


def _optional_port(raw: str) -> int | None:
    return None if raw.strip() == "" else _port(raw)


def _pooler(raw: str) -> str:
    if raw not in POOLERS:
        raise ValueError(f"must be one of {', '.join(POOLERS)}")
    return raw


def _role(raw: str) -> str | None:
    if raw.strip() == "":
        return None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", raw):
        raise ValueError("must be a role name (letters, digits, _ and $; at most 63)")
    return raw


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _token(raw: str) -> Secret | None:
    value = raw.strip()
    if not value:
        return None
    if len(value) < 16:
        raise ValueError("must be at least 16 characters")
    return Secret(value)


def _optional_path(raw: str) -> Path | None:
    return Path(raw) if raw.strip() else None


def _retire_policy(raw: str) -> str:
    if raw not in ("adopt", "dead", "keep"):
        raise ValueError("must be adopt, dead or keep")
    return raw


def _reason(exc: ValueError) -> str:
    """A parser's message (ours never echo the value); int()/float()'s own become one line."""
    reason = str(exc)
    if "invalid literal" in reason or "could not convert" in reason:
        return "is not a number"
    return reason


def _setting(
    env: str,
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    *,
    also: tuple[str, ...] = (),
    secret: bool = False,
    flag: bool = True,
) -> Any:
    meta = {"env": env, "parse": parse, "help": help, "also": also, "secret": secret,
            "flag": flag}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Spectral's validated settings. Units are in each field's help."""

    database_url: Secret | None = _setting(
        "SPECTRAL_DATABASE_URL", None, _secret_url,
        "PostgreSQL URL; unset starts an embedded server under the data dir "
        "(the flag refuses a URL with a password: it would show in ps)",
        also=("DATABASE_URL",), secret=True,
    )
    database_url_file: Path | None = _setting(
        "SPECTRAL_DATABASE_URL_FILE", None, _optional_path,
        "file whose first line is the PostgreSQL URL (read at start; for URLs with a password)",
    )
    data_dir: Path = _setting(
        "SPECTRAL_DATA_DIR", Path(".spectral"), Path,
        "directory of the embedded PostgreSQL server's data",
    )
    generation: int | None = _setting(
        "SPECTRAL_GENERATION", None, _generation,
        "deployment generation this process runs and stamps (a core.deployments row)",
    )
    environment: str = _setting(
        "SPECTRAL_ENVIRONMENT", "development", _environment,
        "development, test, staging or production",
    )
    max_payload_bytes: int = _setting(
        "SPECTRAL_MAX_PAYLOAD_BYTES", 262_144, _positive_int,
        "largest event payload accepted, in bytes of JSON text (applied by migrate)",
    )
    concurrency: int = _setting(
        "SPECTRAL_CONCURRENCY", 100, _positive_int, "handler turns run at once per process",
    )
    pool_size: int = _setting(
        "SPECTRAL_POOL_SIZE", 20, _positive_int,
        "pooled database connections per process (handlers' transactions share them)",
    )
    batch_size: int = _setting(
        "SPECTRAL_BATCH_SIZE", 100, _positive_int, "rows claimed (and acknowledged) per query",
    )
    poll_interval: float = _setting(
        "SPECTRAL_POLL_INTERVAL", 1.0, _seconds, "seconds between polls, NOTIFY or not",
    )
    handler_max: float = _setting(
        "SPECTRAL_HANDLER_MAX", 60.0, _seconds, "seconds a handler turn may run (HANDLER_MAX)",
    )
    claim_ttl: float = _setting(
        "SPECTRAL_CLAIM_TTL", 300.0, _seconds,
        "seconds a claim lasts before the reaper may take the row back",
    )
    drain_timeout: float = _setting(
        "SPECTRAL_DRAIN_TIMEOUT", 20.0, _seconds,
        "seconds in-flight turns get after SIGTERM (keep below the SIGKILL window)",
    )
    heartbeat_interval: float = _setting(
        "SPECTRAL_HEARTBEAT_INTERVAL", 30.0, _seconds, "seconds between worker heartbeats",
    )
    reap_interval: float = _setting(
        "SPECTRAL_REAP_INTERVAL", 10.0, _seconds, "seconds between reaper passes",
    )
    reconnect_budget: float = _setting(
        "SPECTRAL_RECONNECT_BUDGET", 120.0, _seconds,
        "seconds a consumer keeps reconnecting before the process fails",
    )
    max_attempts: int = _setting(
        "SPECTRAL_MAX_ATTEMPTS", 10, _positive_int,
        "default attempts before an event becomes DEAD (per handler option overrides)",
    )
    retry_base: float = _setting(
        "SPECTRAL_RETRY_BASE", 1.0, _seconds, "first retry delay in seconds (doubles each attempt)",
    )
    retry_max: float = _setting(
        "SPECTRAL_RETRY_MAX", 600.0, _seconds, "longest retry delay in seconds",
    )
    reconcile_enabled: bool = _setting(
        "SPECTRAL_RECONCILE_ENABLED", True, _bool,
        "kill switch of the reconciler at start ('spectral reconcile on|off' overrides it live)",
    )
    reconcile_interval: float = _setting(
        "SPECTRAL_RECONCILE_INTERVAL", 30.0, _seconds,
        "seconds between reconcile passes (one pass per interval across all workers)",
    )
    reconcile_grace: float = _setting(
        "SPECTRAL_RECONCILE_GRACE", 120.0, _seconds,
        "seconds a row may wait before the reconciler calls it stuck",
    )
    reconcile_notify_unblock: bool = _setting(
        "SPECTRAL_RECONCILE_NOTIFY_UNBLOCK", False, _bool,
        "report every unblocked item at WARNING and through the app's on_unblock hook",
    )
    retire_policy: str = _setting(
        "SPECTRAL_RETIRE_POLICY", "adopt", _retire_policy,
        "what happens to a retired generation's PENDING rows: adopt, dead or keep",
    )
    retire_grace: float = _setting(
        "SPECTRAL_RETIRE_GRACE", 300.0, _seconds,
        "seconds after its last worker's beat (or the next deploy) before a generation retires",
    )
    listen_enabled: bool = _setting(
        "SPECTRAL_LISTEN_ENABLED", True, _bool,
        "kill switch of LISTEN/NOTIFY wake-ups (off: poll only)",
    )
    reaper_enabled: bool = _setting(
        "SPECTRAL_REAPER_ENABLED", True, _bool, "kill switch of the reaper",
    )
    prune_enabled: bool = _setting(
        "SPECTRAL_PRUNE_ENABLED", True, _bool,
        "kill switch of the pruner (retention of finished rows and old records)",
    )
    prune_interval: float = _setting(
        "SPECTRAL_PRUNE_INTERVAL", 60.0, _seconds,
        "seconds between prune passes (one pass at a time across all workers)",
    )
    prune_batch: int = _setting(
        "SPECTRAL_PRUNE_BATCH", 1000, _positive_int, "rows deleted per pruning statement",
    )
    retain_done: float = _setting(
        "SPECTRAL_RETAIN_DONE", 86_400.0, _seconds,
        "seconds a DONE row and its ledger rows are kept after the acknowledgement",
    )
    retain_dead: float = _setting(
        "SPECTRAL_RETAIN_DEAD", 1_209_600.0, _seconds,
        "seconds a DEAD row and its ledger rows are kept after it became DEAD (14 days)",
    )
    retain_workers: float = _setting(
        "SPECTRAL_RETAIN_WORKERS", 604_800.0, _seconds,
        "seconds an exited or lost worker's row is kept after its last beat (7 days)",
    )
    retain_records: float = _setting(
        "SPECTRAL_RETAIN_RECORDS", 2_592_000.0, _seconds,
        "seconds reconcile passes, prune passes and hand-overs are kept (30 days)",
    )
    worker_lost_after: float = _setting(
        "SPECTRAL_WORKER_LOST_AFTER", 3_600.0, _seconds,
        "seconds without a heartbeat before a stale worker is marked lost (its verdict ends)",
    )
    http_host: str = _setting(
        "SPECTRAL_HTTP_HOST", "127.0.0.1", str, "address the HTTP server binds",
    )
    http_port: int = _setting(
        "SPECTRAL_HTTP_PORT", 8080, _port, "HTTP port; 0 picks a free one (the log names it)",
    )
    detail_token: Secret | None = _setting(
        "SPECTRAL_DETAIL_TOKEN", None, _token,
        "bearer token for GET /version/detail; unset (and no token file) means 404 "
        "(no flag: use the variable or --detail-token-file)",
        secret=True, flag=False,
    )
    detail_token_file: Path | None = _setting(
        "SPECTRAL_DETAIL_TOKEN_FILE", None, _optional_path,
        "file holding the /version/detail token (read at start)",
    )
    ui_session_ttl: float = _setting(
        "SPECTRAL_UI_SESSION_TTL", 3600.0, _seconds,
        "seconds a dashboard (/ui) login lasts before the session expires",
    )
    version_file: Path = _setting(
        "SPECTRAL_VERSION_FILE", Path("/app/version.json"), Path,
        "version.json written at build time; missing: computed from the working tree",
    )
    log_format: str = _setting(
        "SPECTRAL_LOG_FORMAT", "text", _log_format, "log lines as 'text' or 'json'",
    )
    log_level: str = _setting(
        "SPECTRAL_LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR",
    )
    # --- least privilege, poolers and the operator endpoints (issue 13) ---------------
    pooler: str = _setting(
        "SPECTRAL_POOLER", "none", _pooler,
        "what SPECTRAL_DATABASE_URL reaches: none (PostgreSQL), session or transaction "
        "(a PgBouncer-style pooler in that mode)",
    )
    listen_database_url: Secret | None = _setting(
        "SPECTRAL_LISTEN_DATABASE_URL", None, _secret_url,
        "direct PostgreSQL URL for LISTEN when SPECTRAL_DATABASE_URL is a transaction pooler "
        "(unset there: poll only)",
        secret=True,
    )
    listen_database_url_file: Path | None = _setting(
        "SPECTRAL_LISTEN_DATABASE_URL_FILE", None, _optional_path,
        "file whose first line is SPECTRAL_LISTEN_DATABASE_URL (read at start)",
    )
    handler_role: str | None = _setting(
        "SPECTRAL_HANDLER_ROLE", None, _role,
        "role handlers' SQL runs as (SET LOCAL ROLE after Spectral's own statements); "
        "unset: the worker's role",
    )
    ops_host: str = _setting(
        "SPECTRAL_OPS_HOST", "127.0.0.1", str,
        "address of the separate /queue and /metrics listener (with SPECTRAL_OPS_PORT)",
    )
    ops_port: int | None = _setting(
        "SPECTRAL_OPS_PORT", None, _optional_port,
        "serve /queue and /metrics on this port only (0 picks one); unset: on the HTTP port",
    )
    ops_token_required: bool = _setting(
        "SPECTRAL_OPS_TOKEN_REQUIRED", False, _bool,
        "/queue and /metrics need the detail token as a bearer token",
    )

    #: The settings given by a variable or a flag (not defaults), filled by :meth:`load`.
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def given(self, name: str) -> bool:
        """Whether ``name`` was set by a variable or a flag rather than defaulted."""
        return name in self.explicit

    @property
    def payload_cap_to_apply(self) -> int | None:
        """The payload cap migrate writes: SPECTRAL_MAX_PAYLOAD_BYTES when given; None
        leaves the database's cap as it is (an operator's raised cap is kept)."""
        return self.max_payload_bytes if self.given("max_payload_bytes") else None

    def validate_runtime(self) -> None:
        """Check the settings that only matter to a running worker.

        Raises:
            ConfigurationError: a duration is out of range (also for settings built in
                code, which skip the parsers), or the claim TTL does not cover a turn, the
                drain and a missed heartbeat, so a live worker's rows could be reaped
                under it.
        """
        for f in self.fields():
            value = getattr(self, f.name)
            if f.metadata["parse"] is _seconds and not 0 < value <= MAX_SECONDS:
                raise ConfigurationError(
                    f"{f.metadata['env']}: must be a positive number of seconds, at most "
                    f"{MAX_SECONDS:.0f} (got {value!r})"
                )
        needed = self.handler_max + self.drain_timeout + self.heartbeat_interval
        if self.claim_ttl <= needed:
            raise ConfigurationError(
                f"SPECTRAL_CLAIM_TTL ({self.claim_ttl:g}s) must be larger than "
                f"SPECTRAL_HANDLER_MAX + SPECTRAL_DRAIN_TIMEOUT + SPECTRAL_HEARTBEAT_INTERVAL "
                f"({needed:g}s)"
            )
        if self.worker_lost_after <= self.heartbeat_stale_after:
            raise ConfigurationError(
                f"SPECTRAL_WORKER_LOST_AFTER ({self.worker_lost_after:g}s) must be larger than "
                f"two heartbeat intervals ({self.heartbeat_stale_after:g}s)"
            )
        if self.retry_base > self.retry_max:
            raise ConfigurationError("SPECTRAL_RETRY_BASE must not exceed SPECTRAL_RETRY_MAX")

    @property
    def heartbeat_stale_after(self) -> float:
        """Seconds without a heartbeat after which a worker counts as stale (2 beats): the
        reconciler then releases its claims."""
        return STALE_BEATS * self.heartbeat_interval

    @property
    def fence_after(self) -> float:
        """Seconds without a heartbeat written after which a worker fences itself: it
        stops claiming and cancels its turns, before the reconciler may take them."""
        return FENCE_BEATS * self.heartbeat_interval

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        """The settings (every field read from a variable), not the bookkeeping ones."""
        return tuple(f for f in dataclasses.fields(cls) if "env" in f.metadata)

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, str | None] | None = None,
    ) -> Settings:
        """Read settings from the environment, then apply CLI overrides (raw strings).

        Raises:
            ConfigurationError: a value does not parse; the message names the variable.
        """
        environ = os.environ if environ is None else environ
        overrides = overrides or {}
        values: dict[str, Any] = {}
        for f in cls.fields():
            meta = f.metadata
            raw: str | None = overrides.get(f.name)
            source = "--" + f.name.replace("_", "-")
            if raw is None:
                for name in (meta["env"], *meta["also"]):
                    if name in environ:
                        raw, source = environ[name], name
                        break
            if raw is None:
                continue
            try:
                values[f.name] = meta["parse"](raw)
            except ValueError as exc:
                shown = "<redacted>" if meta["secret"] else repr(raw)
                reason = _reason(exc)
                raise ConfigurationError(f"{source}: {reason} (got {shown})") from None
        for name in ("database_url", "listen_database_url"):
            path = values.get(name + "_file")
            if path is None:
                continue
            if name in values:
                variable = "SPECTRAL_" + name.upper()
                raise ConfigurationError(f"give {variable} or {variable}_FILE, not both")
            values[name] = _url_from_file(name, path)
        return cls(**values, explicit=frozenset(values))

    @classmethod
    def from_values(cls, values: Mapping[str, object], base: Settings | None = None) -> Settings:
        """``base`` (default: the defaults) with Python values for some settings, each
        checked by the same parser as its variable (``spectral.testing.running``).

        Raises:
            ConfigurationError: an unknown name or a bad value; the message names it.
        """
        known = {f.name: f for f in cls.fields()}
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            f = known.get(name)
            if f is None:
                raise ConfigurationError(
                    f"unknown setting {name!r} (the settings are: {', '.join(sorted(known))})"
                )
            if isinstance(value, bool) and f.type not in ("bool", bool):
                raise ConfigurationError(f"{name}: must not be a bool (got {value!r})")
            raw = "" if value is None else str(value)
            try:
                parsed[name] = f.metadata["parse"](raw)
            except ValueError as exc:
                reason = _reason(exc)
                shown = "<redacted>" if f.metadata["secret"] else repr(value)
                raise ConfigurationError(f"{name}: {reason} (got {shown})") from None
        base = base or cls()
        return dataclasses.replace(base, **parsed, explicit=base.explicit | frozenset(parsed))

    def secrets(self) -> tuple[str, ...]:
        """Every configured secret string, for the log and error scrubber: the URLs'
        passwords and the detail token (from the variable or its file)."""
        from .db.urls import password_of

        found: list[str] = []
        for url in (self.database_url, self.listen_database_url):
            if url is not None:
                password = password_of(url.reveal())
                if password:
                    found.append(password)
        try:
            token = self.resolved_detail_token()
        except ConfigurationError:
            token = None
        if token:
            found.append(token)
        return tuple(found)

    def resolved_detail_token(self) -> str | None:
        """The /version/detail token: the variable, else the token file's first line.

        Raises:
            ConfigurationError: the token file cannot be read or holds a short token.
        """
        if self.detail_token:
            return self.detail_token.reveal()
        if self.detail_token_file is None:
            return None
        try:
            text = self.detail_token_file.read_text("utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"SPECTRAL_DETAIL_TOKEN_FILE: cannot read {self.detail_token_file} ({exc.strerror})"
            ) from None
        try:
            token = _token(text)
        except ValueError as exc:
            raise ConfigurationError(f"SPECTRAL_DETAIL_TOKEN_FILE: the token {exc}") from None
        return None if token is None else token.reveal()

    def with_changes(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _url_from_file(name: str, path: Path) -> Secret | None:
    """The URL on the first line of ``path``; errors name the variable, never the URL."""
    variable = "SPECTRAL_" + name.upper() + "_FILE"
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(f"{variable}: cannot read {path} ({exc.strerror})") from None
    try:
        value = _secret_url(lines[0].strip() if lines else "")
    except ValueError as exc:
        raise ConfigurationError(f"{variable}: the URL in {path} {exc}") from None
    if value is None:
        raise ConfigurationError(f"{variable}: {path} is empty")
    return value
