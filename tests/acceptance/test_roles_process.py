"""The runtime logged in as a spectral_worker login role, handlers as a handler role.

`spectral run` (workers, reaper, reconciler, heartbeat, listener and HTTP) must need no
more than spectral_worker grants: it starts, is ready, drains every event, records a
reconcile pass and exits 0. The handler role writes the app's table and publishes, and
is refused core.outbox.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from ..pg import admin, query
from ..roles import Roles, login_roles
from .proc import Spectral
from .test_processes import FAST, ROOT, tail, wait_exit, wait_until

N = 30


@pytest.fixture
def roles(db_url: str) -> Iterator[Roles]:
    with login_roles(db_url) as made:
        yield made


def _status(url: str) -> dict[str, int]:
    return {r["topic"] + ":" + r["status"]: r["n"] for r in query(
        url, "SELECT topic, status, count(*) AS n FROM core.outbox GROUP BY topic, status")}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_runtime_runs_as_the_worker_role_and_handlers_as_the_handler_role(
    db_url: str, roles: Roles
) -> None:
    generation = int(query(db_url, "INSERT INTO core.deployments (reference) VALUES ('t')"
                                   " RETURNING generation")[0][0])
    env = {**FAST, "SPECTRAL_DATABASE_URL": roles.url(db_url, roles.worker),
           "SPECTRAL_HANDLER_ROLE": roles.handler, "SPECTRAL_GENERATION": str(generation),
           "SPECTRAL_RECONCILE_INTERVAL": "1", "SPECTRAL_POLL_INTERVAL": "0.2"}
    with Spectral("run", "tests.acceptance.roles_app:app", env=env, cwd=ROOT) as proc:
        line = proc.wait_for("spectral ready", timeout=60)
        base = re.search(r"http=(http://[^\s\]]+)", line)
        assert base, line
        admin(db_url,
              f"SELECT core.publish('roles.order', '{{}}'::jsonb, NULL, {generation})"
              f" FROM generate_series(1, {N})",
              f"SELECT core.publish('roles.sneaky', '{{}}'::jsonb, NULL, {generation})")
        expected = {"roles.order:DONE": N, "roles.followup:DONE": N, "roles.sneaky:DEAD": 1}
        wait_until(lambda: _status(db_url) == expected, 60, "every event settled", proc,
                   interval=0.1)
        wait_until(lambda: query(db_url, "SELECT count(*) FROM core.reconcile_passes"
                                         " WHERE finished_at IS NOT NULL")[0][0] >= 1,
                   30, "a reconcile pass", proc)
        with urllib.request.urlopen(base.group(1) + "/ready", timeout=10) as response:
            ready = (response.status, json.loads(response.read())["failing"])
        with urllib.request.urlopen(base.group(1) + "/queue", timeout=10) as response:
            queue_status = response.status
        proc.signal()
        assert wait_exit(proc, 30) == 0, tail(proc)
    assert (ready, queue_status) == ((200, []), 200), tail(proc)
    effects = {r["handler"]: r["n"] for r in query(
        db_url, "SELECT handler, count(DISTINCT event_id) AS n FROM effects GROUP BY handler")}
    assert effects == {"roles.order": N, "roles.followup": N}
    [sneaky] = query(db_url, "SELECT last_error, dead_reason FROM core.outbox"
                             " WHERE topic = 'roles.sneaky'")
    assert "permission denied for table outbox" in (sneaky["last_error"] or "") + (
        sneaky["dead_reason"] or "")
    denied = [ln for ln in proc.lines if "permission denied" in ln]
    assert denied and all("roles.sneaky" in ln for ln in denied), tail(proc)


@pytest.mark.parametrize("which", ["missing", "not-a-member"])
def test_a_handler_role_the_worker_cannot_switch_to_stops_it_in_one_line(
    db_url: str, roles: Roles, which: str
) -> None:
    generation = int(query(db_url, "INSERT INTO core.deployments (reference) VALUES ('t')"
                                   " RETURNING generation")[0][0])
    role = f"{roles.handler}_nobody" if which == "missing" else roles.reader
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_")}
    env.update(FAST, SPECTRAL_DATABASE_URL=roles.url(db_url, roles.worker),
               SPECTRAL_HANDLER_ROLE=role, SPECTRAL_GENERATION=str(generation))
    done = subprocess.run([sys.executable, "-m", "spectral", "worker",
                           "tests.acceptance.roles_app:app"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    expected = (f"role {role!r} does not exist" if which == "missing"
                else f"the worker's login role is not a member of {role!r}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"spectral: error: SPECTRAL_HANDLER_ROLE: {expected}")
    assert query(db_url, "SELECT count(*) FROM core.workers")[0][0] == 0


@pytest.mark.parametrize(("login", "args", "code", "says"), [
    ("reader", ["inspect", "--json"], 0, '"deployments"'),
    ("reader", ["publish", "a.b", "{}"], 1, "permission denied for function publish"),
    ("producer", ["publish", "a.b", "{}"], 0, ""),
    ("producer", ["inspect"], 1, "permission denied for table"),
    ("worker", ["deploy", "allocate", "--reference", "r"], 0, ""),
    ("worker", ["requeue", "--topic", "a.b"], 0, "requeued 0 events"),
    ("worker", ["migrate"], 1, "database error (42501): permission denied"),  # the owner migrates
])
def test_operator_commands_run_with_the_role_they_need(
    db_url: str, roles: Roles, login: str, args: list[str], code: int, says: str
) -> None:
    generation = int(query(db_url, "INSERT INTO core.deployments (reference) VALUES ('t')"
                                   " RETURNING generation")[0][0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_")}
    env.update(SPECTRAL_DATABASE_URL=roles.url(db_url, getattr(roles, login)),
               SPECTRAL_ENVIRONMENT="production", SPECTRAL_GENERATION=str(generation))
    done = subprocess.run([sys.executable, "-m", "spectral", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == code, done.stdout + done.stderr
    assert says in done.stdout + done.stderr
