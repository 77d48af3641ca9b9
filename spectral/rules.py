"""Rules the whole runtime shares, below every other layer (it imports only Spectral's
errors and the optional tracing hooks).

- The publish contract: topics, ordering and idempotency keys, trace context and
  payloads, checked the same way by every producer path before any I/O (``core.publish``
  and the table's constraints enforce them again in the database).
- The backoff that the turn's retry delays, the reconnects and the user actors' restarts
  all follow.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from .errors import (
    InvalidKeyError,
    InvalidPayloadError,
    InvalidTopicError,
    InvalidTraceparentError,
    PayloadTooLargeError,
)
from .tracing import current_traceparent

#: Topics: dot-separated segments of letters, digits, ``_`` and ``-``; 1 to 128 characters.
TOPIC_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"
TOPIC_MAX_LENGTH = 128
# Python's "$" also matches before a trailing newline ("a.b\n" would pass); PostgreSQL's
# does not. "\Z" holds Python to the database's rule.
TOPIC_RE = re.compile(TOPIC_PATTERN.removesuffix("$") + r"\Z")

DEFAULT_MAX_PAYLOAD_BYTES = 262_144
#: Longest ordering key or idempotency key, in characters (core.publish checks the same).
KEY_MAX_LENGTH = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")




def generation_number(raw: str) -> int | None:
    """A generation as a variable holds it: blank is unset, else a whole number >= 1.

    Raises:
        ValueError: with the reason as a settings error states it.
    """
    if raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("is not a number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Equal-jitter exponential backoff: half the step fixed, half random, capped."""
    step = min(cap, base * (2.0 ** max(0, attempt - 1)))
    return float(step / 2 + rng.uniform(0, step / 2))


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
