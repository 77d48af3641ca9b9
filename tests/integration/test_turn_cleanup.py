"""A turn's commit and rollback never leave its transaction open, even when they run out
of time, against the real database.

The bound used to be a trio deadline around the bridge call. A deadline that had passed
before asyncio ran the cleanup's first step (a loop stalled by a blocking handler, a
SIGSTOPped process) cancelled the cleanup before it ran: the transaction stayed open
with the row's FOR KEY SHARE lock, every claim skipped the row until the server's idle
timeout, and the connection never went back to the pool. A bound of zero reproduces
that deterministically: the deadline has passed before the first step.
"""

from __future__ import annotations

import pytest
import trio

from spectral.db import Store, TurnTx
from spectral.db import store as store_module
from spectral.errors import DatabaseError

from .test_worker_turns import _generation


async def _open_transactions(store: Store) -> int:
    return int(await store.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"))


async def _no_transaction_left(store: Store) -> bool:
    """Whether the turn's transaction is gone within 5 s. A cleanup out of time terminates
    its connection: the server ends the transaction when it sees the socket close, a
    moment after the client closed it, so the count is polled, not read once."""
    deadline = trio.current_time() + 5.0
    while await _open_transactions(store):
        if trio.current_time() > deadline:
            return False
        await trio.sleep(0.01)
    return True


async def _turn_mid_transaction(store: Store) -> tuple[int, TurnTx]:
    gen = await _generation(store)
    await store.execute("CREATE TABLE effects (id bigint)")
    event_id = await store.publish("t.x", "{}", generation=gen)
    [row] = await store.claim(gen, 1, "w", 60.0)
    turn = await store.open_turn(row.id, row.token, "h")
    await turn.query("execute", "INSERT INTO effects VALUES ($1)", (event_id,))
    assert await _open_transactions(store) == 1
    return event_id, turn


async def _row_lockable(store: Store, event_id: int) -> bool:
    """Whether a claim could lock the row now (FOR UPDATE NOWAIT in a throwaway tx)."""
    turn = await store.open_transaction()
    try:
        await turn.query("execute", "SELECT 1 FROM core.outbox WHERE id = $1 FOR UPDATE NOWAIT",
                         (event_id,))
    except DatabaseError:
        return False
    finally:
        await turn.rollback()
    return True


async def test_a_rollback_out_of_time_still_ends_the_transaction(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    event_id, turn = await _turn_mid_transaction(store)
    monkeypatch.setattr(store_module, "CLEANUP_TIMEOUT", 0.0)
    await turn.rollback()
    monkeypatch.undo()
    assert await _no_transaction_left(store)
    assert await _row_lockable(store, event_id)
    assert await store.fetchval("SELECT count(*) FROM effects") == 0


async def test_a_commit_out_of_time_fails_and_still_ends_the_transaction(
    store: Store, monkeypatch: pytest.MonkeyPatch,
) -> None:
    event_id, turn = await _turn_mid_transaction(store)
    monkeypatch.setattr(store_module, "CLEANUP_TIMEOUT", 0.0)
    with pytest.raises(DatabaseError, match="TimeoutError"):
        await turn.commit()
    monkeypatch.undo()
    assert await _no_transaction_left(store)
    assert await _row_lockable(store, event_id)
