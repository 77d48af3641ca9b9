"""The image's entrypoint as PID 1 of a fresh PID namespace, without a Docker engine.

`unshare --pid --fork --mount-proc` gives the process what a container gives it: PID 1,
where the kernel drops every signal the process installed no handler for. The test reads
the Dockerfile's ENV, CMD and HEALTHCHECK, runs the CMD that way with the environment
`docker run -e` would add (database, generation, port), and checks that SIGTERM drains
and exits 0 and that the HEALTHCHECK command passes while it serves and fails after.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dockerfile

from ..pg import query
from .proc import Spectral

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "deploy" / "app.Dockerfile"


def instructions() -> dict[str, list[dockerfile.Command]]:
    """The final stage's instructions as BuildKit's parser reads them: {keyword: [commands]}."""
    commands = dockerfile.parse_file(str(DOCKERFILE))
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    found: dict[str, list[dockerfile.Command]] = {}
    for command in commands[last_from:]:
        found.setdefault(command.cmd, []).append(command)
    return found


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for command in instructions()["ENV"]:
        for key, value in zip(command.value[::2], command.value[1::2], strict=True):
            # BuildKit keeps the quotes; the build's expansion removes them.
            env[key] = "".join(shlex.split(value))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_of(pid: int, timeout: float = 10) -> int:
    """The host pid of the namespace's PID 1 (unshare's only child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("unshare started no child")


def test_the_entrypoint_as_pid_1_drains_on_sigterm_and_its_healthcheck_works(
    db_url: str, tmp_path: Path
) -> None:
    found = instructions()
    cmd = list(found["CMD"][-1].value)
    assert found["CMD"][-1].json and cmd[0] == "spectral"
    assert [c.value for c in found["STOPSIGNAL"]] == [("SIGTERM",)]
    healthcheck = found["HEALTHCHECK"][-1]
    assert healthcheck.json and healthcheck.value[0] == "CMD"
    probe = list(healthcheck.value[1:])

    generation = query(db_url, "INSERT INTO core.deployments (reference) VALUES ('image')"
                               " RETURNING generation")[0]["generation"]
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in image_env().items() if k != "PATH"}
    # What the image puts first on PATH (/opt/spectral/bin) is this checkout's virtualenv here.
    env["PATH"] = venv_bin + os.pathsep + os.environ["PATH"]
    env.update({"SPECTRAL_DATABASE_URL": db_url, "SPECTRAL_GENERATION": str(generation),
                "SPECTRAL_HTTP_PORT": str(port), "SPECTRAL_DEMO_RATE": "20",
                "SPECTRAL_DRAIN_TIMEOUT": "5", "SPECTRAL_VERSION_FILE": str(tmp_path / "version.json")})
    (tmp_path / "version.json").write_text(json.dumps({"commit_sha": "0" * 40}))
    assert env["SPECTRAL_ENVIRONMENT"] == "production"

    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    proc = subprocess.Popen([*unshare, *cmd], env={**os.environ, **env}, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watcher = Spectral.wrap(proc)
    try:
        ready = watcher.wait_for("spectral ready", timeout=60)
        assert re.search(r"\bpid=1\]", ready), ready
        assert subprocess.run(probe, env={**os.environ, **env}, timeout=10).returncode == 0
        watcher.wait_for("published demo.order.created", timeout=20)

        pid1 = child_of(proc.pid)
        os.kill(pid1, signal.SIGTERM)
        assert proc.wait(30) == 0, watcher.output
        watcher.wait_for("drained")
        watcher.wait_for("exiting")
        assert "exit_code=0" in watcher.wait_for("exiting")
        assert subprocess.run(probe, env={**os.environ, **env}, timeout=10,
                              capture_output=True).returncode != 0
        exited = query(db_url, "SELECT state FROM core.workers WHERE generation = $1", generation)
        assert [r["state"] for r in exited] == ["exited"]
        # Nothing was left claimed by the drained worker.
        assert query(db_url, "SELECT count(*) AS n FROM core.outbox WHERE status = 'CLAIMED'")[0]["n"] == 0
    finally:
        watcher.kill()
