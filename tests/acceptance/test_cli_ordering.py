"""`spectral publish --key/--idempotency-key/--traceparent`, `spectral skip` and the
blocked keys in `spectral inspect`."""

from __future__ import annotations

import json
from pathlib import Path

from ..pg import query
from .test_cli import assert_user_error, run

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_publish_with_a_key_and_an_idempotency_key_prints_the_first_id_again(
    db_url: str, tmp_path: Path,
) -> None:
    args = ("publish", "order.paid", "{}", "--key", "order-42", "--idempotency-key", "pay-1",
            "--traceparent", TRACEPARENT, "--database-url", db_url)
    first, again = run(*args, cwd=tmp_path), run(*args, cwd=tmp_path)
    assert first.code == 0 and again.code == 0, (first, again)
    assert first.out[-1] == again.out[-1]
    rows = query(db_url, "SELECT id, key, idempotency_key, traceparent FROM core.outbox")
    assert [(str(r["id"]), r["key"], r["idempotency_key"], r["traceparent"]) for r in rows] == [
        (first.out[-1], "order-42", "pay-1", TRACEPARENT)]


def test_publish_with_a_bad_key_exits_2_in_one_line_and_writes_nothing(
    db_url: str, tmp_path: Path,
) -> None:
    result = run("publish", "order.paid", "{}", "--key", "x" * 300, "--database-url", db_url,
                 cwd=tmp_path)
    assert_user_error(result, "invalid key")
    assert query(db_url, "SELECT count(*) AS n FROM core.outbox")[0]["n"] == 0


def test_inspect_names_the_blocked_key_and_skip_unblocks_it(db_url: str, tmp_path: Path) -> None:
    query(db_url, "INSERT INTO core.deployments (reference) VALUES ('v1')")
    [head] = query(db_url, "SELECT core.publish('order.paid', '{}', key => 'order-7') AS id")
    query(db_url, "SELECT core.publish('order.paid', '{}', key => 'order-7')")
    query(db_url, "UPDATE core.outbox SET status = 'DEAD', dead_reason = 'boom' WHERE id = $1",
          head["id"])

    text = run("inspect", "--database-url", db_url, cwd=tmp_path)
    assert text.code == 0, text
    assert "blocked keys (a DEAD event holds them): 1" in text.out
    [line] = [x for x in text.out if "key 'order-7'" in x]
    assert f"head event {head['id']}" in line and "1 waiting" in line
    view = json.loads("\n".join(run("inspect", "--json", "--database-url", db_url,
                                    cwd=tmp_path).out))
    assert [(b["key"], b["head_id"]) for b in view["blocked_keys"]] == [("order-7", head["id"])]

    skipped = run("skip", "--id", str(head["id"]), "--database-url", db_url, cwd=tmp_path)
    assert skipped.code == 0, skipped
    assert skipped.out == [f"skipped 1 events: {head['id']}"]
    again = run("skip", "--id", str(head["id"]), "--database-url", db_url, cwd=tmp_path)
    assert again.out == ["skipped 0 events (the others are not DEAD or already skipped)"]
    after = run("inspect", "--json", "--database-url", db_url, cwd=tmp_path)
    assert json.loads("\n".join(after.out))["blocked_keys"] == []
