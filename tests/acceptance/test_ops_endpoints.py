"""/queue and /metrics on their own listener, or behind the detail token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .proc import Spectral

TOKEN = "ops-token-0123456789abcdef"
ENV = {"SPECTRAL_HTTP_PORT": "0", "SPECTRAL_POLL_INTERVAL": "0.2", "SPECTRAL_DRAIN_TIMEOUT": "2",
       "SPECTRAL_DEMO_RATE": "0"}


def _status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_with_an_ops_port_queue_and_metrics_leave_the_main_port(db_url: str, tmp_path: Path) -> None:
    env = {**ENV, "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_OPS_PORT": "0"}
    with Spectral("run", env=env, cwd=tmp_path) as proc:
        line = proc.wait_for("/queue and /metrics only on", timeout=60)
        found = re.search(r"on (http://\S+); /queue and /metrics only on (http://\S+)", line)
        assert found, line
        main, ops = found.group(1), found.group(2)
        proc.wait_for("spectral ready", timeout=60)
        seen = {(where, path): _status(base + path)
                for where, base in (("main", main), ("ops", ops))
                for path in ("/health", "/queue", "/metrics")}
        proc.signal()
        assert proc.wait(30) == 0, proc.output
    assert seen == {("main", "/health"): 200, ("main", "/queue"): 404, ("main", "/metrics"): 404,
                    ("ops", "/health"): 200, ("ops", "/queue"): 200, ("ops", "/metrics"): 200}


def test_with_the_token_required_queue_and_metrics_need_the_bearer_token(
    db_url: str, tmp_path: Path
) -> None:
    env = {**ENV, "SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_OPS_TOKEN_REQUIRED": "true",
           "SPECTRAL_DETAIL_TOKEN": TOKEN}
    with Spectral("run", env=env, cwd=tmp_path) as proc:
        line = proc.wait_for("spectral ready", timeout=60)
        found = re.search(r"http=(http://[^\s\]]+)", line)
        assert found, line
        base = found.group(1)
        seen = {(path, token): _status(base + path, token)
                for path in ("/queue", "/metrics") for token in (None, "wrong-token-0123456789", TOKEN)}
        health = _status(base + "/health")
        proc.signal()
        assert proc.wait(30) == 0, proc.output
    assert health == 200
    assert seen == {("/queue", None): 401, ("/queue", "wrong-token-0123456789"): 401,
                    ("/queue", TOKEN): 200, ("/metrics", None): 401,
                    ("/metrics", "wrong-token-0123456789"): 401, ("/metrics", TOKEN): 200}


def test_requiring_the_token_without_one_is_a_one_line_configuration_error(
    db_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_")}
    env.update(ENV, SPECTRAL_DATABASE_URL=db_url, SPECTRAL_OPS_TOKEN_REQUIRED="true")
    done = subprocess.run([sys.executable, "-m", "spectral", "run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "spectral: error: SPECTRAL_OPS_TOKEN_REQUIRED=true needs SPECTRAL_DETAIL_TOKEN or "
        "SPECTRAL_DETAIL_TOKEN_FILE (the bearer token /queue and /metrics then ask for)")
