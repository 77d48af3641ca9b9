"""One turn: every pending handler of one claimed row, and the outcome to settle.

A turn runs inside a cancel scope bounded by HANDLER_MAX; each handler also by its own
timeout. Handlers of one row run one after another, each in its own transaction with its
own ledger row, so a retried row never re-runs a handler that already succeeded.
"""

from __future__ import annotations

import enum
import logging
import random
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import trio

from . import tracing
from .app import App, HandlerSpec
from .db import Ack, ClaimedRow, Fail, Handled, Release, Settlement, TurnTx
from .errors import AlreadyHandledError
from .events import Event
from .rules import backoff_delay
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
        if len(handlers) == 1:  # the common case, once per turn
            return handlers[0].max_attempts or self.max_attempts
        return min((h.max_attempts or self.max_attempts) for h in handlers)


class OutcomeKind(enum.StrEnum):
    """What a turn decided for its row."""

    ACK = "ack"  # every pending handler succeeded: DONE
    FAIL = "fail"  # a handler failed: one attempt charged, retry later or DEAD
    RELEASE = "release"  # the turn was cut off by the worker (drain, shutdown, fence)
    LOST = "lost"  # the claim was gone: nothing to write


@dataclass
class Outcome:
    """What a turn decided for its row; the claimer's settler writes it in a batch."""

    row: ClaimedRow
    kind: OutcomeKind
    ledger: list[Handled] = field(default_factory=list)
    error: str | None = None
    dead: bool = False
    reason: str | None = None
    delay: float = 0.0
    charge: bool = False
    skip: bool = False  # DEAD with every failed handler's on_dead="skip": the key moves on

    def __post_init__(self) -> None:
        if type(self.kind) is not OutcomeKind:  # a plain string (tests, older callers)
            self.kind = OutcomeKind(self.kind)

    def add_to(self, batch: Settlement) -> None:
        r = self.row
        if self.kind is OutcomeKind.LOST:
            return  # the claim is gone: neither the row nor the ledger is ours to write
        batch.ledger.extend(self.ledger)
        if self.kind is OutcomeKind.ACK:
            batch.ack.append(Ack(r.id, r.token))
        elif self.kind is OutcomeKind.FAIL:
            batch.fail.append(Fail(r.id, r.token, self.delay, self.error or "", self.dead,
                                   self.reason, self.skip))
        else:
            batch.release.append(Release(r.id, r.token, self.charge, self.error))


class TurnProgress:
    """What a running turn has done so far; the claimer keeps it to settle a turn that
    was cut off (its successful handlers' ledger rows, its failures).

    A plain class with slots: one is built per turn (a dataclass's default factories
    cost more).
    """

    __slots__ = ("failures", "ledger", "pending", "succeeded")

    def __init__(self) -> None:
        self.ledger: list[Handled] = []
        self.failures: list[tuple[HandlerSpec | None, str]] = []  # None: Spectral's own
        self.pending: list[HandlerSpec] = []  # the handlers this turn runs
        self.succeeded: set[str] = set()  # names of those that succeeded


