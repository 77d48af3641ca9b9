"""The HTTP surface of a running `spectral run` process, over real loopback sockets."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from ..pg import query
from .proc import Spectral

ROOT = Path(__file__).parents[2]
TOKEN = "detail-token-0123456789abcdef"
PASSWORD = "pw-Zq8mX3vT7"


def _with_password(url: str) -> str:
    """The test database URL with a password added (trust auth ignores it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}:{PASSWORD}@{host}", parts.path, parts.query, ""))


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


@pytest.fixture
def server(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    version_file = tmp_path / "version.json"
    version_file.write_text(json.dumps({
        "commit_sha": "abc123def", "built_at": "2026-11-01T00:00:00+00:00",
        "lock_hashes": {"pyproject.toml": "f" * 64}, "python": "3.11", "package_version": "0.1.0",
    }))
    env = {
        "SPECTRAL_DATABASE_URL": _with_password(db_url),
        "SPECTRAL_HTTP_PORT": "0",
        "SPECTRAL_DETAIL_TOKEN": TOKEN,
        "SPECTRAL_VERSION_FILE": str(version_file),
        "SPECTRAL_DEMO_RATE": "20",
        "SPECTRAL_POLL_INTERVAL": "0.2",
        "SPECTRAL_DRAIN_TIMEOUT": "5",
    }
    with Spectral("run", env=env, cwd=tmp_path) as proc:
        line = proc.wait_for("spectral ready", timeout=60)
        match = re.search(r"http=(http://[0-9.]+:\d+)", line)
        assert match, line
        yield proc, match.group(1)


def test_every_endpoint_answers_with_its_documented_shape(server) -> None:  # type: ignore[no-untyped-def]
    proc, base = server
    status, ctype, body = get(base + "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert ctype.startswith("application/json")

    status, _, body = get(base + "/version")
    doc = json.loads(body)
    assert status == 200
    assert set(doc) == {"service", "environment", "generation", "commit_sha", "deployed_at"}
    assert doc["service"] == "demo" and doc["commit_sha"] == "abc123def"
    assert isinstance(doc["generation"], int) and doc["deployed_at"]

    status, _, body = get(base + "/ready")
    ready = json.loads(body)
    assert status == 200, body
    assert ready["failing"] == [] and ready["checks"]["migrations"]["current"] is True
    assert ready["checks"]["listener"]["mode"] == "notify"

    status, _, body = get(base + "/queue")
    q = json.loads(body)
    assert status == 200
    assert {"outbox", "workers", "in_flight", "listener", "reconcile", "prune", "health"} <= set(q)
    assert any(w["state"] == "running" for w in q["workers"])
    assert q["prune"]["enabled"] is True and q["prune"]["retain_done"] == 86400.0
    assert {t["table"] for t in q["health"]["tables"]} == {"outbox", "event_handled"}
    assert [v["check"] for v in q["health"]["verdicts"]] == ["xmin_horizon", "event_handled", "outbox"]
    assert isinstance(q["health"]["done_estimate"], int)

    # /metrics parses as Prometheus text, and its counters move as the demo's events flow.
    proc.wait_for("receipt sent", timeout=30)
    first = _acks(get(base + "/metrics")[2])
    deadline = time.monotonic() + 20
    while True:
        status, ctype, text = get(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        # The queue depth comes from a snapshot at most 2 s old: wait for one with rows.
        if (_acks(text) > first and "spectral_queue_depth{" in text) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _acks(text) > first
    assert "spectral_turn_duration_seconds_bucket" in text
    assert re.search(r'spectral_queue_depth\{generation="\d+",status="(PENDING|CLAIMED|DEAD)"\} \d', text)
    assert re.search(r'spectral_table_dead_tuples\{table="outbox"\} \d', text)
    assert re.search(r'spectral_health_ok\{check="xmin_horizon"\} [01]', text)
    assert re.search(r'spectral_pruned_total\{kind="done"\} \d', text)
    assert "spectral_xmin_horizon_age_seconds " in text


def _acks(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == "spectral_acks":
            return float(family.samples[0].value)
    raise AssertionError("spectral_acks missing")


def test_version_detail_needs_the_bearer_token(server) -> None:  # type: ignore[no-untyped-def]
    proc, base = server
    assert get(base + "/version/detail")[0] == 401
    assert get(base + "/version/detail", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    # Even the right token is refused in a query string.
    assert get(base + f"/version/detail?token={TOKEN}")[0] == 401
    status, _, body = get(base + "/version/detail", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    doc = json.loads(body)
    assert doc["build"]["commit_sha"] == "abc123def"
    assert doc["build"]["lock_hashes"] == {"pyproject.toml": "f" * 64}
    assert {"python", "trio", "asyncpg", "platform", "pid", "uptime_seconds"} <= set(doc["runtime"])
    assert doc["checks"]["database"] == "ok"


def test_no_endpoint_and_no_log_line_leaks_the_password_or_the_token(server) -> None:  # type: ignore[no-untyped-def]
    proc, base = server
    bodies = [get(base + path)[2] for path in
              ("/health", "/ready", "/version", "/version/detail", "/queue", "/metrics")]
    bodies.append(get(base + "/version/detail", {"Authorization": f"Bearer {TOKEN}"})[2])
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    everything = "\n".join(bodies) + proc.output
    assert PASSWORD not in everything
    assert TOKEN not in everything
    assert "spectral ready" in proc.output


def test_version_detail_is_404_without_a_configured_token(db_url: str, tmp_path: Path) -> None:
    env = {"SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_HTTP_PORT": "0", "SPECTRAL_DEMO_RATE": "0"}
    with Spectral("run", env=env, cwd=tmp_path) as proc:
        line = proc.wait_for("spectral ready", timeout=60)
        base = re.search(r"http=(http://[0-9.]+:\d+)", line).group(1)  # type: ignore[union-attr]
        assert get(base + "/version/detail", {"Authorization": f"Bearer {TOKEN}"})[0] == 404


def test_health_flips_to_503_while_draining_and_the_process_exits_0(
    db_url: str, tmp_path: Path
) -> None:
    app = tmp_path / "slowapp.py"
    app.write_text(
        "import trio, spectral\n"
        "app = spectral.App(service='slow')\n"
        "@app.handler('slow.job', name='slow')\n"
        "async def slow(event, tx):\n"
        "    await trio.sleep(2)\n"
    )
    env = {"SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_HTTP_PORT": "0",
           "SPECTRAL_DRAIN_TIMEOUT": "10", "SPECTRAL_POLL_INTERVAL": "0.1"}
    with Spectral("run", "slowapp:app", env=env, cwd=tmp_path) as proc:
        line = proc.wait_for("spectral ready", timeout=60)
        base = re.search(r"http=(http://[0-9.]+:\d+)", line).group(1)  # type: ignore[union-attr]
        query(db_url, "SELECT core.publish('slow.job', '{}'::jsonb)")
        _wait_in_flight(base)
        proc.signal(signal.SIGTERM)
        proc.wait_for("draining", timeout=5)
        status, _, body = get(base + "/health")
        assert (status, json.loads(body)) == (503, {"status": "draining"})
        assert proc.wait(30) == 0, proc.output
    assert query(db_url, "SELECT status FROM core.outbox")[0]["status"] == "DONE"


def _wait_in_flight(base: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if json.loads(get(base + "/queue")[2])["in_flight"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError("the slow turn never started")
