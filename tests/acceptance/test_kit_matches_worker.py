"""spectral.testing's running() against a real ``spectral worker`` process: the same app,
settings and events, stopped the same way (SIGTERM, or SIGKILL versus crash()), must leave
the database in the same state and exit the same way."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from spectral.testing import open_test_database, running

from ..pg import Server
from .proc import Spectral
from .test_processes import (
    FAST,
    PUBLISH_N,
    effects,
    in_transaction,
    prepare,
    publish,
    rows,
    tail,
    wait_exit,
    wait_until,
    worker_id,
    worker_states,
)
from .workload import TOPIC, app

ROOT = Path(__file__).parents[2]
EVENTS = 4

#: name: (seconds each turn sleeps mid-transaction, settings, how it is stopped)
SCENARIOS: dict[str, tuple[float, dict[str, str], str]] = {
    "drain finishes the turns": (0.5, {"drain_timeout": "2"}, "sigterm"),
    "drain deadline releases the turns": (2.5, {"drain_timeout": "0.5"}, "sigterm"),
    "killed mid-turn": (2.5, {}, "kill"),
}


def settings_for(extra: dict[str, str]) -> dict[str, str]:
    """FAST (the process tests' environment) as running() keywords, plus ``extra``."""
    names = {k.removeprefix("SPECTRAL_").lower(): v for k, v in FAST.items()}
    names.pop("http_port")
    return {**names, **extra}


def outcome(url: str, worker: str, exit_code: int | None) -> dict[str, Any]:
    found = rows(url, "SELECT status, attempts, last_error, claimed_by = $1 AS ours "
                      "FROM core.outbox ORDER BY id", worker)
    return {
        "exit": "killed" if exit_code is None or exit_code == -signal.SIGKILL else exit_code,
        "rows": [(r["status"], r["attempts"], r["last_error"], r["ours"]) for r in found],
        "effects": effects(url),
        "worker": worker_states(url)[worker],
    }


def run_process(url: str, pause: float, settings: dict[str, str], stop: str) -> dict[str, Any]:
    generation = prepare(url)
    env = {f"SPECTRAL_{k.upper()}": v for k, v in settings.items()}
    env |= {"SPECTRAL_DATABASE_URL": url, "SPECTRAL_HTTP_PORT": "0", "WORKLOAD_SLEEP": str(pause)}
    with Spectral("worker", "tests.acceptance.workload:app", env=env, cwd=ROOT) as proc:
        worker = worker_id(proc)
        publish(url, generation, EVENTS)
        wait_until(lambda: in_transaction(url) == EVENTS, 10, "the turns mid-transaction", proc)
        proc.signal(signal.SIGTERM if stop == "sigterm" else signal.SIGKILL)
        code = wait_exit(proc, 15)
        assert stop == "kill" or code == 0, tail(proc)
    return outcome(url, worker, code)


def run_in_process(url: str, settings: dict[str, str], stop: str) -> dict[str, Any]:
    generation = prepare(url)

    async def scenario() -> tuple[str, int | None]:
        async with open_test_database(url) as db, running(app, db, **settings) as rt:
            assert rt.generation == generation
            await db.fetch(PUBLISH_N, TOPIC, "{}", generation, EVENTS)
            await rt.wait_in_flight(EVENTS)
            if stop == "sigterm":
                report = await rt.sigterm()
                assert report.exit_code == rt.exit_code
            else:
                await rt.crash()
            return rt.worker_id, rt.exit_code

    worker, code = trio.run(scenario)
    return outcome(url, worker, code)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_running_leaves_the_database_as_a_worker_process_does(
    pg_server: Server, db_url: str, monkeypatch: pytest.MonkeyPatch, name: str,
) -> None:
    pause, extra, stop = SCENARIOS[name]
    settings = settings_for(extra)
    monkeypatch.setenv("WORKLOAD_SLEEP", str(pause))
    other = pg_server.fresh()
    try:
        in_process = run_in_process(other, settings, stop)
    finally:
        pg_server.drop(other)
    process = run_process(db_url, pause, settings, stop)
    assert in_process == process
    # And each is what the scenario means, so two equal wrong answers fail too.
    statuses = {r[0] for r in process["rows"]}
    if name == "drain finishes the turns":
        assert (statuses, process["effects"], process["worker"]) == ({"DONE"}, (EVENTS, EVENTS), "exited")
    elif name == "drain deadline releases the turns":
        assert process["rows"] == [("PENDING", 0, "cancelled at the drain deadline", True)] * EVENTS
        assert (process["effects"], process["worker"]) == ((0, 0), "exited")
    else:
        assert process["rows"] == [("CLAIMED", 0, None, True)] * EVENTS
        assert (process["exit"], process["effects"], process["worker"]) == ("killed", (0, 0), "running")
