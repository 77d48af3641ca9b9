"""Least privilege: each of Spectral's group roles, logged in as, against the real server.

Every operation is tried in its own transaction, rolled back, so one check cannot change
what the next sees. "allowed" means it ran; "refused" means PostgreSQL answered
insufficient_privilege (42501), nothing else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import asyncpg
import pytest
import trio

import spectral
from spectral.db import open_database
from spectral.errors import DatabaseError

from ..pg import admin, query
from ..roles import Roles, login_roles

# (description, SQL). Run as the role; $-free so they go through the simple protocol.
PRODUCER_ALLOWED = [
    ("publish through core.publish",
     "SELECT core.publish('orders.created', '{\"order_id\": 1}'::jsonb)"),
    ("publish with a generation and a time",
     "SELECT core.publish('orders.created', '{}'::jsonb, now(), NULL)"),
]
PRODUCER_REFUSED = [
    ("read payloads", "SELECT payload FROM core.outbox"),
    ("read the ledger", "SELECT * FROM core.event_handled"),
    ("read workers", "SELECT * FROM core.workers"),
    ("read deployments", "SELECT * FROM core.deployments"),
    ("insert into the outbox directly",
     "INSERT INTO core.outbox (generation, topic, payload) VALUES (1, 'a.b', '{}')"),
    ("update outbox rows", "UPDATE core.outbox SET status = 'DEAD'"),
    ("delete outbox rows", "DELETE FROM core.outbox"),
    ("truncate the outbox", "TRUNCATE core.outbox"),
    ("write the ledger", "INSERT INTO core.event_handled (handler, event_id) VALUES ('h', 1)"),
    ("change the payload cap", "SELECT core.set_max_payload_bytes(1000)"),
    ("change settings", "UPDATE core.settings SET value = '1'"),
    ("create a table in core", "CREATE TABLE core.sneaky (id int)"),
]

READER_ALLOWED = [
    (f"read {table}", f"SELECT * FROM core.{table}")
    for table in ("outbox", "event_handled", "workers", "deployments", "settings", "rollouts",
                  "reconcile_passes", "generation_handovers", "schema_migrations")
] + [("read payloads", "SELECT payload FROM core.outbox")]
READER_REFUSED = [
    ("publish", "SELECT core.publish('orders.created', '{}'::jsonb)"),
    ("insert into the outbox",
     "INSERT INTO core.outbox (generation, topic, payload) VALUES (1, 'a.b', '{}')"),
    ("update outbox rows", "UPDATE core.outbox SET status = 'DEAD'"),
    ("delete outbox rows", "DELETE FROM core.outbox"),
    ("update workers", "UPDATE core.workers SET state = 'exited'"),
    ("allocate a generation", "INSERT INTO core.deployments (reference) VALUES ('x')"),
    ("write the ledger", "INSERT INTO core.event_handled (handler, event_id) VALUES ('h', 1)"),
    ("change settings", "UPDATE core.settings SET value = '1'"),
    ("truncate the outbox", "TRUNCATE core.outbox"),
    ("create a table in core", "CREATE TABLE core.sneaky (id int)"),
]

WORKER_ALLOWED = [
    ("claim rows", "UPDATE core.outbox SET status = 'CLAIMED', claim_token = gen_random_uuid(),"
                   " claim_expires_at = now() WHERE status = 'PENDING'"),
    ("lock a claimed row (turn begin)", "SELECT 1 FROM core.outbox FOR KEY SHARE"),
    ("write the ledger", "INSERT INTO core.event_handled (handler, event_id) VALUES ('h', 1)"),
    ("read the ledger", "SELECT * FROM core.event_handled"),
    ("register a worker", "INSERT INTO core.workers (worker_id, generation, environment, service,"
                          " hostname, pid) VALUES ('w', 1, 'test', 's', 'h', 1)"),
    ("beat", "UPDATE core.workers SET last_seen = clock_timestamp()"),
    ("allocate a generation", "INSERT INTO core.deployments (reference) VALUES ('x')"),
    ("retire a generation", "UPDATE core.deployments SET retired_at = now()"),
    ("read settings", "SELECT * FROM core.settings"),
    ("record a reconcile pass", "INSERT INTO core.reconcile_passes (worker_id, generation)"
                                " VALUES ('w', 1)"),
    ("record a hand-over", "INSERT INTO core.generation_handovers (from_generation, policy, rows)"
                           " VALUES (1, 'adopt', 0)"),
    ("record a rollout", "INSERT INTO core.rollouts (generation, target) VALUES (1, 'process')"),
    ("finish a rollout", "UPDATE core.rollouts SET status = 'success'"),
    ("read the schema version", "SELECT max(version) FROM core.schema_migrations"),
    ("publish", "SELECT core.publish('orders.created', '{}'::jsonb)"),
]
WORKER_ALLOWED += [
    # The pruner runs in the worker: it deletes finished rows, their ledger rows and records.
    ("prune finished rows", "DELETE FROM core.outbox WHERE status IN ('DONE', 'DEAD')"),
    ("prune ledger rows", "DELETE FROM core.event_handled WHERE event_id < 0"),
    ("prune workers", "DELETE FROM core.workers WHERE state IN ('exited', 'lost')"),
    ("prune reconcile passes", "DELETE FROM core.reconcile_passes WHERE id < 0"),
    ("prune hand-overs", "DELETE FROM core.generation_handovers WHERE id < 0"),
    ("record a prune pass", "INSERT INTO core.prune_passes (worker_id) VALUES ('w')"),
]
WORKER_REFUSED = [
    ("insert into the outbox directly",
     "INSERT INTO core.outbox (generation, topic, payload) VALUES (1, 'a.b', '{}')"),
    ("truncate the outbox", "TRUNCATE core.outbox"),
    ("rewrite ledger rows", "UPDATE core.event_handled SET handler = 'x'"),
    ("change settings", "UPDATE core.settings SET value = '1'"),
    ("change the payload cap", "SELECT core.set_max_payload_bytes(1000)"),
    ("rewrite migrations", "DELETE FROM core.schema_migrations"),
    ("create a table in core", "CREATE TABLE core.sneaky (id int)"),
    ("alter the outbox", "ALTER TABLE core.outbox ADD COLUMN sneaky int"),
    ("drop the outbox", "DROP TABLE core.outbox"),
    ("create an index", "CREATE INDEX sneaky ON core.outbox (topic)"),
]


@pytest.fixture
def roles(db_url: str) -> Iterator[Roles]:
    admin(db_url, "INSERT INTO core.deployments (reference) VALUES ('t')",
          "SELECT core.publish('seed.event', '{\"secret_field\": 1}'::jsonb)")
    with login_roles(db_url) as made:
        yield made


def _try(url: str, sql: str) -> str:
    """'allowed', 'refused' or the other error's SQLSTATE and message."""

    async def run() -> str:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            tr = conn.transaction()
            await tr.start()
            try:
                await conn.execute(sql)
                return "allowed"
            except asyncpg.InsufficientPrivilegeError:
                return "refused"
            except asyncpg.PostgresError as exc:
                return f"{exc.sqlstate}: {exc}"
            finally:
                await tr.rollback()
        finally:
            await conn.close()

    return asyncio.run(run())