class _Result(enum.Enum):
    OK = "ok"
    LOST = "lost"
    FAILED = "failed"


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is trio's cancellation alone (also nested in exception groups).

    Only this unwinds a turn as cancelled. Anything else a handler raises — an Exception,
    ``SystemExit`` (``sys.exit()``), ``KeyboardInterrupt``, ``GeneratorExit``, or a group
    that mixes errors with cancellation — is the handler's failure.
    """
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_cancellation(e) for e in exc.exceptions)
    return False


def describe(exc: BaseException) -> str:
    """A failure as stored in last_error: the exception line and the innermost frames."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in reversed(frames))
    # PostgreSQL text cannot hold NUL: one in a message would fail the whole settle batch.
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        # The group's own message says little: name what it holds.
        text += " [" + "; ".join(f"{type(e).__name__}: {e}" for e in _leaves(exc)[:5]) + "]"
    text = text.replace("\x00", "\\x00")
    # Nor a lone surrogate, which cannot be encoded as UTF-8.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if where:
        text = f"{text} at {where}"
    return text[:MAX_ERROR_LENGTH]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


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

    @property
    def handler_max(self) -> float:
        """SPECTRAL_HANDLER_MAX: the longest a turn may run, in seconds."""
        return self._handler_max

    def _log(self, level: int, msg: str, row: ClaimedRow, **extra: object) -> None:
        log.log(level, msg, extra={"worker_id": self._state.worker_id,
                                   "generation": row.generation, "event_id": row.id,
                                   "topic": row.topic, **extra})

    async def run(self, row: ClaimedRow, progress: TurnProgress | None = None) -> Outcome:
        """Run the row's pending handlers and decide its outcome, within HANDLER_MAX.

        Args:
            row: the claimed row.
            progress: filled as handlers finish, so a turn cut off from outside can still
                be settled by :meth:`interrupted`.

        Cancellation: a cancellation from outside (the drain deadline, shutdown, or the
        worker's fence) rolls back the open transaction and propagates; the claimer then
        settles the row with :meth:`interrupted`. HANDLER_MAX is this turn's own cancel
        scope: reaching it fails the handlers that had not finished (:meth:`exceeded`).

        Error handling: whatever a handler raises, short of cancellation, fails the
        handler (one attempt charged); it never escapes the turn.
        """
        return await self._run(row, TurnProgress() if progress is None else progress, True)

    async def run_within(self, row: ClaimedRow, progress: TurnProgress) -> Outcome:
        """:meth:`run` for a caller that bounds the turn at HANDLER_MAX itself.

        The claimer's turn runners run many turns inside one cancel scope and enforce
        HANDLER_MAX with one watchdog (a cancel scope costs more than a no-op turn).

        Cancellation: every cancellation propagates, after the open transaction was rolled
        back; the caller settles the row with :meth:`exceeded` when its HANDLER_MAX bound
        cut the turn, else with :meth:`interrupted`.
        """
        return await self._run(row, progress, False)

    async def _run(self, row: ClaimedRow, progress: TurnProgress, bounded: bool) -> Outcome:
        handlers = self._app.handlers_for(row.topic)
        if not handlers:
            reason = f"no handler for topic {row.topic!r} in generation {row.generation}"
            self._log(logging.WARNING, "dead: no handler", row)
            return Outcome(row, OutcomeKind.FAIL, error=reason, dead=True, reason="no handler")
        handled = row.handled
        pending = [h for h in handlers if h.name not in handled] if handled else handlers
        if not pending:
            return Outcome(row, OutcomeKind.ACK)
        progress.pending = pending
        attempt = row.attempts + 1
        limit = self._policy.limit(pending)
        if attempt > limit:
            # Reaped again and again: the turn kills its worker or outlives its claim.
            reason = f"exceeded {limit} attempts"
            self._log(logging.WARNING, "dead: attempts exhausted before running", row)
            return Outcome(row, OutcomeKind.FAIL,
                           error=f"{reason}; previous runs never acknowledged",
                           dead=True, reason=reason)
        if not tracing.available() or (row.traceparent is None and not tracing.recording()):
            # No span, and no context manager to enter per turn: without OpenTelemetry, or
            # with only its API (a no-op span) and no producer's context to pass on. With
            # one, the API's no-op span still carries it to what the handler publishes.
            return await self._run_pending(row, pending, attempt, progress, bounded)
        with tracing.turn_span(event_id=row.id, topic=row.topic, key=row.key,
                               generation=row.generation, attempt=attempt,
                               traceparent=row.traceparent) as span:
            outcome = await self._run_pending(row, pending, attempt, progress, bounded)
            span.outcome("dead" if outcome.dead else outcome.kind.value)
        return outcome

    async def _run_pending(
        self, row: ClaimedRow, pending: list[HandlerSpec], attempt: int, progress: TurnProgress,
        bounded: bool,
    ) -> Outcome:
        event = Event(row.id, row.topic, row.payload, row.generation, attempt, row.created_at,
                      row.handled, row.key, row.traceparent)
        if bounded:
            with trio.CancelScope(deadline=trio.current_time() + self._handler_max) as turn_scope:
                lost = await self._run_each(row, pending, event, progress)
            if turn_scope.cancelled_caught:
                return self.exceeded(row, progress)
        else:
            lost = await self._run_each(row, pending, event, progress)
        if lost is not None:
            return lost
        if not progress.failures:
            if log.isEnabledFor(logging.DEBUG):
                self._log(logging.DEBUG, "ack", row)
            return Outcome(row, OutcomeKind.ACK, ledger=progress.ledger)
        return self._failed(row, progress.failures, progress.ledger)

    async def _run_each(
        self, row: ClaimedRow, pending: list[HandlerSpec], event: Event, progress: TurnProgress
    ) -> Outcome | None:
        """Run the handlers one after another; a LOST outcome if the claim was lost."""
        for spec in pending:
            result, message = await self._run_handler(spec, event, row, progress.ledger)
            if result is _Result.LOST:
                self._log(logging.WARNING, "claim lost during the turn; nothing applied",
                          row, handler=spec.name)
                return Outcome(row, OutcomeKind.LOST)
            if result is _Result.OK:
                progress.succeeded.add(spec.name)
            else:
                progress.failures.append((spec, message))
        return None

    def exceeded(self, row: ClaimedRow, progress: TurnProgress) -> Outcome:
        """The outcome of a turn cut off at HANDLER_MAX: every handler that had not
        finished fails (charged), the ones that succeeded keep their ledger rows."""
        failures = progress.failures
        failed = {f[0].name for f in failures if f[0] is not None}
        for spec in progress.pending:
            if spec.name not in progress.succeeded and spec.name not in failed:
                failures.append(
                    (spec, f"{spec.name}: exceeded SPECTRAL_HANDLER_MAX ({self._handler_max:g}s)")
                )
        if not failures:
            return Outcome(row, OutcomeKind.ACK, ledger=progress.ledger)
        return self._failed(row, failures, progress.ledger)

    def interrupted(self, row: ClaimedRow, progress: TurnProgress, why: str) -> Outcome:
        """The outcome of a turn cut off from outside (``why``): a release that costs no
        attempt and keeps the ledger rows of the handlers that succeeded, unless a handler
        had already failed, which is charged as usual."""
        if progress.failures:
            return self._failed(row, progress.failures, progress.ledger)
        return Outcome(row, OutcomeKind.RELEASE, ledger=progress.ledger, error=why)

    def crashed(self, row: ClaimedRow, progress: TurnProgress, exc: BaseException) -> Outcome:
        """The outcome of a turn that raised out of Spectral's own code (a bug): charged,
        so a row that triggers it ends DEAD instead of crash-looping its workers."""
        failures = [*progress.failures,
                    (None, f"turn failed inside Spectral: {describe(exc)}")]
        return self._failed(row, failures, progress.ledger)

    def _failed(
        self, row: ClaimedRow, failures: list[tuple[HandlerSpec | None, str]],
        ledger: list[Handled],
    ) -> Outcome:
        attempt = row.attempts + 1
        error = "; ".join(f[1] for f in failures)[:MAX_ERROR_LENGTH]
        specs = [f[0] for f in failures if f[0] is not None]
        failed_limit = self._policy.limit(specs) if specs else self._policy.max_attempts
        if attempt >= failed_limit:
            reason = f"failed {attempt} of {failed_limit} attempts"
            # The key moves on only when every handler that failed says so.
            skip = bool(specs) and all(s.on_dead == "skip" for s in specs)
            self._log(logging.WARNING, "dead", row, attempt=attempt, error=error)
            return Outcome(row, OutcomeKind.FAIL, ledger=ledger, error=error, dead=True,
                           reason=reason, skip=skip)
        delay = self._policy.delay(attempt, self._rng)
        self._log(logging.INFO, "retry", row, attempt=attempt, delay=round(delay, 3), error=error)
        return Outcome(row, OutcomeKind.FAIL, ledger=ledger, error=error, delay=delay)

    async def _run_handler(
        self, spec: HandlerSpec, event: Event, row: ClaimedRow, ledger: list[Handled]
    ) -> tuple[_Result, str]:
        """Run one handler; returns OK, LOST, or FAILED with a description.

        Successful handlers that opened no transaction are appended to ``ledger`` (their
        ledger rows are written with the row's settlement, fenced by its claim token).
        What the transaction went through decides, not what the handler did with the
        exceptions it saw: a swallowed failed statement still fails the handler, a
        swallowed lost claim is still lost.
        """
        turn = await self._store.open_turn(row.id, row.token, spec.name)
        tx = Tx(turn, self._state.generation, self._max_payload_bytes)
        key = (row.id, spec.name)
        self._state.in_flight[key] = InFlight(row.id, row.topic, spec.name, time.monotonic())
        try:
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
            except BaseException as exc:
                await self._rollback(turn, row, spec)
                if is_cancellation(exc):
                    raise
                if turn.lost:
                    return _Result.LOST, ""
                if isinstance(exc, AlreadyHandledError):
                    return _Result.OK, ""  # the ledger has it (or the handler says so)
                if not isinstance(exc, Exception):
                    self._log(logging.WARNING, f"handler raised {type(exc).__name__}: failing it",
                              row, handler=spec.name)
                return _Result.FAILED, f"{spec.name}: {describe(exc)}"
            if turn.lost:
                await self._rollback(turn, row, spec)
                return _Result.LOST, ""
            if turn.already_handled:
                return _Result.OK, ""
            if turn.failure is not None:
                await self._rollback(turn, row, spec)
                return _Result.FAILED, (
                    f"{spec.name}: returned after its transaction failed ({turn.failure}); "
                    "its writes were rolled back"
                )[:MAX_ERROR_LENGTH]
            if timed_out:
                await self._rollback(turn, row, spec)
                return _Result.FAILED, f"{spec.name}: timed out after {spec.timeout:g}s"
            if turn.opened:
                try:
                    await turn.commit()
                except Exception as exc:
                    return _Result.FAILED, f"{spec.name}: commit failed: {describe(exc)}"
            else:
                ledger.append(Handled(spec.name, row.id))
            return _Result.OK, ""
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
