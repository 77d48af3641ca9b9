"""Reconnecting with bounded exponential backoff and jitter, within a time budget."""

from __future__ import annotations

import logging
import random

import trio

from ..errors import DatabaseUnavailableError, ReconnectBudgetExhaustedError
from ..rules import backoff_delay
from ..state import RuntimeState

log = logging.getLogger("spectral.reconnect")


class Reconnector:
    """Tracks one consumer's connection failures.

    ``await failed(exc)`` marks the consumer down and sleeps the next backoff delay, or
    raises :class:`ReconnectBudgetExhaustedError` once failures have lasted longer than
    the budget; ``succeeded()`` marks it up again.
    """

    def __init__(
        self, name: str, state: RuntimeState, budget: float, *, base: float = 0.1,
        cap: float = 5.0, rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._state = state
        self._budget = budget
        self._base = base
        self._cap = cap
        self._rng = rng or random.Random()
        self._attempt = 0
        self._since: float | None = None

    async def failed(self, exc: DatabaseUnavailableError) -> None:
        now = trio.current_time()
        if self._since is None:
            self._since = now
            log.warning(
                "%s lost the database, reconnecting: %s", self.name, exc,
                extra={"consumer": self.name, "worker_id": self._state.worker_id},
            )
        self._state.consumer_down(self.name)
        if now - self._since > self._budget:
            raise ReconnectBudgetExhaustedError(
                f"{self.name} could not reach the database for {now - self._since:.0f}s "
                f"(SPECTRAL_RECONNECT_BUDGET={self._budget:g}s): {exc}"
            )
        self._attempt += 1
        await trio.sleep(backoff_delay(self._attempt, self._base, self._cap, self._rng))

    def succeeded(self) -> None:
        if self._since is not None:
            log.info(
                "%s reconnected after %d attempts", self.name, self._attempt,
                extra={"consumer": self.name, "worker_id": self._state.worker_id},
            )
        self._attempt = 0
        self._since = None
        self._state.consumer_up(self.name)