def _check(url: str, allowed: list[tuple[str, str]], refused: list[tuple[str, str]]) -> None:
    outcomes = {what: _try(url, sql) for what, sql in allowed + refused}
    expected = {what: "allowed" for what, _ in allowed} | {what: "refused" for what, _ in refused}
    assert outcomes == expected


def test_the_producer_role_may_publish_and_nothing_else(db_url: str, roles: Roles) -> None:
    _check(roles.url(db_url, roles.producer), PRODUCER_ALLOWED, PRODUCER_REFUSED)


def test_the_reader_role_reads_every_core_table_and_writes_nothing(db_url: str, roles: Roles) -> None:
    _check(roles.url(db_url, roles.reader), READER_ALLOWED, READER_REFUSED)


def test_the_worker_role_runs_the_runtimes_statements_and_no_ddl(db_url: str, roles: Roles) -> None:
    _check(roles.url(db_url, roles.worker), WORKER_ALLOWED, WORKER_REFUSED)


def test_the_python_producer_apis_work_as_the_producer_role(db_url: str, roles: Roles) -> None:
    url = roles.url(db_url, roles.producer)

    async def asyncio_side() -> int:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            async with conn.transaction():
                return await spectral.publish(conn, "orders.created", {"via": "asyncio"})
        finally:
            await conn.close()

    first = asyncio.run(asyncio_side())

    async def trio_side() -> int:
        async with open_database(url, pool_size=1) as store:
            return await store.publish("orders.created", json.dumps({"via": "store"}))

    second = trio.run(trio_side)
    found = query(db_url, "SELECT id, payload FROM core.outbox WHERE id = ANY($1) ORDER BY id",
                  [first, second])
    assert [(r["id"], json.loads(r["payload"])) for r in found] == [
        (first, {"via": "asyncio"}), (second, {"via": "store"})]


