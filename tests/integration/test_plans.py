"""Every periodic query stays index-driven on a table that looks like years of history,
and on a table holding a large analyzed backlog.

What is verified, honestly: the module fills one database with 300,000 DONE rows and
their 300,000 ledger rows (plus a small backlog), ANALYZEs it, and then tells the planner
the two tables hold 33 times that (pg_class.reltuples of the tables and their full
indexes scaled to ~10 M; the planner multiplies the tuple density by the actual number of
pages, so it plans for ~10 M rows). The statistics' distributions (99.99 % DONE) are
real. Each query is explained with a custom plan (bound values) and a generic plan
(``plan_cache_mode = force_generic_plan``, what a prepared statement may switch to). No
plan may read core.outbox or core.event_handled with a sequential scan. This checks the
plans, not their run time: the growth benchmark (bench/growth.py) measures that.

The second table is what a worker meets after a burst: 20,000 PENDING and 20,000 CLAIMED
rows (a quarter of them lapsed) beside 20,000 DONE ones, with fresh statistics that say
so. There a join of a claimed batch with the table looks cheap to hash, reading the whole
table per claim: on such statistics the claim, the settle and the reap must still reach
their rows through an index.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from spectral.db._queries import OBSERVE, OUTBOX, PRUNE, RECONCILE

from ..pg import Server

FINISHED = 300_000
SCALE = 33


class _Rollback(Exception):
    pass


async def _execute(url: str, statements: tuple[str, ...]) -> None:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


_ANALYZE = ("VACUUM ANALYZE core.outbox", "VACUUM ANALYZE core.event_handled")

#: Years of history: FINISHED DONE rows with their ledger rows, a small backlog, and the
#: planner told there are ~10 M rows (the tables' and full indexes' reltuples scaled).
HISTORY = (
    "INSERT INTO core.deployments (reference) VALUES ('v1')",
    "INSERT INTO core.outbox (generation, topic, payload, status, attempts, done_at,"
    " created_at) SELECT 1, 'orders.created', '{}', 'DONE', 1,"
    " now() - make_interval(secs => 86400 * 3 - i), now() - make_interval(secs => 86400 * 4)"
    f" FROM generate_series(1, {FINISHED}) AS i",
    "INSERT INTO core.event_handled (handler, event_id, handled_at)"
    " SELECT 'billing.write_invoice', id, done_at FROM core.outbox",
    "INSERT INTO core.outbox (generation, topic, payload, status)"
    " SELECT 1, 'orders.created', '{}', 'PENDING' FROM generate_series(1, 50)",
    "INSERT INTO core.outbox (generation, topic, payload, status, attempts, claimed_by,"
    " claim_token, claim_expires_at) SELECT 1, 'orders.created', '{}', 'CLAIMED', 1,"
    " 'w', gen_random_uuid(), now() + interval '5 minutes' FROM generate_series(1, 20)",
    "INSERT INTO core.outbox (generation, topic, payload, status, dead_reason)"
    " SELECT 1, 'orders.created', '{}', 'DEAD', 'boom' FROM generate_series(1, 10)",
    *_ANALYZE,
    f"UPDATE pg_class SET reltuples = reltuples * {SCALE}"
    " WHERE oid IN ('core.outbox'::regclass, 'core.outbox_pkey'::regclass,"
    " 'core.event_handled'::regclass, 'core.event_handled_pkey'::regclass,"
    " 'core.event_handled_event_idx'::regclass)",
)

BACKLOG = 20_000

#: After a burst: BACKLOG PENDING, BACKLOG CLAIMED (a quarter lapsed) and BACKLOG DONE
#: rows with their ledger rows, with statistics that say so.
BACKLOG_ROWS = (
    "INSERT INTO core.deployments (reference) VALUES ('v1')",
    "INSERT INTO core.outbox (generation, topic, payload)"
    f" SELECT 1, 'orders.created', '{{}}' FROM generate_series(1, {BACKLOG})",
    "INSERT INTO core.outbox (generation, topic, payload, status, attempts, claimed_by,"
    " claim_token, claim_expires_at, claims) SELECT 1, 'orders.created', '{}', 'CLAIMED',"
    " 0, 'w', gen_random_uuid(), now() + make_interval(secs => CASE WHEN i % 4 = 0"
    f" THEN -60 ELSE 300 END), 1 FROM generate_series(1, {BACKLOG}) AS i",
    "INSERT INTO core.outbox (generation, topic, payload, status, attempts, done_at)"
    f" SELECT 1, 'orders.created', '{{}}', 'DONE', 1, now() FROM generate_series(1, {BACKLOG})",
    "INSERT INTO core.event_handled (handler, event_id)"
    " SELECT 'billing.write_invoice', id FROM core.outbox WHERE status = 'DONE'",
    *_ANALYZE,
)


@pytest.fixture(scope="module")
def history_url(pg_server: Server) -> Iterator[str]:
    url = pg_server.fresh()
    asyncio.run(_execute(url, HISTORY))
    yield url
    pg_server.drop(url)


@pytest.fixture(scope="module")
def backlog_url(pg_server: Server) -> Iterator[str]:
    url = pg_server.fresh()
    asyncio.run(_execute(url, BACKLOG_ROWS))
    yield url
    pg_server.drop(url)


def _explain(url: str, sql: str, args: tuple[Any, ...], literals: str,
             drop: str | None = None) -> tuple[str, str]:
    """(custom plan, generic plan) of ``sql``; ``drop`` drops an index first (rolled back)."""

    async def run() -> tuple[str, str]:
        conn = await asyncpg.connect(url, timeout=30)
        plans: list[str] = []
        try:
            async with conn.transaction():
                if drop:
                    await conn.execute(f"DROP INDEX {drop}")
                rows = await conn.fetch("EXPLAIN " + sql, *args)
                plans.append("\n".join(r[0] for r in rows))
                await conn.execute("PREPARE q AS " + sql)
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                execute = f"EXECUTE q ({literals})" if literals else "EXECUTE q"
                rows = await conn.fetch("EXPLAIN " + execute)
                plans.append("\n".join(r[0] for r in rows))
                raise _Rollback
        except _Rollback:
            return plans[0], plans[1]
        finally:
            await conn.close()

    return asyncio.run(run())


IDS = [1, 2, 3]
TOKENS = [uuid.uuid4() for _ in IDS]
ID_LIT = "'{1,2,3}'::bigint[]"
TOKEN_LIT = "'{" + ",".join(map(str, TOKENS)) + "}'::uuid[]"

#: (name, sql, bound values, the same as SQL literals for EXECUTE)
PERIODIC = [
    ("snapshot: live counts", OBSERVE.live_counts, (10_000,), "10000"),
    ("snapshot: table health", OBSERVE.table_health, (), ""),
    ("snapshot: xmin horizon", OBSERVE.xmin_horizon, (), ""),
    ("prune: done", PRUNE.done, (86_400.0, 1000), "86400, 1000"),
    ("prune: dead", PRUNE.dead, (1_209_600.0, 1000), "1209600, 1000"),
    ("reap", OUTBOX.reap, (500,), "500"),
    ("claim", OUTBOX.claim, (1, 100, "w-1", 60.0), "1, 100, 'w', 60"),
    ("settle: acks with ledger", OUTBOX.settle,
     (IDS, TOKENS, [], [], [], [], [], [], [], [], [], [], ["h"] * 3, IDS, []),
     f"{ID_LIT}, {TOKEN_LIT}, '{{}}'::bigint[], '{{}}'::uuid[], '{{}}'::float8[], '{{}}'::text[],"
     " '{}'::bool[], '{}'::text[], '{}'::bigint[], '{}'::uuid[], '{}'::bool[], '{}'::text[],"
     f" '{{h,h,h}}'::text[], {ID_LIT}, '{{}}'::bool[]"),
    ("settle: failures and releases", OUTBOX.settle,
     ([], [], IDS[:2], TOKENS[:2], [1.0, 1.0], ["e", "e"], [False, True], [None, "r"],
      IDS[2:], TOKENS[2:], [False], [None], [], [], [False, False]),
     "'{}'::bigint[], '{}'::uuid[], '{1,2}'::bigint[], "
     f"'{{{TOKENS[0]},{TOKENS[1]}}}'::uuid[], '{{1,1}}'::float8[], '{{e,e}}'::text[],"
     " '{f,t}'::bool[], '{NULL,r}'::text[], '{3}'::bigint[],"
     f" '{{{TOKENS[2]}}}'::uuid[], '{{f}}'::bool[], '{{NULL}}'::text[], '{{}}'::text[],"
     " '{}'::bigint[], '{f,f}'::bool[]"),
    ("reconciler: lost wake-ups", RECONCILE.lost_wakeups, (120.0, 60.0), "120, 60"),
    ("reconciler: orphaned claims", RECONCILE.orphaned_claims, (60.0,), "60"),
    ("reconciler: parked heads", RECONCILE.parked_heads, (), ""),
    ("reconciler: adopt retired", RECONCILE.adopt_retired, (1,), "1"),
    ("reconciler: dead retired", RECONCILE.dead_retired, (), ""),
]


#: The statements a draining worker runs per batch, and the reaper's.
HOT_PATH = [p for p in PERIODIC if p[0] in ("claim", "reap") or p[0].startswith("settle")]

#: Every periodic query on years of history; the hot path on an analyzed backlog too.
CASES = [("history", *p) for p in PERIODIC] + [("backlog", *p) for p in HOT_PATH]


@pytest.mark.slow
@pytest.mark.parametrize(("table", "name", "sql", "args", "literals"), CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_no_periodic_query_reads_the_whole_table(
    request: pytest.FixtureRequest, table: str, name: str, sql: str, args: tuple[Any, ...],
    literals: str,
) -> None:
    url = request.getfixturevalue(f"{table}_url")
    for plan in _explain(url, sql, args, literals):
        assert "Seq Scan on outbox" not in plan, f"{name}:\n{plan}"
        assert "Seq Scan on event_handled" not in plan, f"{name}:\n{plan}"


@pytest.mark.slow
def test_the_planner_sees_the_backlog(backlog_url: str) -> None:
    custom, _ = _explain(backlog_url, "SELECT * FROM core.outbox WHERE status = 'PENDING'", (), "")
    rows = int(custom.split("rows=")[1].split()[0])
    assert rows > BACKLOG // 2, custom


@pytest.mark.slow
def test_the_planner_sees_millions_of_rows(history_url: str) -> None:
    for table in ("core.outbox", "core.event_handled"):
        custom, _ = _explain(history_url, f"SELECT * FROM {table}", (), "")
        rows = int(custom.split("rows=")[1].split()[0])
        assert rows > 9_000_000, custom


@pytest.mark.slow
@pytest.mark.parametrize(("sql", "args", "literals", "index"), [
    (PRUNE.done, (86_400.0, 1000), "86400, 1000", "core.outbox_done_at_idx"),
    (OBSERVE.live_counts, (10_000,), "10000", "core.outbox_due_idx, core.outbox_claimed_idx"),
], ids=["prune-done-without-done_at_idx", "live-counts-without-partial-indexes"])
def test_the_check_fails_without_the_index(
    history_url: str, sql: str, args: tuple[Any, ...], literals: str, index: str,
) -> None:
    custom, generic = _explain(history_url, sql, args, literals, drop=index)
    assert "Seq Scan on outbox" in custom + generic, custom
