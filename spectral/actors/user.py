"""What a user's long-running actor (``@app.actor``) is given: its :class:`ActorContext`.

The actor's supervision (restarts with backoff) lives in :mod:`spectral.actors.supervisor`;
this module imports nothing above the app's layer, so ``App`` can name the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import trio

from ..events import NO_EXTRAS, PublishExtras, check_topic, encode_payload, publish_extras


class ActorStore(Protocol):
    async def publish(
        self, topic: str, payload_json: str, *, available_at: datetime | None = None,
        generation: int | None = None, extras: PublishExtras = NO_EXTRAS,
    ) -> int: ...

    async def execute(self, sql: str, *args: Any) -> str: ...


@dataclass
class ActorContext:
    """What a user actor gets: its name, the worker's identity, publishing, the drain."""

    name: str
    worker_id: str
    generation: int
    draining: trio.Event
    _store: ActorStore
    _max_payload_bytes: int

    async def publish(
        self, topic: str, payload: dict[str, Any], *, available_at: datetime | None = None,
        key: str | None = None, idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> int:
        """Publish an event in its own transaction, stamped with this worker's generation.

        ``key``, ``idempotency_key`` and ``traceparent`` are as for :func:`spectral.publish`.
        """
        text = encode_payload(payload, self._max_payload_bytes)
        check_topic(topic)
        extras = publish_extras(key, idempotency_key, traceparent)
        return await self._store.publish(
            topic, text, available_at=available_at, generation=self.generation, extras=extras
        )


    async def execute(self, sql: str, *args: Any) -> str:
        """Run one statement in its own transaction; returns its status tag."""
        return await self._store.execute(sql, *args)
