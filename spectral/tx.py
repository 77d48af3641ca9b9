"""``Tx``: a handler's trio-flavoured handle on its turn's own transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from .db import TurnTx
from .events import check_topic, encode_payload, publish_extras


class Tx:
    """The transaction of one handler's turn.

    The transaction opens on the first call. It commits after the handler returns,
    together with the ``core.event_handled`` row that records the handler ran, or rolls
    back if the handler raises or runs out of time: the handler's database effects happen
    exactly once. A handler that never uses ``tx`` opens no transaction.
    """

    def __init__(self, turn: TurnTx, generation: int, max_payload_bytes: int) -> None:
        self._turn = turn
        self._generation = generation
        self._max_payload_bytes = max_payload_bytes

    async def execute(self, sql: str, *args: Any) -> str:
        """Run a statement; returns its status tag (e.g. ``'INSERT 0 1'``)."""
        return str(await self._turn.query("execute", sql, args))

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        """Run a statement once per argument tuple."""
        await self._turn.query("executemany", sql, list(args))

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Rows as read-only mappings (``row["column"]``)."""
        return list(await self._turn.query("fetch", sql, args))

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """The first row, or None."""
        return await self._turn.query("fetchrow", sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        return await self._turn.query("fetchval", sql, args)

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        available_at: datetime | None = None,
        generation: int | None = None,
        key: str | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> int:
        """Publish a follow-up event in this transaction (default: this worker's generation).

        ``key``, ``idempotency_key`` and ``traceparent`` are as for :func:`spectral.publish`
        (the trace context defaults to the turn's span when OpenTelemetry is installed).
        """
        text = encode_payload(payload, self._max_payload_bytes)
        check_topic(topic)
        extras = publish_extras(key, idempotency_key, traceparent)
        return await self._turn.publish(
            topic, text, available_at, self._generation if generation is None else generation,
            extras,
        )
