"""The claimer: claims batches of due rows of its generation and runs their turns.

Claiming and acknowledging are batched, one bridge hop each: the claimer claims up to
``min(batch_size, free slots)`` rows per query, and a settler task writes the outcomes of
all turns that finished meanwhile in one transaction.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import trio
import trio.lowlevel

from ..db import ClaimedRow, Settled, Settlement
from ..errors import DatabaseError, DatabaseUnavailableError
from ..state import RuntimeState
from ..turns import Outcome, TurnRunner
from ._backoff import Reconnector

log = logging.getLogger("spectral.claimer")

#: Seconds the settler may spend, on cancellation, writing the cancelled turns' releases.
FLUSH_TIMEOUT = 4.0
#: Seconds the last acknowledgements may take while draining (below WATCHDOG_GRACE, 5 s).
SETTLE_AT_DRAIN_TIMEOUT = 4.0


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
    """

    def __init__(
        self, store: ClaimerStore, state: RuntimeState, turns: TurnRunner, *,
        concurrency: int, batch_size: int, claim_ttl: float, poll_interval: float,
        reconnect_budget: float,
    ) -> None:
        self._store = store
        self._state = state
        self._turns = turns
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._claim_ttl = claim_ttl
        self._poll_interval = poll_interval
        self._slots = trio.Semaphore(concurrency)
        self._reconnect_claim = Reconnector("claimer", state, reconnect_budget)
        self._reconnect_settle = Reconnector("settler", state, reconnect_budget)
        self._send, self._receive = trio.open_memory_channel[Outcome](math.inf)
        self._turn_nursery: trio.Nursery | None = None
        # Outcomes sent to the settler and not yet written: their rows are still CLAIMED.
        # They count against the concurrency so claimed-but-unacknowledged rows stay
        # bounded when the database acknowledges slower than handlers finish.
        self._unsettled = 0
        self._capacity = trio.Event()

    @property
    def running(self) -> int:
        return self._concurrency - self._slots.value

    def _free(self) -> int:
        return self._slots.value - self._unsettled

    async def run_once(self) -> int:
        """Claim one batch for the free slots and start its turns; returns rows claimed."""
        assert self._turn_nursery is not None, "run_once needs run() to provide a nursery"
        free = self._free()
        if free <= 0 or self._state.draining.is_set():
            return 0
        limit = min(self._batch_size, free)
        rows = await self._store.claim(
            self._state.generation, limit, self._state.worker_id, self._claim_ttl
        )
        self._state.counters.claimed += len(rows)
        for row in rows:
            self._slots.acquire_nowait()
            self._turn_nursery.start_soon(self._turn, row, name=f"turn-{row.id}")
        if rows:
            log.debug("claimed %d rows", len(rows),
                      extra={"worker_id": self._state.worker_id, "generation": self._state.generation})
        return len(rows)

    async def _turn(self, row: ClaimedRow) -> None:
        started = trio.current_time()
        try:
            outcome = await self._turns.run(row)
        except BaseException:
            # The drain deadline (or shutdown) cut this turn off (a Cancelled, possibly in
            # an exception group): give the row back now.
            try:
                self._send.send_nowait(
                    Outcome(row, "release", error="cancelled at the drain deadline")
                )
                self._unsettled += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The settler's bounded flush is over: the reaper recovers the row.
                log.warning("turn cancelled; its row is left to the reaper",
                            extra={"worker_id": self._state.worker_id, "event_id": row.id})
                raise
            log.warning("turn cancelled at the drain deadline; row released",
                        extra={"worker_id": self._state.worker_id, "event_id": row.id})
            raise
        finally:
            self._slots.release()
            self._capacity.set()
        if outcome.kind == "lost":
            self._state.counters.lost_claims += 1
        self._send.send_nowait(outcome)
        self._unsettled += 1
        if self._state.turn_observer is not None:
            duration = trio.current_time() - started
            self._state.turn_observer(duration, row.wait_seconds + duration)

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
            try:
                async with trio.open_nursery() as turns:
                    self._turn_nursery = turns
                    turns.start_soon(self._drain_deadline, turns.cancel_scope)
                    task_status.started()
                    await self._claim_loop()
            finally:
                self._send.close()

    async def _drain_deadline(self, scope: trio.CancelScope) -> None:
        # The turns still running at the drain get until its deadline, then are cancelled.
        await self._state.draining.wait()
        scope.deadline = self._state.drain_deadline
        log.info("draining: %d turns in flight", self.running,
                 extra={"worker_id": self._state.worker_id, "generation": self._state.generation})

    async def _claim_loop(self) -> None:
        while not self._state.draining.is_set():
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
            while len(outcomes) < self._batch_size * 5:
                try:
                    outcomes.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for outcome in outcomes:
                outcome.add_to(batch)
            await self._settle(batch, outcomes)

    async def _settle(self, batch: Settlement, outcomes: list[Outcome]) -> None:
        try:
            await self._write(batch, outcomes)
        finally:
            self._unsettled -= len(outcomes)
            self._capacity.set()

    async def _write(self, batch: Settlement, outcomes: list[Outcome]) -> None:
        if not len(batch) and not batch.ledger:
            return
        draining = self._state.draining.is_set()
        # While draining, the last acknowledgements are shielded from the drain deadline
        # but bounded: a second signal or a dead database cannot hold the exit for long.
        with trio.CancelScope(shield=draining) as scope:
            if draining:
                # Below the drain watchdog's grace, so a slow database is not mistaken
                # for a turn stuck in blocking code.
                scope.deadline = trio.current_time() + SETTLE_AT_DRAIN_TIMEOUT
            while True:
                try:
                    settled = await self._store.settle(batch)
                    self._reconnect_settle.succeeded()
                    break
                except DatabaseUnavailableError as exc:
                    await self._reconnect_settle.failed(exc)
                except DatabaseError as exc:
                    # Not a lost connection: retrying the same batch would fail the same way.
                    # Its rows stay CLAIMED; the reaper or the reconciler recovers them.
                    log.error("could not settle %d outcomes: %s", len(batch), exc,
                              extra={"worker_id": self._state.worker_id})
                    return
        if scope.cancelled_caught:
            log.error("could not acknowledge %d rows before exiting; the reaper will recover them",
                      len(batch), extra={"worker_id": self._state.worker_id})
            return
        c = self._state.counters
        c.acked += len(settled.acked)
        c.released += len(settled.released)
        for outcome in outcomes:
            if outcome.kind == "fail" and outcome.row.id in settled.failed:
                if outcome.dead:
                    c.dead += 1
                else:
                    c.retried += 1
        lost = settled.lost(batch)
        c.lost_claims += len(lost)
        for event_id in sorted(lost):
            log.warning("late acknowledgement ignored: the claim was lost",
                        extra={"worker_id": self._state.worker_id, "event_id": event_id})
