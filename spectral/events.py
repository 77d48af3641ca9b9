"""Events as handlers see them, and the producer-side checks on topics and payloads.

The same rules are enforced by ``core.publish`` and the outbox table's CHECK constraints,
so SQL producers and Python producers are held to one contract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .config import TOPIC_MAX_LENGTH, TOPIC_RE
from .errors import InvalidPayloadError, InvalidTopicError, PayloadTooLargeError

DEFAULT_MAX_PAYLOAD_BYTES = 262_144


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
    """

    id: int
    topic: str
    payload: dict[str, Any]
    generation: int
    attempt: int
    created_at: datetime
    handled_by: frozenset[str] = field(default=frozenset(), repr=False, compare=False)


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
