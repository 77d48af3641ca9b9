"""``spectral ...`` as a user runs it: exit codes, one-line errors, what lands in the database."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import spectral
from spectral.db import shipped

from ..pg import query
from .proc import SPECTRAL


@dataclass(frozen=True)
class Result:
    code: int
    out: list[str]
    err: list[str]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    # The test's own SPECTRAL_* variables (or a DATABASE_URL) must not leak into the child.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_") and k != "DATABASE_URL"}
    return {**base, **(extra or {})}


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SPECTRAL, *args], cwd=cwd, env=_env(env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen[str]) -> Result:
    out, err = proc.communicate(timeout=60)
    return Result(proc.returncode, out.splitlines(), err.splitlines())


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Result:
    return finish(start(*args, cwd=cwd, env=env))


def assert_user_error(result: Result, contains: str = "") -> str:
    """Exit code 2, exactly one line on stderr, no traceback; returns the line."""
    assert result.code == 2, result
    assert len(result.err) == 1, result.err
    line = result.err[0]
    assert line.startswith("spectral: error: "), line
    assert "Traceback" not in line
    assert contains in line, line
    return line


def outbox_rows(url: str) -> list[dict[str, object]]:
    return [dict(r) for r in query(
        url,
        "SELECT id, generation, topic, payload::text AS payload, status, attempts, dead_reason"
        " FROM core.outbox ORDER BY id",
    )]


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    result = run("--version", cwd=tmp_path)
    assert result.code == 0
    assert result.out == [f"spectral {spectral.__version__}"]


def test_migrate_applies_everything_then_nothing(empty_db_url: str, tmp_path: Path) -> None:
    migrations = shipped()
    first = run("migrate", "--database-url", empty_db_url, cwd=tmp_path)
    assert first.code == 0, first
    assert first.out == [
        *(f"applied {m.version:04d}_{m.name} ({m.kind})" for m in migrations),
        f"schema core at version {migrations[-1].version}",
    ]
    # The URL can come from DATABASE_URL as well.
    second = run("migrate", cwd=tmp_path, env={"DATABASE_URL": empty_db_url})
    assert second.code == 0, second
    assert second.out == ["nothing to apply", f"schema core at version {migrations[-1].version}"]
    versions = [r["version"] for r in query(empty_db_url, "SELECT version FROM core.schema_migrations")]
    assert sorted(versions) == [m.version for m in migrations]


def test_two_migrate_processes_at_once_apply_each_migration_once(
    empty_db_url: str, tmp_path: Path
) -> None:
    procs = [start("migrate", "--database-url", empty_db_url, cwd=tmp_path) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [r.code for r in results] == [0, 0], results
    # The lock is taken per migration (it is transaction-scoped, safe behind a pooler), so the
    # two may share the work: between them every migration is applied exactly once, and each
    # process applies its share in order.
    applied = [[line for line in r.out if line.startswith("applied ")] for r in results]
    expected = [f"applied {m.version:04d}_{m.name} ({m.kind})" for m in shipped()]
    assert sorted(applied[0] + applied[1]) == sorted(expected), results
    for lines in applied:
        assert lines == sorted(lines), results
    rows = query(empty_db_url, "SELECT version, count(*) AS n FROM core.schema_migrations GROUP BY version")
    assert {r["version"]: r["n"] for r in rows} == {m.version: 1 for m in shipped()}


def test_publish_prints_the_id_and_the_row_exists(db_url: str, tmp_path: Path) -> None:
    # In development, the first publish allocates a generation when there is none.
    first = run("publish", "orders.created", '{"order_id": 1}', "--database-url", db_url, cwd=tmp_path)
    assert first.code == 0, first
    assert first.out[0] == "allocated generation 1 for development"
    second = run("publish", "orders.paid", '{"order_id": 1, "cents": 995}', "--database-url", db_url,
                 cwd=tmp_path)
    assert second.code == 0, second
    rows = outbox_rows(db_url)
    assert [str(r["id"]) for r in rows] == [first.out[-1], *second.out]
    assert [(r["generation"], r["topic"], json.loads(str(r["payload"])), r["status"]) for r in rows] == [
        (1, "orders.created", {"order_id": 1}, "PENDING"),
        (1, "orders.paid", {"order_id": 1, "cents": 995}, "PENDING"),
    ]


def test_publish_stamps_the_generation_given_by_flag_or_environment(db_url: str, tmp_path: Path) -> None:
    query(db_url, "INSERT INTO core.deployments (reference) VALUES ('a'), ('b'), ('c')")
    procs = {
        1: start("publish", "a.b", "{}", "--generation", "1", "--database-url", db_url, cwd=tmp_path),
        2: start("publish", "a.b", "{}", "--database-url", db_url, cwd=tmp_path,
                 env={"SPECTRAL_GENERATION": "2"}),
        3: start("publish", "a.b", "{}", "--database-url", db_url, cwd=tmp_path),
    }
    printed = {}
    for generation, proc in procs.items():
        result = finish(proc)
        assert result.code == 0, result
        printed[int(result.out[-1])] = generation
    assert {r["id"]: r["generation"] for r in outbox_rows(db_url)} == printed


BAD_PUBLISH = {
    "bad-json": (("orders.created", "{not json"), {}, "invalid payload: not valid JSON"),
    "bad-topic": (("orders..created", "{}"), {}, "invalid topic 'orders..created'"),
    "array-payload": (("orders.created", "[1, 2]"), {}, "must be a JSON object (dict), got list"),
    "null-payload": (("orders.created", "null"), {}, "must be a JSON object (dict), got NoneType"),
    "too-large": (("orders.created", '{"x": "aaaaaaaaaaaaaaaaaaaa"}'),
                  {"SPECTRAL_MAX_PAYLOAD_BYTES": "10"}, "payload too large"),
    "naive-available-at": (("orders.created", "{}", "--available-at", "2030-01-01T00:00:00"), {},
                           "--available-at: give a time zone"),
}


def test_bad_publish_input_exits_2_with_one_line_and_writes_nothing(db_url: str, tmp_path: Path) -> None:
    procs = {
        name: start("publish", *args, "--database-url", db_url, cwd=tmp_path, env=env)
        for name, (args, env, _) in BAD_PUBLISH.items()
    }
    for name, proc in procs.items():
        result = finish(proc)
        expected = BAD_PUBLISH[name][2]
        try:
            assert_user_error(result, expected)
            assert result.out == []
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    assert outbox_rows(db_url) == []
    # Refused before the database was touched: not even a development generation.
    assert query(db_url, "SELECT count(*) FROM core.deployments")[0][0] == 0


def test_publish_in_production_without_a_deployment_is_refused(db_url: str, tmp_path: Path) -> None:
    result = run("publish", "orders.created", "{}", "--database-url", db_url, cwd=tmp_path,
                 env={"SPECTRAL_ENVIRONMENT": "production"})
    assert_user_error(result, "no deployment generation in service")
    assert result.out == []
    assert outbox_rows(db_url) == []


def test_publish_before_migrate_says_to_migrate(empty_db_url: str, tmp_path: Path) -> None:
    result = run("publish", "orders.created", "{}", "--database-url", empty_db_url, cwd=tmp_path)
    assert_user_error(result, "run 'spectral migrate'")


def test_a_bad_setting_exits_2_naming_the_variable(tmp_path: Path) -> None:
    result = run("migrate", cwd=tmp_path, env={
        "SPECTRAL_CONCURRENCY": "zero", "SPECTRAL_DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
    })
    assert_user_error(result, "SPECTRAL_CONCURRENCY: is not a number (got 'zero')")


def test_deploy_allocate_prints_the_new_generation(db_url: str, tmp_path: Path) -> None:
    as_json = run("deploy", "allocate", "--reference", "abc", "--json", "--tag", "v1.2",
                  "--deployed-by", "ci", "--database-url", db_url, cwd=tmp_path)
    assert as_json.code == 0, as_json
    [line] = as_json.out
    row = json.loads(line)
    assert row["generation"] == 1
    assert (row["reference"], row["tag"], row["deployed_by"]) == ("abc", "v1.2", "ci")
    assert row["deployed_at"]
    plain = run("deploy", "allocate", "--reference", "def", "--database-url", db_url, cwd=tmp_path)
    assert plain.code == 0, plain
    assert plain.out == ["2"]
    stored = query(db_url, "SELECT generation, reference, tag FROM core.deployments ORDER BY 1")
    assert [tuple(r) for r in stored] == [(1, "abc", "v1.2"), (2, "def", None)]


def _event(url: str, topic: str, status: str, generation: int = 1) -> int:
    [row] = query(url, "SELECT core.publish($1, '{}', NULL, $2) AS id", topic, generation)
    event_id = int(row["id"])
    if status == "DEAD":
        query(url, "UPDATE core.outbox SET status = 'DEAD', attempts = 10, dead_reason = 'boom',"
                   " last_error = 'boom' WHERE id = $1", event_id)
    elif status == "DONE":
        query(url, "UPDATE core.outbox SET status = 'DONE', done_at = now() WHERE id = $1", event_id)
    return event_id


def test_requeue_puts_dead_rows_back_and_leaves_the_others(db_url: str, tmp_path: Path) -> None:
    query(db_url, "INSERT INTO core.deployments (reference) VALUES ('a'), ('b')")
    dead = _event(db_url, "orders.created", "DEAD")
    done = _event(db_url, "orders.created", "DONE")
    pending = _event(db_url, "orders.created", "PENDING")
    dead_by_topic = _event(db_url, "orders.paid", "DEAD")

    by_id = run("requeue", "--id", str(dead), "--id", str(done), "--id", str(pending),
                "--database-url", db_url, cwd=tmp_path)
    assert by_id.code == 0, by_id
    assert by_id.out == [f"requeued 1 events: {dead}"]
    by_topic = run("requeue", "--topic", "orders.paid", "--to-generation", "2",
                   "--database-url", db_url, cwd=tmp_path)
    assert by_topic.code == 0, by_topic
    assert by_topic.out == [f"requeued 1 events: {dead_by_topic}"]

    rows = {r["id"]: r for r in outbox_rows(db_url)}
    assert (rows[dead]["status"], rows[dead]["attempts"], rows[dead]["dead_reason"]) == ("PENDING", 0, None)
    assert rows[done]["status"] == "DONE"
    assert rows[pending]["status"] == "PENDING"
    assert (rows[dead_by_topic]["status"], rows[dead_by_topic]["generation"]) == ("PENDING", 2)


def test_inspect_json_reports_deployments_workers_and_the_outbox(db_url: str, tmp_path: Path) -> None:
    query(db_url, "INSERT INTO core.deployments (reference, tag) VALUES ('abc', 'v1')")
    query(db_url, "INSERT INTO core.workers (worker_id, generation, environment, service, hostname, pid)"
                  " VALUES ('w-1', 1, 'test', 'billing', 'host-1', 4242)")
    _event(db_url, "orders.created", "PENDING")
    _event(db_url, "orders.created", "PENDING")
    _event(db_url, "orders.created", "DEAD")

    result = run("inspect", "--json", "--database-url", db_url, cwd=tmp_path)
    assert result.code == 0, result
    view = json.loads("\n".join(result.out))
    assert {"deployments", "workers", "outbox"} <= set(view)
    assert [(d["generation"], d["reference"], d["tag"]) for d in view["deployments"]] == [(1, "abc", "v1")]
    [worker] = view["workers"]
    assert (worker["worker_id"], worker["generation"], worker["state"], worker["stale"]) == (
        "w-1", 1, "running", False,
    )
    counts = {(r["generation"], r["status"]): r["n"] for r in view["outbox"]}
    assert counts == {(1, "PENDING"): 2, (1, "DEAD"): 1}


@pytest.mark.parametrize("args", [
    pytest.param((), id="no-command"),
    pytest.param(("publish", "only-a-topic"), id="missing-payload"),
    pytest.param(("requeue",), id="requeue-without-target"),
])
def test_usage_errors_exit_2(args: tuple[str, ...], tmp_path: Path) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.code == 2
    assert result.err and result.err[0].startswith("usage: spectral")
    assert "Traceback" not in "\n".join(result.err)
