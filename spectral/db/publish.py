"""Publishing from producers' own transactions.

``publish`` is for asyncio code holding an asyncpg connection inside its own transaction;
``publish_trio`` is its twin for trio code (an asyncpg connection used through
trio-asyncio, or a handler's :class:`spectral.Tx`). Both check the topic and payload
before any I/O and let ``core.publish`` apply the same checks again in the database.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Protocol

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..errors import ConfigurationError
from ..rules import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    PublishExtras,
    check_topic,
    encode_payload,
    generation_number,
    publish_extras,
)
from . import _aio
from .store import hop


class _TxLike(Protocol):
    async def publish(
        self, topic: str, payload: dict[str, Any], *, available_at: datetime | None = None,
        generation: int | None = None, key: str | None = None,
        idempotency_key: str | None = None, traceparent: str | None = None,
    ) -> int: ...


def _producer_generation(explicit: int | None) -> int | None:
    if explicit is not None:
        return explicit
    # Only this variable is read: an unrelated bad SPECTRAL_* value must not stop publishing.
    raw = os.environ.get("SPECTRAL_GENERATION", "")
    try:
        return generation_number(raw)
    except ValueError as exc:  # worded like every settings error (spectral.config)
        raise ConfigurationError(f"SPECTRAL_GENERATION: {exc} (got {raw!r})") from None


def _checked(
    topic: str, payload: dict[str, Any], available_at: datetime | None, generation: int | None,
    max_payload_bytes: int, key: str | None, idempotency_key: str | None,
    traceparent: str | None,
) -> tuple[str, str, datetime | None, int | None, PublishExtras]:
    """A producer's event checked before any I/O, as ``_aio.publish`` takes it: topic,
    payload text, due time, generation (the variable's when none is given), extras."""
    text = encode_payload(payload, max_payload_bytes)
    check_topic(topic)
    extras = publish_extras(key, idempotency_key, traceparent)
    return topic, text, available_at, _producer_generation(generation), extras


async def publish(
    conn: Any,
    topic: str,
    payload: dict[str, Any],
    *,
    available_at: datetime | None = None,
    generation: int | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    key: str | None = None,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> int:
    """Write one event into the outbox in ``conn``'s current transaction (asyncio).

    Args:
        conn: an asyncpg connection, normally inside the caller's ``conn.transaction()``
            so the event commits (and wakes the workers) with the caller's own writes.
        topic: dot-separated segments of letters, digits, ``_`` and ``-``; 1-128 characters.
        payload: a JSON object (dict).
        available_at: do not run before this time (default: now, by the database clock).
        generation: the generation to stamp; default ``SPECTRAL_GENERATION`` when set,
            else the newest ``core.deployments`` generation.
        max_payload_bytes: the local pre-check; the database enforces its own cap too.
        key: the ordering key (1-256 characters, no control characters): events of one
            key are handled one at a time, in publish order (docs/how-to/ordering.md).
        idempotency_key: publishing again with the same topic and idempotency key
            returns the first event's id and inserts nothing, for as long as that
            event's row exists.
        traceparent: a W3C trace context to store with the event; default: the current
            OpenTelemetry span's, when ``opentelemetry-api`` is installed.

    Returns:
        The event id (the first event's id for a repeated idempotency key).

    Raises:
        InvalidTopicError, InvalidPayloadError, PayloadTooLargeError, InvalidKeyError,
            InvalidTraceparentError: bad input; nothing was written.
        NoGenerationError: no generation given and none allocated.
    """
    return await _aio.publish(conn, *_checked(
        topic, payload, available_at, generation, max_payload_bytes, key, idempotency_key,
        traceparent,
    ))


async def publish_trio(
    target: Any,
    topic: str,
    payload: dict[str, Any],
    *,
    available_at: datetime | None = None,
    generation: int | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    key: str | None = None,
    idempotency_key: str | None = None,
    traceparent: str | None = None,
) -> int:
    """The trio twin of :func:`publish`.

    ``target`` is a handler's :class:`spectral.Tx` (the event joins the turn's
    transaction) or an asyncpg connection driven through trio-asyncio.
    """
    if not isinstance(target, asyncpg.Connection | PoolConnectionProxy):
        tx: _TxLike = target
        return await tx.publish(topic, payload, available_at=available_at, generation=generation,
                                key=key, idempotency_key=idempotency_key,
                                traceparent=traceparent)
    return await hop(_aio.publish, target, *_checked(
        topic, payload, available_at, generation, max_payload_bytes, key, idempotency_key,
        traceparent,
    ))
