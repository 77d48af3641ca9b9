"""One contract, two stores: every scenario here runs against the real ``Store`` on
PostgreSQL and against ``tests.fakes.FakeStore``, with the same steps and assertions.

The unit tier drives actors against the fake; this suite keeps the fake from deciding
anything the SQL decides differently (claim order, generations, the ledger at claim time,
fencing by claim token, ledger rows only with a matching claim, attempts, the reaper).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest
import trio

from spectral.db import Ack, Fail, Handled, Release, Settlement, Store, open_database
from spectral.errors import AlreadyHandledError, ClaimLostError

from ..fakes import FakeStore


class Backend(Protocol):
    store: Any

    async def generation(self) -> int: ...
    async def add(self, topic: str, generation: int, *, delay: float = 0.0) -> int: ...
    async def expire(self, event_id: int) -> None: ...
    async def ledger(self, event_id: int) -> set[str]: ...
    async def add_ledger(self, handler: str, event_id: int) -> None: ...
    async def row(self, event_id: int) -> dict[str, Any]: ...


class Real:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def generation(self) -> int:
        return int((await self.store.allocate_generation("contract", None, None))["generation"])

    async def add(self, topic: str, generation: int, *, delay: float = 0.0) -> int:
        event_id = await self.store.publish(topic, json.dumps({}), generation=generation)
        # Shift the due time relative to now (delay may be negative: due in the past).
        await self.store.execute(
            "UPDATE core.outbox SET available_at = now() + make_interval(secs => $2) WHERE id = $1",
            event_id, delay)
        return event_id

    async def expire(self, event_id: int) -> None:
        await self.store.execute("UPDATE core.outbox SET claim_expires_at = now() - interval '1 s' "
                                 "WHERE id = $1", event_id)

    async def ledger(self, event_id: int) -> set[str]:
        rows = await self.store.fetch("SELECT handler FROM core.event_handled WHERE event_id = $1",
                                      event_id)
        return {r["handler"] for r in rows}

    async def add_ledger(self, handler: str, event_id: int) -> None:
        await self.store.execute("INSERT INTO core.event_handled (handler, event_id) VALUES ($1, $2)",
                                 handler, event_id)

    async def row(self, event_id: int) -> dict[str, Any]:
        row = await self.store.get_event(event_id)
        assert row is not None
        return {k: row[k] for k in ("status", "attempts", "last_error", "dead_reason")}


class Fake:
    def __init__(self) -> None:
        self.store = FakeStore()
        self._generations = 0

    async def generation(self) -> int:
        self._generations += 1
        return self._generations

    async def add(self, topic: str, generation: int, *, delay: float = 0.0) -> int:
        event_id = self.store.add(topic, {}, generation=generation, notify=False)
        self.store.row(event_id).available_at = trio.current_time() + delay
        return event_id

    async def expire(self, event_id: int) -> None:
        self.store.row(event_id).claim_expires_at = trio.current_time() - 1

    async def ledger(self, event_id: int) -> set[str]:
        return {h for h, e in self.store.handled if e == event_id}

    async def add_ledger(self, handler: str, event_id: int) -> None:
        self.store.handled.add((handler, event_id))

    async def row(self, event_id: int) -> dict[str, Any]:
        r = self.store.row(event_id)
        return {"status": r.status, "attempts": r.attempts, "last_error": r.last_error,
                "dead_reason": r.dead_reason}


@pytest.fixture(params=["postgres", "fake"])
async def backend(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[Backend]:
    if request.param == "fake":
        yield Fake()
        return
    async with open_database(db_url, pool_size=2) as store:
        yield Real(store)


async def test_claim_takes_due_rows_of_its_generation_in_due_order_up_to_the_limit(
    backend: Backend,
) -> None:
    gen, other = await backend.generation(), await backend.generation()
    later = await backend.add("t", gen, delay=-1)
    earlier = await backend.add("t", gen, delay=-5)
    third = await backend.add("t", gen, delay=-3)
    await backend.add("t", other, delay=-10)
    not_due = await backend.add("t", gen, delay=1000)
    rows = await backend.store.claim(gen, 2, "w", 30)
    assert [r.id for r in rows] == [earlier, third]
    rows = await backend.store.claim(gen, 10, "w", 30)
    assert [r.id for r in rows] == [later]
    assert (await backend.row(not_due))["status"] == "PENDING"


async def test_a_first_claim_reads_no_ledger_and_every_later_claim_does(backend: Backend) -> None:
    gen = await backend.generation()
    event_id = await backend.add("t", gen, delay=-1)
    await backend.add_ledger("written-elsewhere", event_id)
    [first] = await backend.store.claim(gen, 1, "w", 30)
    assert first.handled == frozenset() and first.attempts == 0
    released = Settlement(release=[Release(event_id, first.token, False, "drain")])
    assert (await backend.store.settle(released)).released == {event_id}
    [second] = await backend.store.claim(gen, 1, "w", 30)
    assert second.handled == frozenset({"written-elsewhere"}) and second.attempts == 0


async def test_settle_is_fenced_by_the_claim_token_and_ledger_rows_follow_the_fence(
    backend: Backend,
) -> None:
    gen = await backend.generation()
    mine, stale = await backend.add("t", gen, delay=-2), await backend.add("t", gen, delay=-1)
    rows = {r.id: r for r in await backend.store.claim(gen, 2, "w", 30)}
    batch = Settlement(
        ledger=[Handled("h", mine), Handled("h", stale)],
        ack=[Ack(mine, rows[mine].token), Ack(stale, uuid.uuid4())],
    )
    settled = await backend.store.settle(batch)
    assert settled.acked == {mine} and settled.lost(batch) == {stale}
    assert await backend.ledger(mine) == {"h"}
    assert await backend.ledger(stale) == set()
    assert (await backend.row(mine))["status"] == "DONE"
    assert (await backend.row(stale))["status"] == "CLAIMED"


async def test_fail_charges_an_attempt_then_retries_later_or_goes_dead(backend: Backend) -> None:
    gen = await backend.generation()
    retry, dead = await backend.add("t", gen, delay=-2), await backend.add("t", gen, delay=-1)
    rows = {r.id: r for r in await backend.store.claim(gen, 2, "w", 30)}
    batch = Settlement(fail=[Fail(retry, rows[retry].token, 1000.0, "boom", False, None),
                             Fail(dead, rows[dead].token, 0.0, "boom", True, "failed 1 of 1")])
    assert (await backend.store.settle(batch)).failed == {retry, dead}
    assert await backend.row(retry) == {"status": "PENDING", "attempts": 1, "last_error": "boom",
                                        "dead_reason": None}
    assert await backend.row(dead) == {"status": "DEAD", "attempts": 1, "last_error": "boom",
                                       "dead_reason": "failed 1 of 1"}
    assert await backend.store.claim(gen, 10, "w", 30) == [], "the retry is not due yet"


async def test_release_charges_only_when_asked_and_keeps_the_error_when_given_none(
    backend: Backend,
) -> None:
    gen = await backend.generation()
    free, charged = await backend.add("t", gen, delay=-2), await backend.add("t", gen, delay=-1)
    rows = {r.id: r for r in await backend.store.claim(gen, 2, "w", 30)}
    batch = Settlement(release=[Release(free, rows[free].token, False, None),
                                Release(charged, rows[charged].token, True, "cut off")])
    assert (await backend.store.settle(batch)).released == {free, charged}
    assert await backend.row(free) == {"status": "PENDING", "attempts": 0, "last_error": None,
                                       "dead_reason": None}
    assert (await backend.row(charged))["attempts"] == 1
    assert (await backend.row(charged))["last_error"] == "cut off"


async def test_the_reaper_takes_back_only_lapsed_claims_and_charges_them(backend: Backend) -> None:
    gen = await backend.generation()
    lapsed, live = await backend.add("t", gen, delay=-2), await backend.add("t", gen, delay=-1)
    await backend.store.claim(gen, 2, "w", 30)
    await backend.expire(lapsed)
    assert [r[0] for r in await backend.store.reap(10)] == [lapsed]
    row = await backend.row(lapsed)
    assert (row["status"], row["attempts"]) == ("PENDING", 1)
    assert "did not acknowledge" in row["last_error"]
    assert (await backend.row(live))["status"] == "CLAIMED"


async def test_a_turn_checks_its_claim_and_the_ledger_at_its_first_statement(
    backend: Backend,
) -> None:
    gen = await backend.generation()
    lost, done, fresh = (await backend.add("t", gen, delay=-3), await backend.add("t", gen, delay=-2),
                         await backend.add("t", gen, delay=-1))
    rows = {r.id: r for r in await backend.store.claim(gen, 3, "w", 30)}
    await backend.add_ledger("h", done)

    turn = await backend.store.open_turn(lost, uuid.uuid4(), "h")
    with pytest.raises(ClaimLostError):
        await turn.query("execute", "SELECT 1", ())
    assert turn.lost and not turn.opened

    turn = await backend.store.open_turn(done, rows[done].token, "h")
    with pytest.raises(AlreadyHandledError):
        await turn.query("execute", "SELECT 1", ())
    assert turn.already_handled and not turn.opened

    turn = await backend.store.open_turn(fresh, rows[fresh].token, "h")
    await turn.query("execute", "SELECT 1", ())
    assert turn.opened and await backend.ledger(fresh) == set()
    await turn.commit()
    assert await backend.ledger(fresh) == {"h"}
