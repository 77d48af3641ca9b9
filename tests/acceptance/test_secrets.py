"""No secret leaves the process: everything `spectral` writes is searched for them.

The database password, the LISTEN URL's password and the detail token are given the way
production gives them (files and variables, never flags); the test then reads the
process's stdout and stderr, its command line as ``ps`` shows it (/proc/PID/cmdline),
every HTTP body (including refusals), the CLI's own output and every row of every core
table, and finds none of them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from ..pg import admin, query
from .proc import SPECTRAL, Spectral
from .test_processes import FAST, ROOT, prepare, publish, statuses, tail, wait_exit, wait_until

PASSWORD = "pw-db-7Hq2LmZx9"
LISTEN_PASSWORD = "pw-listen-4Rt8Kd"
TOKEN = "tok-detail-9Vb3Nc6Wq2Ys5Lp"
SECRETS = (PASSWORD, LISTEN_PASSWORD, TOKEN)


def _with_password(url: str, password: str) -> str:
    """``url`` with a password added (the test server trusts loopback and ignores it)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{parts.username or 'postgres'}:{password}@{host}",
                       parts.path, parts.query, ""))


def _get(url: str, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return f"{response.status} {dict(response.headers)} {response.read().decode()}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {dict(exc.headers)} {exc.read().decode()}"


def _core_tables_as_text(url: str) -> str:
    tables = [r["t"] for r in query(url, "SELECT format('%I.%I', schemaname, tablename) AS t"
                                         " FROM pg_tables WHERE schemaname = 'core'")]
    assert "core.workers" in tables
    return "\n".join(str(r[0]) for t in tables for r in query(url, f"SELECT x::text FROM {t} AS x"))


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_secret_reaches_output_logs_ps_http_or_core_tables(db_url: str, tmp_path: Path) -> None:
    generation = prepare(db_url)
    url_file = tmp_path / "database-url"
    url_file.write_text(_with_password(db_url, PASSWORD) + "\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**FAST, "SPECTRAL_DATABASE_URL_FILE": str(url_file),
           "SPECTRAL_LISTEN_DATABASE_URL": _with_password(db_url, LISTEN_PASSWORD),
           "SPECTRAL_DETAIL_TOKEN_FILE": str(token_file), "SPECTRAL_GENERATION": str(generation),
           "SPECTRAL_LOG_LEVEL": "DEBUG", "SPECTRAL_RECONCILE_INTERVAL": "1"}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_")}
    written: list[str] = []
    with Spectral("run", "tests.acceptance.workload:app", env={**base_env, **env}, cwd=ROOT) as proc:
        ready = proc.wait_for("spectral ready", timeout=60)
        written.append(Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes().decode(errors="replace"))
        match = re.search(r"http=(http://[^\s\]]+)", ready)
        assert match, ready
        base = match.group(1)
        publish(db_url, generation, 50)
        wait_until(lambda: statuses(db_url).get("DONE", 0) == 50, 60, "50 events DONE", proc)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for path, headers in [("/health", {}), ("/ready", {}), ("/version", {}),
                              ("/version/detail", auth), ("/version/detail", {}),
                              ("/version/detail", {"Authorization": "Bearer wrong-token-123456"}),
                              ("/queue", {}), ("/metrics", {}), ("/nowhere", {})]:
            written.append(_get(base + path, headers))
        # Errors: cut the process's sessions (this test's database only); it logs and reconnects.
        admin(db_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                      " AND application_name LIKE 'spectral%'")
        wait_until(lambda: sum("listening on" in line for line in list(proc.lines)) >= 2
                   and "heartbeat reconnected" in proc.output, 30, "the reconnects", proc)
        # A SIGTERM within moments of the cut can meet a pooled connection's late
        # ConnectionError and exit 1 (seen on main too; reported, not this test's subject).
        time.sleep(1)
        proc.signal(signal.SIGTERM)
        assert wait_exit(proc, 30) == 0, tail(proc)
        written.append(proc.output)
    written.append(_core_tables_as_text(db_url))

    # The CLI's commands, given the same files and variables.
    for args in (["inspect", "--json"], ["migrate"], ["publish", "a.b", "{}"],
                 ["reconcile", "status"], ["deploy", "allocate", "--reference", "r"]):
        done = subprocess.run([*SPECTRAL, *args], env={**base_env, **env}, cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, (args, done.stderr)
        written.append(done.stdout + done.stderr)
    assert _leaks("\n".join(written)) == []
    assert "***" not in written[0]  # the command line holds no URL at all


def test_a_password_in_the_database_url_flag_is_refused_without_echoing_it(tmp_path: Path) -> None:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_")}
    done = subprocess.run(
        [*SPECTRAL, "migrate", "--database-url", f"postgresql://u:{PASSWORD}@127.0.0.1:1/x"],
        env=base_env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert _leaks(done.stdout + done.stderr) == []
    assert done.stderr.splitlines() == [
        "spectral: error: --database-url: the URL holds a password, which would show in ps; "
        "use SPECTRAL_DATABASE_URL, --database-url-file or a .pgpass file instead"]


def test_the_detail_token_flag_is_refused_without_echoing_it(tmp_path: Path) -> None:
    done = subprocess.run([*SPECTRAL, "migrate", "--detail-token", TOKEN], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert _leaks(done.stdout + done.stderr) == []
    assert done.stderr.splitlines() == [
        "spectral: error: --detail-token: a secret on the command line shows in ps; use "
        "SPECTRAL_DETAIL_TOKEN or --detail-token-file instead"]
