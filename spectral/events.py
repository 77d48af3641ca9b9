"""Events as handlers see them, and the producer-side checks on topics and payloads.

The same rules are enforced by ``core.publish`` and the outbox table's CHECK constraints,
so SQL producers and Python producers are held to one contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .rules import DEFAULT_MAX_PAYLOAD_BYTES as DEFAULT_MAX_PAYLOAD_BYTES
from .rules import KEY_MAX_LENGTH as KEY_MAX_LENGTH
from .rules import NO_EXTRAS as NO_EXTRAS
from .rules import TRACEPARENT_RE as TRACEPARENT_RE
from .rules import PublishExtras as PublishExtras
from .rules import check_key as check_key
from .rules import check_topic as check_topic
from .rules import check_traceparent as check_traceparent
from .rules import encode_payload as encode_payload
from .rules import publish_extras as publish_extras


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