def test_core_publish_runs_as_its_owner_with_a_fixed_search_path(db_url: str) -> None:
    found = query(db_url, "SELECT prosecdef, proconfig FROM pg_proc WHERE oid ="
                          " 'core.publish(text, jsonb, timestamptz, bigint)'::regprocedure")
    assert [(r["prosecdef"], r["proconfig"]) for r in found] == [
        (True, ["search_path=pg_catalog, pg_temp"])]


def test_the_roles_migration_runs_again_in_a_database_of_the_same_cluster(
    pg_server: object, empty_db_url: str
) -> None:
    """The roles exist already (the template created them): a second database migrates."""
    from spectral.db import migrate, shipped

    async def run() -> int:
        async with open_database(empty_db_url, pool_size=1):
            return (await migrate(empty_db_url, None)).current

    current = trio.run(run)
    granted = query(empty_db_url, "SELECT has_function_privilege('spectral_producer',"
                                  " 'core.publish(text, jsonb, timestamptz, bigint)', 'EXECUTE')")
    assert (current, granted[0][0]) == (len(shipped()), True)


# --- the handler boundary: SET LOCAL ROLE inside the turn ---------------------------------


async def _claim_one(store: spectral.db.Store, generation: int) -> spectral.db.ClaimedRow:
    rows = await store.claim(generation, 1, "w-roles", 60)
    assert len(rows) == 1
    return rows[0]


def _turn(db_url: str, roles: Roles, statements: list[str]) -> tuple[str | None, int, int]:
    """Run one turn as the worker role with the handler role set; returns (error or None,
    ledger rows, effects rows)."""
    generation = int(query(db_url, "SELECT max(generation) FROM core.deployments")[0][0])
    url = roles.url(db_url, roles.worker)

    async def run() -> str | None:
        async with open_database(url, pool_size=2, handler_role=roles.handler) as store:
            row = await _claim_one(store, generation)
            turn = await store.open_turn(row.id, row.token, "roles.handler")
            try:
                for sql in statements:
                    await turn.query("execute", sql.replace("EVENT", str(row.id)), ())
            except DatabaseError as exc:
                await turn.rollback()
                return str(exc)
            await turn.commit()
            return None

    error = trio.run(run)
    ledger = int(query(db_url, "SELECT count(*) FROM core.event_handled")[0][0])
    effects = int(query(db_url, "SELECT count(*) FROM effects")[0][0])
    return error, ledger, effects


def test_a_handler_writes_its_own_tables_and_commits_with_its_ledger_row(
    db_url: str, roles: Roles
) -> None:
    error, ledger, effects = _turn(db_url, roles, [
        "INSERT INTO effects (event_id, handler, attempt, pid) VALUES (EVENT, 'h', 0, 1)",
        "SELECT core.publish('orders.followup', '{}'::jsonb)",
        f"DO $$ BEGIN IF current_user <> '{roles.handler}' THEN RAISE 'not switched'; END IF; END $$",
    ])
    assert (error, ledger, effects) == (None, 1, 1)
    assert query(db_url, "SELECT count(*) FROM core.outbox WHERE topic = 'orders.followup'")[0][0] == 1


@pytest.mark.parametrize("sql", [
    "UPDATE core.outbox SET status = 'DONE'",
    "DELETE FROM core.event_handled",
    "SELECT payload FROM core.outbox",
    "INSERT INTO core.outbox (generation, topic, payload) VALUES (1, 'a.b', '{}')",
])
def test_a_handler_cannot_touch_core_tables_and_its_turn_changes_nothing(
    db_url: str, roles: Roles, sql: str
) -> None:
    error, ledger, effects = _turn(db_url, roles, [
        "INSERT INTO effects (event_id, handler, attempt, pid) VALUES (EVENT, 'h', 0, 1)", sql,
    ])
    assert error is not None and "permission denied" in error
    assert (ledger, effects) == (0, 0)


def test_the_handler_role_lasts_only_for_the_turn(db_url: str, roles: Roles) -> None:
    """After the turn commits, the pooled session is the worker's role again."""
    generation = int(query(db_url, "SELECT max(generation) FROM core.deployments")[0][0])
    url = roles.url(db_url, roles.worker)

    async def run() -> tuple[str, str]:
        async with open_database(url, pool_size=1, handler_role=roles.handler) as store:
            row = await _claim_one(store, generation)
            turn = await store.open_turn(row.id, row.token, "roles.handler")
            inside = await turn.query("fetchval", "SELECT current_user", ())
            await turn.commit()
            after = await store.fetchval("SELECT current_user")
            return str(inside), str(after)

    assert trio.run(run) == (roles.handler, roles.worker)
