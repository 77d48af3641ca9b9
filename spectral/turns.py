"""One turn: every pending handler of one claimed row, and the outcome to settle.

A turn runs inside a cancel scope bounded by HANDLER_MAX; each handler also by its own
timeout. Handlers of one row run one after another, each in its own transaction with its
own ledger row, so a retried row never re-runs a handler that already succeeded.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .actors._backoff import backoff_delay
from .app import App, HandlerSpec
from .db import ClaimedRow, Settlement, TurnTx
from .errors import AlreadyHandledError, ClaimLostError
from .events import Event
from .state import InFlight, RuntimeState
from .tx import Tx

log = logging.getLogger("spectral.turn")

#: Longest last_error stored on a row, in characters.
MAX_ERROR_LENGTH = 2000


class TurnStore(Protocol):
    async def open_turn(self, event_id: int, token: uuid.UUID, handler: str) -> TurnTx: ...


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed row runs again, and when it becomes DEAD."""

    max_attempts: int = 10
    base: float = 1.0  # seconds before the first retry
    cap: float = 600.0  # longest delay, seconds

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with equal jitter for the retry after ``attempt``."""
        return backoff_delay(attempt, self.base, self.cap, rng)

    def limit(self, handlers: list[HandlerSpec]) -> int:
        return min((h.max_attempts or self.max_attempts) for h in handlers)


@dataclass
class Outcome:
    """What a turn decided for its row; the claimer's settler writes it in a batch."""

    row: ClaimedRow
    kind: str  # "ack", "fail", "release" or "lost"
    ledger: list[tuple[str, int]] = field(default_factory=list)
    error: str | None = None
    dead: bool = False
    reason: str | None = None
    delay: float = 0.0
    charge: bool = False

    def add_to(self, batch: Settlement) -> None:
        batch.ledger.extend(self.ledger)
        r = self.row
        if self.kind == "ack":
            batch.ack.append((r.id, r.token))
        elif self.kind == "fail":
            batch.fail.append((r.id, r.token, self.delay, self.error or "", self.dead, self.reason))
        elif self.kind == "release":
            batch.release.append((r.id, r.token, self.charge, self.error))


