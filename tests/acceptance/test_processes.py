"""The worker runtime as real processes with real signals: ``spectral worker`` subprocesses
running :mod:`tests.acceptance.workload` against PostgreSQL.

Every test asserts exact counts on the database (each effect committed once, no row left
CLAIMED, attempts charged) and puts the workers' output in its failure messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from spectral import runtime
from spectral.db import embedded, migrate, open_database

from ..pg import admin, query
from .proc import Spectral
from .workload import EFFECTS_DDL, HANDLER, POISON, TOPIC

ROOT = Path(__file__).parents[2]
APP = "tests.acceptance.workload:app"

#: Short intervals that pass validate_runtime (6 > 3 + 2 + 0.5); tests override some.
FAST = {
    "SPECTRAL_ENVIRONMENT": "test",
    "SPECTRAL_POLL_INTERVAL": "0.5",
    "SPECTRAL_HANDLER_MAX": "3",
    "SPECTRAL_DRAIN_TIMEOUT": "2",
    "SPECTRAL_HEARTBEAT_INTERVAL": "0.5",
    "SPECTRAL_CLAIM_TTL": "6",
    "SPECTRAL_REAP_INTERVAL": "0.5",
    "SPECTRAL_RETRY_BASE": "0.2",
    "SPECTRAL_RETRY_MAX": "1",
    "SPECTRAL_POOL_SIZE": "10",
    "SPECTRAL_RECONNECT_BUDGET": "30",
    "SPECTRAL_HTTP_PORT": "0",
}

Spawn = Callable[..., Spectral]


# --- helpers ----------------------------------------------------------------------------


def rows(url: str, sql: str, *args: object) -> list[dict[str, Any]]:
    return [dict(r) for r in query(url, sql, *args)]


def scalar(url: str, sql: str, *args: object) -> Any:
    return query(url, sql, *args)[0][0]


def prepare(url: str) -> int:
    """Create the effects table and allocate a generation; returns the generation."""
    admin(url, EFFECTS_DDL)
    return int(scalar(url, "INSERT INTO core.deployments (reference) VALUES ('t') RETURNING generation"))


#: ``n`` events of topic $1 in one statement through core.publish: $2 extra payload (JSON
#: text), $3 generation, $4 n. Returns their ids.
PUBLISH_N = (
    "SELECT core.publish($1, jsonb_build_object('n', g) || $2::jsonb, NULL, $3) AS id "
    "FROM generate_series(1, $4) AS g"
)


def publish(url: str, generation: int, n: int, **payload: object) -> list[int]:
    """Publish ``n`` events of TOPIC in one statement through core.publish; returns their ids."""
    found = query(url, PUBLISH_N, TOPIC, json.dumps(payload), generation, n)
    return [r["id"] for r in found]


def statuses(url: str) -> dict[str, int]:
    return {r["status"]: r["n"] for r in rows(
        url, "SELECT status, count(*) AS n FROM core.outbox GROUP BY status")}


def effects(url: str) -> tuple[int, int]:
    """(rows, distinct events) in the effects table."""
    r = rows(url, "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM effects")[0]
    return r["n"], r["d"]


def worker_states(url: str) -> dict[str, str]:
    return {r["worker_id"]: r["state"] for r in rows(url, "SELECT worker_id, state FROM core.workers")}


def in_transaction(url: str) -> int:
    """Pooled sessions of this database idle inside a transaction: turns mid-handler."""
    return int(scalar(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'spectral' AND state = 'idle in transaction'",
    ))


def tail(*procs: Spectral, lines: int = 80) -> str:
    parts = []
    for p in procs:
        shown = p.lines[-lines:]
        parts.append(f"--- pid {p.proc.pid} (exit {p.proc.poll()}), last {len(shown)} lines:\n"
                     + "\n".join(shown))
    return "\n".join(parts)


def count_lines(proc: Spectral, text: str) -> int:
    return sum(text in line for line in list(proc.lines))


def worker_id(proc: Spectral) -> str:
    line = proc.wait_for("spectral ready", timeout=30)
    found = re.search(r"worker_id=([^\s\]]+)", line)
    assert found, f"no worker_id in {line!r}"
    return found.group(1)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *procs: Spectral,
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; fail with the workers' output on timeout or death."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"a worker exited ({p.proc.returncode}) while waiting for "
                                     f"{what}; last value {value!r}\n{tail(*procs)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                 f"last value {value!r}\n{tail(*procs)}")
        time.sleep(interval)


def stop(proc: Spectral, timeout: float = 20) -> tuple[int, float]:
    """SIGTERM, wait; returns (exit code, seconds to exit)."""
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    return wait_exit(proc, timeout), time.monotonic() - started


def wait_exit(proc: Spectral, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout:g}s later\n{tail(proc)}") from None


def dispose(proc: Spectral) -> None:
    """Kill the process if it still runs and close its output pipe."""
    proc.kill()
    proc.wait(10)
    if proc.proc.stdout is not None:
        proc.proc.stdout.close()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``spectral worker`` processes of the workload app; kills leftovers at the end."""
    started: list[Spectral] = []

    def start(url: str, generation: int, **env: str) -> Spectral:
        full = {**FAST, "SPECTRAL_DATABASE_URL": url, "SPECTRAL_GENERATION": str(generation), **env}
        proc = Spectral("worker", APP, env=full, cwd=ROOT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        dispose(proc)


# --- the tests --------------------------------------------------------------------------


def test_a_handler_calling_sys_exit_fails_its_event_and_the_worker_keeps_serving(
    db_url: str, spawn: Spawn,
) -> None:
    generation = prepare(db_url)
    [poisoned] = [r["id"] for r in query(
        db_url, "SELECT core.publish($1, '{}', NULL, $2) AS id", POISON, generation)]
    proc = spawn(db_url, generation)
    proc.wait_for("spectral ready")
    wait_until(lambda: scalar(db_url, "SELECT status FROM core.outbox WHERE id = $1", poisoned)
               == "DEAD", 30, "the poison event to go DEAD", proc)
    ids = publish(db_url, generation, 20)
    wait_until(lambda: statuses(db_url).get("DONE") == len(ids), 30, "the next events", proc)
    row = rows(db_url, "SELECT attempts, last_error FROM core.outbox WHERE id = $1", poisoned)[0]
    assert row["attempts"] == 3 and "SystemExit: 3" in row["last_error"]
    assert effects(db_url) == (20, 20)
    code, _ = stop(proc)
    assert code == 0, tail(proc)


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_three_workers_apply_ten_thousand_events_exactly_once(db_url: str, spawn: Spawn) -> None:
    generation = prepare(db_url)
    assert len(publish(db_url, generation, 10_000)) == 10_000

    started = time.monotonic()
    # Beats every 2 s: three busy workers on a loaded 2-core box can delay a 0.5 s beat
    # past the fence (0.75 s), which cancels and releases turns (harmless, but slow).
    workers = [spawn(db_url, generation, SPECTRAL_CONCURRENCY="30",
                     SPECTRAL_HEARTBEAT_INTERVAL="2", SPECTRAL_CLAIM_TTL="10")
               for _ in range(3)]
    ids = [worker_id(w) for w in workers]
    # ~18 s on an idle 2-core box; the margin is for a loaded one.
    wait_until(lambda: statuses(db_url).get("DONE", 0) == 10_000, 75, "10,000 events DONE",
               *workers, interval=0.2)
    elapsed = time.monotonic() - started

    assert statuses(db_url) == {"DONE": 10_000}, tail(*workers)
    assert effects(db_url) == (10_000, 10_000), tail(*workers)
    assert scalar(db_url, "SELECT count(*) FROM core.event_handled WHERE handler = $1", HANDLER) == 10_000
    assert scalar(db_url, "SELECT max(attempts) FROM core.outbox") == 0, tail(*workers)
    shares = {r["claimed_by"]: r["n"] for r in rows(
        db_url, "SELECT claimed_by, count(*) AS n FROM core.outbox GROUP BY claimed_by")}
    assert set(shares) <= set(ids), shares
    assert len(shares) > 1, f"one worker did everything: {shares}\n{tail(*workers)}"

    results = [stop(w) for w in workers]
    assert [code for code, _ in results] == [0, 0, 0], tail(*workers)
    assert worker_states(db_url) == {i: "exited" for i in ids}
    print(f"\n[figures] 3 workers, 10,000 events: {elapsed:.1f}s from spawn to all DONE "
          f"({10_000 / elapsed:.0f} events/s incl. start-up); shares {sorted(shares.values())}; "
          f"exit after SIGTERM {', '.join(f'{s:.2f}s' for _, s in results)}")


@pytest.mark.slow
def test_rows_of_a_killed_worker_come_back_after_the_claim_ttl_and_apply_once(
    db_url: str, spawn: Spawn,
) -> None:
    generation = prepare(db_url)
    # TTL 6 s > HANDLER_MAX 4 + DRAIN 0.5 + HEARTBEAT 0.5. The reconciler would release a
    # dead worker's claims as soon as its heartbeat is stale: switched off, so this tests
    # the guarantee underneath it, the reaper and the claim TTL.
    env = {"SPECTRAL_HANDLER_MAX": "4", "SPECTRAL_DRAIN_TIMEOUT": "0.5", "SPECTRAL_CLAIM_TTL": "6",
           "SPECTRAL_POOL_SIZE": "25", "SPECTRAL_RECONCILE_ENABLED": "false"}
    victim = spawn(db_url, generation, WORKLOAD_SLEEP="3", **env)
    victim_id = worker_id(victim)
    ids = publish(db_url, generation, 20)
    # Every turn has inserted its effect and sleeps inside its open transaction.
    wait_until(lambda: in_transaction(db_url) == 20, 10, "20 turns mid-transaction", victim)

    victim.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert victim.wait(10) == -signal.SIGKILL
    held = rows(db_url, "SELECT status, claimed_by, attempts, claim_expires_at FROM core.outbox")
    assert {(r["status"], r["claimed_by"], r["attempts"]) for r in held} == {("CLAIMED", victim_id, 0)}
    assert len(held) == 20
    expires = max(r["claim_expires_at"] for r in held)
    assert effects(db_url) == (0, 0), "a killed turn's effects must roll back"

    rescuer = spawn(db_url, generation, **env)
    rescuer_id = worker_id(rescuer)
    wait_until(lambda: statuses(db_url).get("DONE", 0) == 20, 20, "the 20 rows DONE", rescuer)
    recovered = time.monotonic() - killed

    done = rows(db_url, "SELECT status, claimed_by, attempts, last_error FROM core.outbox")
    assert {(r["status"], r["claimed_by"], r["attempts"]) for r in done} == {("DONE", rescuer_id, 1)}
    assert all(r["last_error"] == f"claim expired: worker {victim_id} did not acknowledge" for r in done)
    applied = rows(db_url, "SELECT event_id, attempt, pid, at FROM effects")
    assert sorted(r["event_id"] for r in applied) == sorted(ids), tail(rescuer)
    assert {(r["attempt"], r["pid"]) for r in applied} == {(2, rescuer.proc.pid)}
    assert min(r["at"] for r in applied) >= expires, "a row ran again before its claim lapsed"
    assert count_lines(rescuer, "claim expired; row back to PENDING") == 20, tail(rescuer)
    assert count_lines(rescuer, f"claimed_by={victim_id}") == 20, tail(rescuer)

    code, _ = stop(rescuer)
    assert code == 0, tail(rescuer)
    assert worker_states(db_url) == {victim_id: "running", rescuer_id: "exited"}
    print(f"\n[figures] SIGKILL -> 20 rows handled again by a second worker: {recovered:.1f}s "
          f"(claim TTL 6 s, reap interval 0.5 s)")


@pytest.mark.slow
def test_sigterm_during_a_burst_drains_and_a_new_worker_finishes(db_url: str, spawn: Spawn) -> None:
    generation = prepare(db_url)
    env = {"SPECTRAL_CONCURRENCY": "20", "SPECTRAL_POOL_SIZE": "25", "WORKLOAD_SLEEP": "0.2",
           "SPECTRAL_DRAIN_TIMEOUT": "5", "SPECTRAL_HANDLER_MAX": "2", "SPECTRAL_CLAIM_TTL": "10"}
    publish(db_url, generation, 500)
    first = spawn(db_url, generation, **env)
    first_id = worker_id(first)
    wait_until(lambda: statuses(db_url).get("DONE", 0) >= 60, 20, "60 events DONE", first)
    wait_until(lambda: in_transaction(db_url) >= 10, 5, "turns in flight", first, interval=0.01)

    code, drain = stop(first)
    assert code == 0, tail(first)
    assert drain < 5, f"drain took {drain:.2f}s, the budget is 5s\n{tail(first)}"
    after = statuses(db_url)
    assert after.get("CLAIMED", 0) == 0, f"{after}\n{tail(first)}"
    done = after.get("DONE", 0)
    assert 60 <= done < 500, f"the burst was not cut short: {after}"
    assert after.get("PENDING", 0) == 500 - done, after
    assert effects(db_url) == (done, done), tail(first)
    assert worker_states(db_url) == {first_id: "exited"}
    assert count_lines(first, "spectral.runtime: drained") == 1, tail(first)
    in_flight = re.search(r"draining: (\d+) turns in flight", first.output)
    assert in_flight, tail(first)

    second = spawn(db_url, generation, **env)
    second_id = worker_id(second)
    wait_until(lambda: statuses(db_url).get("DONE", 0) == 500, 30, "500 events DONE", second)
    assert statuses(db_url) == {"DONE": 500}
    assert effects(db_url) == (500, 500), tail(second)
    # Turns in flight at SIGTERM finished within the budget: nothing released, nothing retried.
    assert scalar(db_url, "SELECT max(attempts) FROM core.outbox") == 0
    code, _ = stop(second)
    assert code == 0, tail(second)
    assert worker_states(db_url) == {first_id: "exited", second_id: "exited"}
    print(f"\n[figures] SIGTERM with {in_flight.group(1)} turns in flight (0.2 s each): exit 0 after "
          f"{drain:.2f}s; {done}/500 DONE by the first worker, the rest by the second")


@pytest.mark.slow
def test_a_turn_stuck_in_blocking_code_exits_3_after_the_drain_and_is_recovered(
    db_url: str, spawn: Spawn,
) -> None:
    generation = prepare(db_url)
    drain = 1.0
    # The reconciler is off so that the reaper, after the claim TTL, recovers the row.
    env = {"SPECTRAL_HANDLER_MAX": "2", "SPECTRAL_DRAIN_TIMEOUT": f"{drain:g}", "SPECTRAL_CLAIM_TTL": "4",
           "SPECTRAL_RECONCILE_ENABLED": "false"}
    stuck = spawn(db_url, generation, WORKLOAD_BLOCK="120", **env)
    stuck_id = worker_id(stuck)
    [event_id] = publish(db_url, generation, 1, block=True)
    stuck.wait_for("workload: blocking the thread", timeout=10)

    code, elapsed = stop(stuck, timeout=30)
    budget = drain + runtime.WATCHDOG_GRACE
    assert code == runtime.EXIT_STUCK, f"exit {code} after {elapsed:.1f}s\n{tail(stuck)}"
    assert budget - 0.5 <= elapsed <= budget + 3, f"exited {elapsed:.1f}s after SIGTERM\n{tail(stuck)}"
    line = stuck.wait_for("stuck in blocking code", timeout=1)
    assert f"{HANDLER} on event {event_id}" in line, line

    row = rows(db_url, "SELECT status, claimed_by, attempts FROM core.outbox WHERE id = $1", event_id)[0]
    assert row == {"status": "CLAIMED", "claimed_by": stuck_id, "attempts": 0}
    assert effects(db_url) == (0, 0)

    rescuer = spawn(db_url, generation, **env)
    rescuer_id = worker_id(rescuer)
    wait_until(lambda: statuses(db_url) == {"DONE": 1}, 15, "the stuck row DONE", rescuer)
    row = rows(db_url, "SELECT status, claimed_by, attempts FROM core.outbox WHERE id = $1", event_id)[0]
    assert row == {"status": "DONE", "claimed_by": rescuer_id, "attempts": 1}
    applied = rows(db_url, "SELECT event_id, attempt, pid FROM effects")
    assert applied == [{"event_id": event_id, "attempt": 2, "pid": rescuer.proc.pid}]
    assert count_lines(rescuer, f"claimed_by={stuck_id}") == 1, tail(rescuer)
    code, _ = stop(rescuer)
    assert code == 0, tail(rescuer)
    print(f"\n[figures] blocking handler + SIGTERM: exit {runtime.EXIT_STUCK} after {elapsed:.2f}s "
          f"(drain {drain:g}s + watchdog grace {runtime.WATCHDOG_GRACE:g}s)")


@pytest.mark.slow
def test_a_second_signal_during_long_turns_exits_130(db_url: str, spawn: Spawn) -> None:
    generation = prepare(db_url)
    env = {"WORKLOAD_SLEEP": "30", "SPECTRAL_HANDLER_MAX": "40", "SPECTRAL_DRAIN_TIMEOUT": "20",
           "SPECTRAL_CLAIM_TTL": "65"}
    worker = spawn(db_url, generation, **env)
    wid = worker_id(worker)
    ids = publish(db_url, generation, 5)
    wait_until(lambda: in_transaction(db_url) == 5, 10, "5 turns mid-transaction", worker)

    worker.signal(signal.SIGTERM)
    worker.wait_for("SIGTERM: draining", timeout=5)
    time.sleep(0.3)
    assert worker.proc.poll() is None, "the first signal must wait for the turns"
    started = time.monotonic()
    worker.signal(signal.SIGINT)
    code = wait_exit(worker, 15)
    elapsed = time.monotonic() - started

    assert code == runtime.EXIT_SECOND_SIGNAL, tail(worker)
    assert elapsed < 3, f"exit took {elapsed:.2f}s after the second signal\n{tail(worker)}"
    assert "SIGINT again: cancelling everything" in worker.output
    assert effects(db_url) == (0, 0), "cancelled turns must roll back"
    left = rows(db_url, "SELECT id, status, attempts FROM core.outbox ORDER BY id")
    assert [r["id"] for r in left] == ids
    # Cancelled turns give their rows back without charging an attempt.
    assert {(r["status"], r["attempts"]) for r in left} == {("PENDING", 0)}, f"{left}\n{tail(worker)}"
    assert worker_states(db_url) == {wid: "exited"}
    print(f"\n[figures] SIGTERM then SIGINT with 5 turns in flight: exit 130 after {elapsed:.2f}s")


#: ``spectral worker`` through the CLI's own entry point, then, once it has returned (the
#: drain over, the process not yet gone), a SIGTERM to itself: the window in which the
#: default action used to kill the process with status -15.
LATE_SIGNAL = """
import os, signal, sys, time
from spectral.cli import main
code = main(["worker", sys.argv[1]])
print("drained with", code, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
print("alive after a late SIGTERM", flush=True)
sys.exit(code)
"""


def test_a_signal_after_the_drain_finished_does_not_change_the_exit_status(db_url: str) -> None:
    generation = prepare(db_url)
    env = {**FAST, "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_GENERATION": str(generation),
           "SPECTRAL_LOG_LEVEL": "INFO"}
    proc = Spectral.wrap(subprocess.Popen(
        [sys.executable, "-c", LATE_SIGNAL, APP], env={**os.environ, **env}, cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ))
    try:
        proc.wait_for("spectral ready")
        ids = publish(db_url, generation, 3)
        wait_until(lambda: _done(db_url, ids), 10, "3 events DONE", proc)
        proc.signal(signal.SIGTERM)
        code = wait_exit(proc, 20)
    finally:
        dispose(proc)
    assert "drained with 0" in proc.output, tail(proc)
    assert "alive after a late SIGTERM" in proc.output, tail(proc)
    assert code == 0, tail(proc)


def _done(url: str, ids: list[int]) -> bool:
    found = rows(url, "SELECT count(*) AS n FROM core.outbox WHERE id = ANY($1::bigint[])"
                      " AND status = 'DONE'", ids)
    return int(found[0]["n"]) == len(ids)


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A directory for a dedicated embedded server. Not tmp_path: as root the server runs as
    another user, and a concurrent pytest session resets /tmp/pytest-of-root to mode 0700."""
    path = Path(tempfile.mkdtemp(prefix="spectral-pg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _migrate(url: str) -> None:
    async def run() -> None:
        async with open_database(url, pool_size=1):
            await migrate(url, 262_144)

    trio.run(run)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_rides_out_a_postgresql_restart(server_dir: Path, spawn: Spawn) -> None:
    server = embedded.start(server_dir)
    try:
        url = server.url
        _migrate(url)
        generation = prepare(url)
        env = {"WORKLOAD_SLEEP": "0.05", "SPECTRAL_CONCURRENCY": "10", "SPECTRAL_RECONNECT_BUDGET": "60"}
        worker = spawn(url, generation, **env)
        wid = worker_id(worker)
        before = publish(url, generation, 300)
        wait_until(lambda: statuses(url).get("DONE", 0) >= 50, 20, "50 events DONE", worker)

        assert embedded.stop(server_dir), "the embedded server did not stop"
        time.sleep(2)
        # pgserver caches its server handle per process, so embedded.start() in this
        # process would hand back the stopped server: restart it from a fresh process.
        restart = Spectral("db", "start", env={"SPECTRAL_DATA_DIR": str(server_dir)}, cwd=ROOT)
        try:
            assert restart.wait(60) == 0, restart.output
            assert url in restart.output, f"the socket moved: {restart.output}"
        finally:
            dispose(restart)
        restarted = time.monotonic()

        seen: list[tuple[float, str]] = []

        def running_again() -> bool:
            try:
                state = worker_states(url).get(wid)
            except Exception:  # noqa: BLE001 - the server may still be starting up
                return False
            if state and (not seen or seen[-1][1] != state):
                seen.append((time.monotonic() - restarted, state))
            return state == "running" and any(s == "reconnecting" for _, s in seen)

        wait_until(running_again, 30, "'reconnecting' then 'running'", worker, interval=0.02)
        after = publish(url, generation, 100)
        wait_until(lambda: statuses(url).get("DONE", 0) == 400, 40, "400 events DONE", worker)

        assert statuses(url) == {"DONE": 400}, tail(worker)
        applied = rows(url, "SELECT event_id, count(*) AS n FROM effects GROUP BY event_id")
        assert len(applied) == 400 and all(r["n"] == 1 for r in applied), tail(worker)
        assert {r["event_id"] for r in applied} == set(before) | set(after)
        retried = scalar(url, "SELECT count(*) FROM core.outbox WHERE attempts > 0")
        assert "lost the database, reconnecting" in worker.output, tail(worker)
        code, _ = stop(worker)
        assert code == 0, tail(worker)
        assert worker_states(url) == {wid: "exited"}
        print(f"\n[figures] PostgreSQL restart: states after restart {seen}; "
              f"{retried} rows retried; all 400 applied once")
    finally:
        embedded.stop(server_dir)


@pytest.mark.slow
def test_a_terminated_listener_listens_again_and_notify_wakes_the_worker(
    db_url: str, spawn: Spawn,
) -> None:
    generation = prepare(db_url)
    poll = 30.0
    worker = spawn(db_url, generation, SPECTRAL_POLL_INTERVAL=f"{poll:g}", SPECTRAL_CLAIM_TTL="40")
    worker_id(worker)
    worker.wait_for("listening on spectral_outbox_v1")
    dbname = urlsplit(db_url).path.lstrip("/")
    listeners = (
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'spectral-listener' AND datname = $1"
    )

    def handled_after_publish() -> float:
        started = time.monotonic()
        [event_id] = publish(db_url, generation, 1)
        wait_until(
            lambda: scalar(db_url, "SELECT status FROM core.outbox WHERE id = $1", event_id) == "DONE",
            poll / 2, f"event {event_id} DONE", worker, interval=0.01,
        )
        return time.monotonic() - started

    before = handled_after_publish()
    old = [r["pid"] for r in rows(db_url, listeners, dbname)]
    assert len(old) == 1, old
    assert rows(db_url, "SELECT pg_terminate_backend($1) AS ok", old[0]) == [{"ok": True}]

    worker.wait_for("listener connection lost", timeout=5)
    wait_until(lambda: count_lines(worker, "listening on spectral_outbox_v1") == 2, 10,
               "the listener to LISTEN again", worker)
    new = [r["pid"] for r in rows(db_url, listeners, dbname)]
    assert len(new) == 1 and new != old, (old, new)

    after = handled_after_publish()
    assert after < 1.0, f"handled {after:.2f}s after publishing: NOTIFY did not wake the worker"
    assert effects(db_url) == (2, 2)
    code, _ = stop(worker)
    assert code == 0, tail(worker)
    print(f"\n[figures] NOTIFY -> DONE with a {poll:g}s poll: {before * 1000:.0f} ms before the "
          f"listener was terminated, {after * 1000:.0f} ms after it listened again")
