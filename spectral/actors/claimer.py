"""The claimer: claims batches of due rows of its generation and runs their turns.

Claiming and acknowledging are batched, one bridge hop each: the claimer claims up to
``min(batch_size, free slots)`` rows per query, and a settler task writes the outcomes of
all turns that finished meanwhile in one transaction.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import NoReturn, Protocol

import trio
import trio.lowlevel

from ..db import ClaimedRow, Release, Settled, Settlement
from ..errors import DatabaseError, DatabaseUnavailableError
from ..state import RuntimeState
from ..turns import (
    MAX_ERROR_LENGTH,
    Outcome,
    OutcomeKind,
    TurnProgress,
    TurnRunner,
    is_cancellation,
)
from ._backoff import Reconnector

log = logging.getLogger("spectral.claimer")

#: Seconds the settler may spend, on cancellation, writing the cancelled turns' releases.
FLUSH_TIMEOUT = 4.0
#: Seconds the last acknowledgements may take while draining (below WATCHDOG_GRACE, 5 s).
SETTLE_AT_DRAIN_TIMEOUT = 4.0
#: The most outcomes one write of the settler takes, in claim batches.
SETTLE_BATCHES = 5
#: Longest pause between two checks of the worker's lease, in seconds.
FENCE_CHECK_INTERVAL = 1.0


class _Runner:
    """What the watchdog and the fence need to see of one turn runner."""

    __slots__ = ("cut", "row", "scope", "started")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None  # open while it runs rows
        self.row: ClaimedRow | None = None  # the row whose turn is in flight
        self.started = 0.0  # trio.current_time() when that turn started
        self.cut: str | None = None  # "handler_max" or "fence": why its scope was cancelled


class ClaimerStore(Protocol):
    async def claim(
        self, generation: int, limit: int, worker_id: str, ttl: float
    ) -> list[ClaimedRow]: ...

    async def settle(self, batch: Settlement) -> Settled: ...


class Claimer:
    """Claims rows of ``state.generation`` and runs up to ``concurrency`` turns at once.

    Drain: once ``state.draining`` is set it claims nothing more, lets running turns finish
    until ``state.drain_deadline``, cancels what still runs then (each such turn rolls back
    and releases its row without charging an attempt), settles every outcome and returns.

    Fence: when the worker row has not been written for ``fence_after`` seconds (the
    heartbeat is stuck or the database unreachable), the reconciler of another worker may
    soon count this one as gone and release its claims. Before that can happen the
    claimer stops claiming and cancels its running turns (their rows are released without
    an attempt charged when the database takes the write, else the reaper or reconciler
    recovers them); it claims again once the heartbeat is back.
    """

    def __init__(
        self, store: ClaimerStore, state: RuntimeState, turns: TurnRunner, *,
        concurrency: int, batch_size: int, claim_ttl: float, poll_interval: float,
        reconnect_budget: float, fence_after: float = math.inf,
    ) -> None:
        self._store = store
        self._state = state
        self._turns = turns
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._claim_ttl = claim_ttl
        self._poll_interval = poll_interval
        # Claimed rows whose turn has not finished (queued for a runner or running).
        self._claimed = 0
        self._reconnect_claim = Reconnector("claimer", state, reconnect_budget)
        self._reconnect_settle = Reconnector("settler", state, reconnect_budget)
        self._send, self._receive = trio.open_memory_channel[Outcome](math.inf)
        self._turn_nursery: trio.Nursery | None = None
        # Outcomes sent to the settler that it has not taken into a write yet: their rows
        # are still CLAIMED. Claiming stops while they reach one write's worth (see _free),
        # so claimed-but-unacknowledged rows stay bounded when the database acknowledges
        # slower than handlers finish: the turns in flight, one write waiting, one being
        # written (the batch being written no longer counts: the next claim overlaps it).
        self._unsettled = 0
        self._capacity = trio.Event()
        self._fence_after = fence_after
        self._fenced = False
        # Claimed rows wait here for a runner; runners wait in the parking lot for rows.
        self._queue: deque[ClaimedRow] = deque()
        self._idle = trio.lowlevel.ParkingLot()
        self._runners: list[_Runner] = []
        self._called = False  # a runner was woken (or started) and has not taken a row yet
        self._closing = False  # the drain: runners finish the queue, then return
        self._handler_max = turns.handler_max
        self._bound_idle = False  # the HANDLER_MAX watchdog waits for a turn to start
        self._turn_started = trio.Event()
        self._short = False  # the last claim found fewer due rows than it asked for

    @property
    def running(self) -> int:
        """Claimed rows whose turn has not finished (running, or queued for a runner)."""
        return self._claimed

    def _free(self) -> int:
        # Turns in flight stay within the concurrency; finished turns waiting for the
        # settler within what one write takes. Claiming goes on while they wait, so a
        # slow acknowledgement makes the next write larger instead of stalling claims.
        return min(self._concurrency - self._claimed,
                   self._batch_size * SETTLE_BATCHES - self._unsettled)

    async def run_once(self) -> int:
        """Claim one batch for the free slots and start its turns; returns rows claimed."""
        assert self._turn_nursery is not None, "run_once needs run() to provide a nursery"
        free = self._free()
        if free <= 0 or self._state.draining.is_set() or self._fenced:
            return 0
        limit = min(self._batch_size, free)
        rows = await self._store.claim(
            self._state.generation, limit, self._state.worker_id, self._claim_ttl
        )
        self._state.counters.claimed += len(rows)
        self._short = len(rows) < limit
        if rows:
            self._claimed += len(rows)
            self._queue.extend(rows)
            self._call_runner()
            log.debug("claimed %d rows", len(rows),
                      extra={"worker_id": self._state.worker_id, "generation": self._state.generation})
        return len(rows)

    # --- turn runners ------------------------------------------------------------------
    #
    # A trio task and a cancel scope per turn cost more than a no-op turn itself. So the
    # claimed rows go to a queue served by runner tasks (at most ``concurrency``, started
    # when first needed), each running rows one after another inside one cancel scope.
    # A runner that takes a row while more wait calls another runner first: if its turn
    # blocks (a handler awaiting I/O), that one takes the next row, and so on, so turns
    # that wait run concurrently as before, while turns that never wait run back to back
    # in one task. HANDLER_MAX is enforced by one watchdog (_bound_turns) that cancels a
    # runner's scope when its current turn has run too long; the fence cancels the scopes
    # of the runners with a turn in flight.

    def _call_runner(self) -> None:
        """Wake a parked runner, or start one, unless one is already on its way."""
        if self._called:
            return
        if self._idle:
            self._idle.unpark()
        elif len(self._runners) < self._concurrency:
            assert self._turn_nursery is not None
            runner = _Runner()
            self._runners.append(runner)
            self._turn_nursery.start_soon(self._serve, runner, name=f"turn-runner-{len(self._runners)}")
        else:
            return  # every runner is busy: the first one to finish its turn takes the next row
        self._called = True

    async def _serve(self, runner: _Runner) -> None:
        """One runner: take queued rows and run their turns until the drain ends."""
        while True:
            self._called = False
            if not self._queue:
                if self._closing:
                    return
                await self._idle.park()
                continue
            runner.cut = None
            with trio.CancelScope() as runner.scope:
                while self._queue and not runner.scope.cancel_called:
                    row = self._queue.popleft()
                    if self._queue:
                        self._call_runner()
                    if self._fenced:
                        self._finished()
                        self._hand_back(self._turns.interrupted(
                            row, TurnProgress(), "released: the worker lost its heartbeat"))
                        continue
                    await self._turn(runner, row)
            runner.scope = None

    async def _turn(self, runner: _Runner, row: ClaimedRow) -> None:
        started = runner.started = trio.current_time()
        runner.row = row
        if self._bound_idle:
            self._turn_started.set()
        progress = TurnProgress()
        try:
            outcome = await self._turns.run_within(row, progress)
        except BaseException as exc:
            if is_cancellation(exc):
                runner.row = None
                self._finished()
                if runner.cut == "handler_max":
                    self._settle_later(row, self._turns.exceeded(row, progress), started)
                else:
                    # Cut off from outside: the fence, the drain deadline or shutdown.
                    why = ("released: the worker lost its heartbeat" if runner.cut == "fence"
                           else "cancelled at the drain deadline")
                    self._hand_back(self._turns.interrupted(row, progress, why))
                raise
            # A bug in Spectral's turn code: charge the row (it ends DEAD rather than
            # crash-looping every worker) and keep serving.
            log.exception("turn failed inside Spectral", extra={
                "worker_id": self._state.worker_id, "event_id": row.id})
            outcome = self._turns.crashed(row, progress, exc)
        runner.row = None
        self._finished()
        self._settle_later(row, outcome, started)

    def _finished(self) -> None:
        self._claimed -= 1
        self._capacity.set()

    def _settle_later(self, row: ClaimedRow, outcome: Outcome, started: float) -> None:
        """Hand a finished turn's outcome to the settler and observe the turn."""
        if outcome.kind is OutcomeKind.LOST:
            self._state.counters.lost_claims += 1
        self._send.send_nowait(outcome)
        self._unsettled += 1
        if self._state.turn_observer is not None or self._state.topic_observer is not None:
            duration = trio.current_time() - started
            if self._state.turn_observer is not None:
                self._state.turn_observer(duration, row.wait_seconds + duration)
            if self._state.topic_observer is not None:
                self._state.topic_observer(row.topic, row.wait_seconds + duration)

    def _hand_back_queued(self, why: str) -> None:
        """Release the claimed rows no runner took (the drain deadline, shutdown)."""
        while self._queue:
            row = self._queue.popleft()
            self._finished()
            self._hand_back(self._turns.interrupted(row, TurnProgress(), why))

    async def _bound_turns(self) -> NoReturn:
        """Cancel the turns that run longer than HANDLER_MAX (the runners' watchdog).

        It sleeps until the earliest deadline of the turns in flight; a turn that started
        later has a later deadline, so no deadline is ever missed. With no turn in flight
        it waits for one to start.
        """
        while True:
            busy = [r for r in self._runners if r.row is not None]
            if not busy:
                self._bound_idle = True
                await self._turn_started.wait()
                self._turn_started = trio.Event()
                self._bound_idle = False
                continue
            await trio.sleep_until(min(r.started for r in busy) + self._handler_max)
            now = trio.current_time()
            for r in self._runners:
                if (r.row is not None and r.scope is not None and r.cut is None
                        and now >= r.started + self._handler_max):
                    r.cut = "handler_max"
                    r.scope.cancel()

    def _hand_back(self, outcome: Outcome) -> None:
        """Give a cut-off turn's row back through the settler."""
        row = outcome.row
        try:
            self._send.send_nowait(outcome)
            self._unsettled += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The settler's bounded flush is over: the reaper recovers the row.
            log.warning("turn cancelled; its row is left to the reaper",
                        extra={"worker_id": self._state.worker_id, "event_id": row.id})
            return
        log.warning("turn cut off (%s); row handed back", outcome.error or outcome.kind,
                    extra={"worker_id": self._state.worker_id, "event_id": row.id})

    async def _bound(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._bound_turns()

    async def _fence(self, scope: trio.CancelScope) -> None:
        """Stop claiming and cancel the running turns while the lease is too old."""
        with scope:
            await self._watch_lease()

    async def _watch_lease(self) -> None:
        check = min(FENCE_CHECK_INTERVAL, self._fence_after / 10)
        while True:
            await trio.sleep(check)
            age = self._state.lease_age()
            if age is not None and age > self._fence_after:
                if not self._fenced:
                    self._fenced = True
                    log.error("no heartbeat written for %.1fs: fencing this worker (claiming "
                              "paused, %d turns cancelled)", age,
                              sum(r.row is not None for r in self._runners),
                              extra={"worker_id": self._state.worker_id})
                for r in self._runners:
                    if r.row is not None and r.scope is not None and r.cut is None:
                        r.cut = "fence"
                        r.scope.cancel()
            elif self._fenced:
                self._fenced = False
                log.info("heartbeat written again: claiming resumes",
                         extra={"worker_id": self._state.worker_id})
                self._state.wake()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Claim and run turns until the drain, then finish and return.

        Args:
            task_status: started at once.

        Cancellation:
            Running turns are cancelled and release their rows (settled in a shielded,
            bounded flush when possible; otherwise the reaper recovers them).

        Error handling:
            A lost database is retried with backoff within the reconnect budget; other
            database errors are logged and the next poll runs on schedule.
        """
        async with trio.open_nursery() as outer:
            outer.start_soon(self._settler)
            fence = trio.CancelScope()
            if self._fence_after != math.inf:
                outer.start_soon(self._fence, fence)
            bound = trio.CancelScope()
            outer.start_soon(self._bound, bound)
            try:
                async with trio.open_nursery() as turns:
                    self._turn_nursery = turns
                    turns.start_soon(self._drain_deadline, turns.cancel_scope)
                    task_status.started()
                    try:
                        await self._claim_loop()
                    finally:
                        # The drain (or a cancellation): the runners finish the queue, then
                        # return instead of waiting for more rows.
                        self._closing = True
                        self._idle.unpark_all()
            finally:
                fence.cancel()
                bound.cancel()
                self._hand_back_queued("cancelled at the drain deadline")
                self._send.close()

    async def _drain_deadline(self, scope: trio.CancelScope) -> None:
        # The turns still running at the drain get until its deadline, then are cancelled.
        await self._state.draining.wait()
        scope.deadline = self._state.drain_deadline
        log.info("draining: %d turns in flight", self.running,
                 extra={"worker_id": self._state.worker_id, "generation": self._state.generation})

    async def _claim_loop(self) -> None:
        while not self._state.draining.is_set():
            if self._fenced:
                await self._state.wait_for_work(self._poll_interval)
                continue
            if self._free() <= 0:
                await self._wait_for_capacity()
                continue
            try:
                claimed = await self.run_once()
                self._reconnect_claim.succeeded()
            except DatabaseUnavailableError as exc:
                await self._reconnect_claim.failed(exc)
                continue
            except DatabaseError as exc:
                log.error("claim failed: %s", exc, extra={"worker_id": self._state.worker_id})
                claimed = 0
            if claimed == 0:
                # Nothing due now: wait for a NOTIFY, the drain or the next poll.
                self._state.counters.polls += 1
                await self._state.wait_for_work(self._poll_interval)
            elif self._short:
                # It took every due row it could: claiming again at once would find none
                # (a row published meanwhile has sent its NOTIFY, a key freed by a settle
                # wakes the claimer too), so wait as when idle, without counting a poll.
                await self._state.wait_for_work(self._poll_interval)
            else:
                await trio.lowlevel.checkpoint()

    async def _wait_for_capacity(self) -> None:
        # A turn ending or a batch settled frees capacity; bounded so the loop notices
        # the drain while everything is busy.
        with trio.move_on_after(self._poll_interval):
            await self._capacity.wait()
        self._capacity = trio.Event()

    async def _settler(self) -> None:
        """Write finished turns' outcomes in batches, one transaction per batch.

        Cancellation: the cancelled turns hand their rows back at this moment; their
        releases are written in a shielded flush bounded by FLUSH_TIMEOUT, then it re-raises.
        """
        async with self._receive:
            try:
                await self._settle_forever()
            except trio.Cancelled:
                with trio.CancelScope(shield=True) as flush:
                    flush.deadline = trio.current_time() + FLUSH_TIMEOUT
                    outcomes: list[Outcome] = []
                    with trio.move_on_after(FLUSH_TIMEOUT / 2):
                        async for outcome in self._receive:
                            outcomes.append(outcome)
                    batch = Settlement()
                    for outcome in outcomes:
                        outcome.add_to(batch)
                    if not self._state.abandoned:  # a simulated SIGKILL writes nothing
                        await self._settle(batch, outcomes)
                raise

    async def _settle_forever(self) -> None:
        while True:
            try:
                first = await self._receive.receive()
            except trio.EndOfChannel:
                return
            batch = Settlement()
            outcomes = [first]
            while len(outcomes) < self._batch_size * SETTLE_BATCHES:
                try:
                    outcomes.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for outcome in outcomes:
                outcome.add_to(batch)
            await self._settle(batch, outcomes)

    async def _settle(self, batch: Settlement, outcomes: list[Outcome]) -> None:
        # Taken into this write: the claimer may claim for these slots while it runs.
        self._unsettled -= len(outcomes)
        self._capacity.set()
        await self._write(batch, outcomes)

    async def _write(self, batch: Settlement, outcomes: list[Outcome]) -> None:
        if not len(batch):
            return
        draining = self._state.draining.is_set()
        # While draining, the last acknowledgements are shielded from the drain deadline
        # but bounded: a second signal or a dead database cannot hold the exit for long.
        with trio.CancelScope(shield=draining) as scope:
            if draining:
                # Below the drain watchdog's grace, so a slow database is not mistaken
                # for a turn stuck in blocking code.
                scope.deadline = trio.current_time() + SETTLE_AT_DRAIN_TIMEOUT
            try:
                settled = await self._settle_retrying(batch)
            except DatabaseError as exc:
                # Not a lost connection: the database refused a value of the batch. Settle
                # the outcomes one by one so the refused one cannot hold back the others.
                log.error("could not settle %d outcomes (%s): settling them one by one",
                          len(batch), exc, extra={"worker_id": self._state.worker_id})
                settled = await self._settle_each(batch)
        if scope.cancelled_caught:
            log.error("could not acknowledge %d rows before exiting; the reaper will recover them",
                      len(batch), extra={"worker_id": self._state.worker_id})
            return
        if any(o.row.key is not None and o.kind is not OutcomeKind.LOST for o in outcomes):
            # A settled keyed row may have freed its key's next event, which no NOTIFY
            # announces: claim again now rather than at the next poll.
            self._state.wake()
        c = self._state.counters
        c.acked += len(settled.acked)
        c.released += len(settled.released)
        for outcome in outcomes:
            if outcome.kind is OutcomeKind.FAIL and outcome.row.id in settled.failed:
                if outcome.dead:
                    c.dead += 1
                else:
                    c.retried += 1
        lost = settled.lost(batch)
        c.lost_claims += len(lost)
        for event_id in sorted(lost):
            log.warning("late acknowledgement ignored: the claim was lost",
                        extra={"worker_id": self._state.worker_id, "event_id": event_id})

    async def _settle_retrying(self, batch: Settlement) -> Settled:
        """Settle, retrying a lost connection within the reconnect budget.

        Raises:
            DatabaseError: the database refused the batch (retrying it would fail again).
        """
        while True:
            try:
                settled = await self._store.settle(batch)
            except DatabaseUnavailableError as exc:
                await self._reconnect_settle.failed(exc)
                continue
            self._reconnect_settle.succeeded()
            return settled

    async def _settle_each(self, batch: Settlement) -> Settled:
        """Settle row by row; a refused outcome becomes a charged release that records
        why, so the row is retried (and ends DEAD after its attempts) instead of waiting
        for its claim to lapse."""
        acked: set[int] = set()
        failed: set[int] = set()
        released: set[int] = set()
        for event_id in sorted(batch.ids()):
            one = batch.only(event_id)
            try:
                done = await self._settle_retrying(one)
            except DatabaseError as exc:
                error = f"the database refused this turn's outcome: {exc}"[:MAX_ERROR_LENGTH]
                log.error("outcome of event %d refused: %s", event_id, exc,
                          extra={"worker_id": self._state.worker_id, "event_id": event_id})
                try:
                    done = await self._settle_retrying(
                        Settlement(release=[Release(event_id, one.tokens()[event_id], True, error)]))
                except DatabaseError as again:
                    log.error("could not release event %d either (%s): the reaper will "
                              "recover it", event_id, again,
                              extra={"worker_id": self._state.worker_id, "event_id": event_id})
                    continue
            acked |= done.acked
            failed |= done.failed
            released |= done.released
        return Settled(acked, failed, released)