def describe(exc: BaseException) -> str:
    """A failure as stored in last_error: the exception line and the innermost frames."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in reversed(frames))
    # PostgreSQL text cannot hold NUL: one in a message would fail the whole settle batch.
    text = f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")
    if where:
        text = f"{text} at {where}"
    return text[:MAX_ERROR_LENGTH]


class TurnRunner:
    """Runs turns for one worker process."""

    def __init__(
        self, app: App, store: TurnStore, state: RuntimeState, *, handler_max: float,
        policy: RetryPolicy, max_payload_bytes: int, rng: random.Random | None = None,
    ) -> None:
        self._app = app
        self._store = store
        self._state = state
        self._handler_max = handler_max
        self._policy = policy
        self._max_payload_bytes = max_payload_bytes
        self._rng = rng or random.Random()

    def _log(self, level: int, msg: str, row: ClaimedRow, **extra: object) -> None:
        log.log(level, msg, extra={"worker_id": self._state.worker_id,
                                   "generation": row.generation, "event_id": row.id,
                                   "topic": row.topic, **extra})

    async def run(self, row: ClaimedRow) -> Outcome:
        """Run the row's pending handlers and decide its outcome.

        Cancellation: a cancellation from outside (the drain deadline, or shutdown) rolls
        back the open transaction and propagates; the claimer then releases the row
        without charging an attempt.
        """
        handlers = self._app.handlers_for(row.topic)
        if not handlers:
            reason = f"no handler for topic {row.topic!r} in generation {row.generation}"
            self._log(logging.WARNING, "dead: no handler", row)
            return Outcome(row, "fail", error=reason, dead=True, reason="no handler")
        pending = [h for h in handlers if h.name not in row.handled]
        if not pending:
            return Outcome(row, "ack")
        attempt = row.attempts + 1
        limit = self._policy.limit(pending)
        if attempt > limit:
            # Reaped again and again: the turn kills its worker or outlives its claim.
            reason = f"exceeded {limit} attempts"
            self._log(logging.WARNING, "dead: attempts exhausted before running", row)
            return Outcome(row, "fail", error=f"{reason}; previous runs never acknowledged",
                           dead=True, reason=reason)
        event = Event(row.id, row.topic, row.payload, row.generation, attempt, row.created_at,
                      row.handled)
        ledger: list[tuple[str, int]] = []
        succeeded: set[str] = set()
        failures: list[tuple[HandlerSpec, str]] = []
        with trio.CancelScope(deadline=trio.current_time() + self._handler_max) as turn_scope:
            for spec in pending:
                failure = await self._run_handler(spec, event, row, ledger)
                if failure == "lost":
                    self._log(logging.WARNING, "claim lost during the turn; nothing applied",
                              row, handler=spec.name)
                    return Outcome(row, "lost", ledger=ledger)
                if failure is None:
                    succeeded.add(spec.name)
                else:
                    failures.append((spec, failure))
        if turn_scope.cancelled_caught:
            failed = {f[0].name for f in failures}
            for spec in pending:
                if spec.name not in succeeded and spec.name not in failed:
                    failures.append(
                        (spec, f"{spec.name}: exceeded SPECTRAL_HANDLER_MAX ({self._handler_max:g}s)")
                    )
        if not failures:
            self._log(logging.DEBUG, "ack", row)
            return Outcome(row, "ack", ledger=ledger)
        failed_specs = [f[0] for f in failures]
        error = "; ".join(f[1] for f in failures)[:MAX_ERROR_LENGTH]
        failed_limit = self._policy.limit(failed_specs)
        if attempt >= failed_limit:
            reason = f"failed {attempt} of {failed_limit} attempts"
            self._log(logging.WARNING, "dead", row, attempt=attempt, error=error)
            return Outcome(row, "fail", ledger=ledger, error=error, dead=True, reason=reason)
        delay = self._policy.delay(attempt, self._rng)
        self._log(logging.INFO, "retry", row, attempt=attempt, delay=round(delay, 3), error=error)
        return Outcome(row, "fail", ledger=ledger, error=error, delay=delay)

    async def _run_handler(
        self, spec: HandlerSpec, event: Event, row: ClaimedRow, ledger: list[tuple[str, int]]
    ) -> str | None:
        """Run one handler; returns None on success, 'lost', or a failure description.

        Successful handlers that opened no transaction are appended to ``ledger`` (their
        ledger rows are written with the acknowledgement).
        """
        turn = await self._store.open_turn(row.id, row.token, spec.name)
        tx = Tx(turn, self._state.generation, self._max_payload_bytes)
        key = (row.id, spec.name)
        self._state.in_flight[key] = InFlight(row.id, row.topic, spec.name, time.monotonic())
        try:
            if spec.timeout is None:
                # The turn's scope already bounds the handler at HANDLER_MAX; a second
                # deadline scope per turn would cost CPU and change nothing.
                await spec.fn(event, tx)
                timed_out = False
            else:
                with trio.move_on_after(spec.timeout) as handler_scope:
                    await spec.fn(event, tx)
                timed_out = handler_scope.cancelled_caught
            if timed_out:
                await self._rollback(turn, row, spec)
                return f"{spec.name}: timed out after {spec.timeout:g}s"
            if turn.opened:
                await turn.commit()
            else:
                ledger.append((spec.name, row.id))
            return None
        except AlreadyHandledError:
            await self._rollback(turn, row, spec)
            return None
        except ClaimLostError:
            await self._rollback(turn, row, spec)
            return "lost"
        except Exception as exc:
            await self._rollback(turn, row, spec)
            return f"{spec.name}: {describe(exc)}"
        except BaseException:
            # Cancellation, also when it arrives wrapped in an exception group (a handler
            # with a nursery): roll back, then let it propagate.
            await self._rollback(turn, row, spec)
            raise
        finally:
            self._state.in_flight.pop(key, None)

    async def _rollback(self, turn: TurnTx, row: ClaimedRow, spec: HandlerSpec) -> None:
        """Roll back, best effort: when the rollback itself fails the connection is broken
        and the driver discards it, so the server aborts the transaction anyway. Raising
        here would crash the worker over a turn whose outcome is already decided."""
        try:
            await turn.rollback()
        except Exception as exc:
            self._log(logging.WARNING, "rollback failed; the connection was discarded", row,
                      handler=spec.name, error=f"{type(exc).__name__}: {exc}")
