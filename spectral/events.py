"""Events as handlers see them, and the producer-side checks on topics and payloads.

The same rules are enforced by ``core.publish`` and the outbox table's CHECK constraints,
so SQL producers and Python producers are held to one contract.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .config import TOPIC_MAX_LENGTH, TOPIC_RE
from .errors import (
    InvalidKeyError,
    InvalidPayloadError,
    InvalidTopicError,
    InvalidTraceparentError,
    PayloadTooLargeError,
)
from .tracing import current_traceparent

DEFAULT_MAX_PAYLOAD_BYTES = 262_144
#: Longest ordering key or idempotency key, in characters (core.publish checks the same).
KEY_MAX_LENGTH = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")


@dataclass(frozen=True)
class Event:
    """One outbox row, as a handler receives it.

    Attributes:
        id: the outbox row id (unique, increasing in commit-ish order).
        topic: the topic it was published on.
        payload: the JSON object published, as a dict.
        generation: the deployment generation that stamped it.
        attempt: 1 on the first run, 2 on the first retry, and so on.
        created_at: when it was published (database clock).
        key: the ordering key it was published with (None: unkeyed). Events of one key
            are handled one at a time, in publish order.
        traceparent: the W3C trace context stored at publish, or None.
    """

    id: int
    topic: str
    payload: dict[str, Any]
    generation: int
    attempt: int
    created_at: datetime
    handled_by: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    key: str | None = None
    traceparent: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class PublishExtras:
    """The optional parts of a publish, checked: see :func:`publish_extras`."""

    key: str | None = None
    idempotency_key: str | None = None
    traceparent: str | None = None


NO_EXTRAS = PublishExtras()


def check_key(key: object, what: str = "key") -> str | None:
    """Return ``key`` (None allowed) if it is a valid ordering or idempotency key.

    Raises:
        InvalidKeyError: not a string of 1-256 characters without control characters.
    """
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidKeyError(f"invalid {what}: must be a string, got {type(key).__name__}")
    if not 1 <= len(key) <= KEY_MAX_LENGTH or _CONTROL.search(key):
        raise InvalidKeyError(
            f"invalid {what}: use 1-{KEY_MAX_LENGTH} characters without control characters "
            f"(got {len(key)} characters)"
        )
    return key


def check_traceparent(value: object) -> str | None:
    """Return ``value`` (None allowed) if it is a W3C traceparent header value.

    Raises:
        InvalidTraceparentError: not of the form ``00-<32 hex>-<16 hex>-<2 hex>``.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not TRACEPARENT_RE.match(value):
        raise InvalidTraceparentError(
            "invalid traceparent: expected the W3C form 00-<32 hex>-<16 hex>-<2 hex>"
        )
    return value


def publish_extras(
    key: object = None, idempotency_key: object = None, traceparent: object = None
) -> PublishExtras:
    """Check a publish's optional parts; the trace context defaults to OpenTelemetry's
    current span when ``opentelemetry-api`` is installed.

    Raises:
        InvalidKeyError, InvalidTraceparentError: bad input.
    """
    checked = check_traceparent(traceparent)
    return PublishExtras(
        check_key(key), check_key(idempotency_key, "idempotency key"),
        checked if checked is not None else current_traceparent(),
    )


def check_topic(topic: object) -> str:
    """Return ``topic`` if it is valid.

    Raises:
        InvalidTopicError: not a string of 1-128 characters made of dot-separated segments
            of letters, digits, ``_`` and ``-``.
    """
    if not isinstance(topic, str):
        raise InvalidTopicError(f"invalid topic: must be a string, got {type(topic).__name__}")
    if not 1 <= len(topic) <= TOPIC_MAX_LENGTH or not TOPIC_RE.match(topic):
        shown = topic if len(topic) <= 80 else topic[:77] + "..."
        raise InvalidTopicError(
            f"invalid topic {shown!r}: use 1-{TOPIC_MAX_LENGTH} characters, dot-separated "
            "segments of letters, digits, _ and -"
        )
    return topic


def encode_payload(payload: object, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Return the payload as JSON text after checking it.

    The database stores it as jsonb and measures its canonical text, which can be a little
    longer than this compact encoding; the database's own check is authoritative.

    Raises:
        InvalidPayloadError: not a dict, or not JSON-serialisable (NaN included).
        PayloadTooLargeError: its JSON text is over ``max_bytes``.
    """
    if not isinstance(payload, dict):
        raise InvalidPayloadError(
            f"invalid payload: must be a JSON object (dict), got {type(payload).__name__}"
        )
    try:
        text = json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidPayloadError(f"invalid payload: not JSON-serialisable ({exc})") from None
    if "\\u0000" in text:
        raise InvalidPayloadError("invalid payload: PostgreSQL jsonb cannot store \\u0000")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise PayloadTooLargeError(
            f"payload too large: {size} bytes of JSON, the cap is {max_bytes} bytes"
        )
    return text
