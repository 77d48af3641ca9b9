"""Translation of asyncpg and socket errors into Spectral's exceptions (the only place)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import asyncpg

from .. import errors
from .urls import scrub

P = ParamSpec("P")
T = TypeVar("T")

_HINTS: dict[str, type[errors.SpectralError]] = {
    "spectral:invalid_topic": errors.InvalidTopicError,
    "spectral:invalid_payload": errors.InvalidPayloadError,
    "spectral:payload_too_large": errors.PayloadTooLargeError,
    "spectral:no_generation": errors.NoGenerationError,
}

_CONSTRAINTS: dict[str, tuple[type[errors.SpectralError], str]] = {
    "outbox_topic_check": (errors.InvalidTopicError, "invalid topic: rejected by the outbox"),
    "outbox_payload_object_check": (
        errors.InvalidPayloadError, "invalid payload: must be a JSON object",
    ),
    "outbox_payload_size_check": (
        errors.PayloadTooLargeError, "payload too large: over the outbox's size cap",
    ),
    "outbox_generation_fkey": (
        errors.NoGenerationError,
        "unknown generation: it is not in core.deployments (allocate it first)",
    ),
}

_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.TooManyConnectionsError,
    # Raised when a pooled connection is released or reset while the server shuts down.
    asyncpg.exceptions.InternalClientError,
)


_MISSING_SCHEMA = (
    asyncpg.exceptions.UndefinedTableError,
    asyncpg.exceptions.InvalidSchemaNameError,
    asyncpg.exceptions.UndefinedFunctionError,
)


def translate(exc: BaseException) -> errors.SpectralError | None:
    """The Spectral error for a driver exception, or None when it is not a driver error."""
    if isinstance(exc, errors.SpectralError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        hint = getattr(exc, "hint", None) or ""
        message = scrub(str(getattr(exc, "message", "") or exc)).splitlines()[0]
        if hint in _HINTS:
            return _HINTS[hint](message)
        if "unsupported startup parameter" in message:
            # PgBouncer's refusal of a setting sent at connect: the URL reaches a pooler.
            return errors.ConfigurationError(
                f"{message}: the database URL reaches a connection pooler; set "
                "SPECTRAL_POOLER=session or SPECTRAL_POOLER=transaction (docs/how-to/poolers.md)"
            )
        constraint = getattr(exc, "constraint_name", None) or ""
        if constraint in _CONSTRAINTS:
            cls, text = _CONSTRAINTS[constraint]
            return cls(text)
        if isinstance(exc, _MISSING_SCHEMA):
            return errors.SchemaNotReadyError(
                f"the core schema is missing or out of date ({message}): run 'spectral migrate'"
            )
        if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
            return errors.DatabaseUnavailableError(f"database unavailable: {message}")
        if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
            return errors.DatabaseUnavailableError(f"database refused the login: {message}")
        if isinstance(exc, _UNAVAILABLE):
            return errors.DatabaseUnavailableError(f"database connection lost: {message}")
        return errors.DatabaseError(f"database error ({exc.sqlstate}): {message}")
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        # The server went away before the call: the connection is lost, not misused.
        return errors.DatabaseUnavailableError(f"database connection lost: {scrub(str(exc))}")
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, _UNAVAILABLE):
        return errors.DatabaseError(f"database client error: {scrub(str(exc))}")
    if isinstance(exc, _UNAVAILABLE):
        text = scrub(str(exc) or type(exc).__name__).splitlines()[0]
        return errors.DatabaseUnavailableError(f"database unavailable: {text}")
    return None


def translated(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorate an asyncio coroutine function so driver errors leave it translated."""

    @wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, *_UNAVAILABLE) as exc:
            mapped = translate(exc)
            assert mapped is not None
            raise mapped from None

    return wrapper
