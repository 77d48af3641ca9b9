"""Spectral's database seam through a private PgBouncer in transaction pooling mode.

Transaction pooling hands each transaction (and each statement outside one) to whichever
server session is free: nothing may rely on session state across transactions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from spectral.db import Settlement, migrate, open_database, shipped
from spectral.errors import ConfigurationError
from spectral.rollout import RolloutLockedError, _lock

from ..bouncer import pgbouncer, through
from ..pg import Server, query


@pytest.fixture
def bouncer_port(pg_server: Server) -> Iterator[int]:
    # Two server sessions at most: statements of one client land on different sessions
    # as soon as another client is busy, which is what breaks session state.
    with pgbouncer(pg_server.url, "transaction", pool_size=2) as port:
        yield port


def test_without_the_pooler_setting_the_refused_startup_parameter_names_spectral_pooler(
    db_url: str, bouncer_port: int
) -> None:
    async def run() -> None:
        async with open_database(through(db_url, bouncer_port), pool_size=1):
            pass

    with pytest.raises(ConfigurationError) as info:
        trio.run(run)
    assert "unsupported startup parameter" in str(info.value)
    assert "SPECTRAL_POOLER=transaction" in str(info.value)


def test_the_worker_statements_run_through_transaction_pooling_without_prepared_statement_errors(
    db_url: str, bouncer_port: int
) -> None:
    url = through(db_url, bouncer_port)

    async def run() -> tuple[int, int, int]:
        async with open_database(url, pool_size=4, pooler="transaction") as store:
            row = await store.allocate_generation("t", None, None)
            generation = int(row["generation"])
            for i in range(40):
                await store.publish("a.b", f'{{"n": {i}}}', generation=generation)
            done = 0
            async with trio.open_nursery() as nursery:
                for _ in range(4):  # concurrent turns: statements interleave across sessions
                    async def work() -> None:
                        nonlocal done
                        while rows := await store.claim(generation, 5, "w-pool", 60):
                            for r in rows:
                                turn = await store.open_turn(r.id, r.token, "h")
                                await turn.query("execute", "SELECT $1::bigint", (r.id,))
                                await turn.commit()
                            settled = await store.settle(Settlement(
                                ack=[(r.id, r.token) for r in rows]))
                            done += len(settled.acked)

                    nursery.start_soon(work)
            ledger = int(await store.fetchval("SELECT count(*) FROM core.event_handled"))
            pending = int(await store.fetchval(
                "SELECT count(*) FROM core.outbox WHERE status <> 'DONE'"))
            return done, ledger, pending

    assert trio.run(run) == (40, 40, 0)


def test_the_turn_sets_the_idle_in_transaction_bound_locally_behind_a_pooler(
    db_url: str, bouncer_port: int
) -> None:
    url = through(db_url, bouncer_port)

    async def run() -> tuple[str, str]:
        async with open_database(url, pool_size=1, pooler="transaction") as store:
            generation = int((await store.allocate_generation("t", None, None))["generation"])
            await store.publish("a.b", "{}", generation=generation)
            [row] = await store.claim(generation, 1, "w", 60)
            turn = await store.open_turn(row.id, row.token, "h")
            inside = await turn.query("fetchval", "SHOW idle_in_transaction_session_timeout", ())
            await turn.commit()
            after = await store.fetchval("SHOW idle_in_transaction_session_timeout")
            return str(inside), str(after)

    assert trio.run(run) == ("10min", "0")


def test_concurrent_migrations_through_transaction_pooling_apply_each_migration_once(
    empty_db_url: str, bouncer_port: int
) -> None:
    url = through(empty_db_url, bouncer_port)

    async def run() -> list[int]:
        applied: list[int] = []
        async with open_database(empty_db_url, pool_size=1):
            async def one() -> None:
                report = await migrate(url, None)
                applied.extend(m.version for m in report.applied)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
        return applied

    applied = trio.run(run)
    recorded = query(empty_db_url, "SELECT version, count(*) AS n FROM core.schema_migrations"
                                   " GROUP BY version ORDER BY version")
    everything = [m.version for m in shipped()]
    assert sorted(applied) == everything
    assert [(r["version"], r["n"]) for r in recorded] == [(v, 1) for v in everything]
    # No advisory lock is left behind on any server session.
    assert query(empty_db_url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0] == 0


def test_the_deploy_lock_holds_through_transaction_pooling(db_url: str, bouncer_port: int) -> None:
    url = through(db_url, bouncer_port)

    async def run() -> tuple[bool, bool]:
        async with open_database(url, pool_size=1, pooler="transaction") as store:
            first = await _lock(store)
            # Other clients' statements go through the pooler meanwhile.
            await store.fetchval("SELECT 1")
            try:
                await _lock(store)
                refused = False
            except RolloutLockedError:
                refused = True
            await first.aclose()
            again = await _lock(store)
            await again.aclose()
            return refused, True

    assert trio.run(run) == (True, True)


def test_listen_is_off_through_transaction_pooling_unless_a_direct_url_is_given(
    db_url: str, bouncer_port: int
) -> None:
    url = through(db_url, bouncer_port)

    async def run() -> tuple[bool, bool, bool]:
        async with open_database(url, pool_size=1, pooler="transaction") as plain:
            pooled = plain.can_listen
        async with open_database(url, pool_size=1, pooler="transaction",
                                 listen_url=db_url) as direct:
            with_direct = direct.can_listen
        async with open_database(url, pool_size=1, pooler="session") as session:
            return pooled, with_direct, session.can_listen

    assert trio.run(run) == (False, True, True)
