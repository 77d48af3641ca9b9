"""`spectral deploy rollout`: start the new generation, health-check it, cut over or roll back.

The flow of the deploy hook in the deploy log, for two targets:

- ``process``: a `spectral run` process on this machine (bare metal, systemd). The new
  process starts beside the old one with its own generation and HTTP port; once its
  /health answers 200 within the health timeout, the old process gets SIGTERM (it drains
  and exits); otherwise the new one is stopped and the old keeps serving.
- ``docker``: the same flow as docker commands (run, inspect health, stop).

One rollout at a time per database (a transaction-scoped advisory lock held by a
transaction open for the whole rollout, safe behind a transaction pooler), and every
outcome is a deploy record (:mod:`spectral.records`) in core.rollouts and, when asked,
in a file. Before anything starts, production rollouts pass the staging gate and every
rollout passes the pre-flight (no claimed work in the old generations, or ``--yes``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from .db import Connection, Store
from .errors import RolloutRefusedError as RolloutRefusedError
from .errors import SpectralError
from .records import Check, RolloutPlan


class RolloutLockedError(SpectralError):
    """Another rollout holds the database's deploy lock."""


@dataclass
class RolloutResult:
    generation: int
    status: str  # "success", "rolled_back" or "dry_run"
    reason: str
    new_process: str | None
    old_process: str | None
    checks: list[Check] = field(default_factory=list)
    rollout_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "status": self.status, "reason": self.reason,
                "new_process": self.new_process, "old_process": self.old_process,
                "checks": [c.as_dict() for c in self.checks]}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body); (0, None) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), None
    except (OSError, ValueError, urllib.error.URLError):
        return 0, None


def health_ok(url: str) -> bool:
    status, body = get_json(url)
    return status == 200 and isinstance(body, dict) and body.get("status") == "ok"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


async def wait_exit(pid: int, seconds: float) -> bool:
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        if not pid_alive(pid):
            return True
        await trio.sleep(0.1)
    return not pid_alive(pid)


@dataclass
class ProcessTarget:
    """Run generations as `spectral run APP` processes on this machine."""

    app: str
    pidfile: Path
    log_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    extra_env: dict[str, str] = field(default_factory=dict)

    def old_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self, generation: int) -> tuple[subprocess.Popen[bytes], str]:
        port = self.port or free_port(self.host)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"generation-{generation}.log"
        env = {**os.environ, **self.extra_env, "SPECTRAL_GENERATION": str(generation),
               "SPECTRAL_HTTP_HOST": self.host, "SPECTRAL_HTTP_PORT": str(port)}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "spectral", "run", self.app], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # it outlives this command
            )
        return proc, f"http://{self.host}:{port}/health"


def docker_commands(
    *, image: str, name: str, generation: int, old_container: str | None, port: int | None,
    drain_seconds: float, env_file: str | None,
) -> dict[str, list[list[str]]]:
    """The docker commands of a rollout, by phase (start, health, cutover, rollback).

    The new container runs beside the old one, so it cannot take the old one's host port:
    without ``port`` docker publishes 8080 on a free host port (the proxy in front moves
    over). The stop timeout covers the drain, the drain watchdog's 5 s and a margin.
    """
    new = f"{name}-g{generation}"
    stop_time = str(int(drain_seconds) + 10)
    publish = "8080" if port is None else f"{port}:8080"
    run = ["docker", "run", "--detach", "--name", new, "--env", f"SPECTRAL_GENERATION={generation}",
           "--publish", publish, "--stop-signal", "SIGTERM", "--stop-timeout", stop_time]
    if env_file:
        run += ["--env-file", env_file]
    run.append(image)
    cutover = [["docker", "stop", "--time", stop_time, old_container]] if old_container else []
    return {
        "start": [run],
        "health": [["docker", "inspect", "--format", "{{.State.Health.Status}}", new]],
        "cutover": cutover,
        "rollback": [["docker", "stop", "--time", stop_time, new], ["docker", "rm", new]],
    }


async def _lock(store: Store) -> Connection:
    conn = await store.connect("spectral-rollout")
    # Held by a transaction left open until the connection closes (see the query).
    if not await conn.try_deploy_lock():
        await conn.aclose()
        raise RolloutLockedError(
            "another rollout holds this database's deploy lock; wait for it to finish"
        )
    return conn


async def smoke_checks(
    base_url: str, *, started_at: datetime, wait: float, say: Any = print,
) -> list[Check]:
    """The deploy log's post-deploy smoke, against the new process before the cut-over.

    ``/queue`` must carry the reconcile block, and the reconciler must run: its block says
    enabled and a pass began (on any worker: they share one pass per interval) after
    ``started_at``, within ``wait`` seconds.
    """
    status, body = await trio.to_thread.run_sync(get_json, base_url + "/queue")
    block = body.get("reconcile") if isinstance(body, dict) else None
    checks = [Check("queue_reconcile_block", status == 200 and isinstance(block, dict),
                    f"GET /queue {status}, reconcile block "
                    + ("present" if isinstance(block, dict) else "missing"))]
    if not isinstance(block, dict):
        checks.append(Check("reconciler_runs", False, "no reconcile block to read"))
        return checks
    if not block.get("enabled"):
        checks.append(Check("reconciler_runs", False, "the reconciler is switched off"))
        return checks
    say(f"waiting up to {wait:g}s for a reconcile pass")
    deadline = trio.current_time() + wait
    while True:
        last = (block or {}).get("last_pass") or {}
        begun = last.get("started_at")
        if begun is not None and datetime.fromisoformat(begun) >= started_at:
            checks.append(Check("reconciler_runs", True,
                                f"pass at {begun} by {last.get('worker_id')}"))
            return checks
        if trio.current_time() >= deadline:
            checks.append(Check("reconciler_runs", False,
                                f"no reconcile pass within {wait:g}s"))
            return checks
        await trio.sleep(0.5)
        _, body = await trio.to_thread.run_sync(get_json, base_url + "/queue")
        block = body.get("reconcile") if isinstance(body, dict) else None


async def rollout_process(
    store: Store, target: ProcessTarget, generation: int, *, health_timeout: float,
    drain_wait: float, plan: RolloutPlan, smoke_wait: float, say: Any = print,
) -> RolloutResult:
    """Roll out ``generation`` as a new process; cut over on health and smoke, else roll back."""
    lock = await _lock(store)
    try:
        old = target.old_pid()
        rollout_id, started_at = await store.begin_record(
            generation, "process", None if old is None else str(old), **plan.begin_fields())
        proc, health_url = target.start(generation)
        say(f"started generation {generation} as pid {proc.pid}; polling {health_url} "
            f"for up to {health_timeout:g}s")
        checks = list(plan.checks)
        reason = ""
        began = trio.current_time()
        deadline = began + health_timeout
        healthy = False
        while trio.current_time() < deadline:
            code = proc.poll()
            if code is not None:
                reason = f"the new process exited with code {code} before it was healthy"
                break
            if await trio.to_thread.run_sync(health_ok, health_url):
                healthy = True
                break
            await trio.sleep(0.5)
        else:
            reason = f"/health did not answer 200 within {health_timeout:g}s"
        checks.append(Check("health", healthy, f"GET /health 200 after {trio.current_time() - began:.1f}s"
                            if healthy else reason))
        if healthy:
            smoke = await smoke_checks(health_url.removesuffix("/health"), started_at=started_at,
                                       wait=smoke_wait, say=say)
            checks += smoke
            failed = [c.name for c in smoke if not c.passed]
            if failed:
                healthy = False
                reason = "smoke checks failed: " + ", ".join(failed)
        if healthy:
            if old is not None:
                say(f"healthy; SIGTERM to the old process {old} (it drains)")
                os.kill(old, signal.SIGTERM)
                drained = await wait_exit(old, drain_wait)
                if not drained:
                    say(f"warning: the old process {old} is still draining after {drain_wait:g}s")
                checks.append(Check("old_generation_drained", drained,
                                    f"pid {old} exited" if drained
                                    else f"pid {old} still draining after {drain_wait:g}s"))
            target.pidfile.parent.mkdir(parents=True, exist_ok=True)
            target.pidfile.write_text(f"{proc.pid}\n")
            result = RolloutResult(generation, "success", "healthy", str(proc.pid),
                                   None if old is None else str(old))
        else:
            say(f"unhealthy: {reason}; stopping the new process")
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if not await wait_exit(proc.pid, 15):
                    proc.kill()
            proc.wait()
            kept = f"; pid {old} keeps serving" if old is not None else ""
            result = RolloutResult(generation, "rolled_back", reason + kept, str(proc.pid),
                                   None if old is None else str(old))
        result.checks, result.rollout_id = checks, rollout_id
        await _finish(store, rollout_id, result)
        return result
    finally:
        await lock.aclose()


async def _finish(store: Store, rollout_id: int, result: RolloutResult) -> None:
    await store.finish_record(
        rollout_id, status=result.status, reason=result.reason, new_process=result.new_process,
        verdict="SUCCESS" if result.status == "success" else "ROLLED_BACK",
        checks=[c.as_dict() for c in result.checks],
        migrations=await store.migrations_since_previous_rollout(rollout_id),
    )


async def rollout_docker(
    store: Store, commands: dict[str, list[list[str]]], generation: int, *, health_timeout: float,
    old_container: str | None, new_container: str, dry_run: bool, plan: RolloutPlan,
    say: Any = print,
) -> RolloutResult:
    """The docker flow; with ``dry_run`` it prints the commands and records nothing.

    The smoke checks need the new container's address, which docker picks: this flow
    records the health check only.
    """
    if dry_run:
        for phase, cmds in commands.items():
            for cmd in cmds:
                say(f"{phase}: {' '.join(cmd)}")
        return RolloutResult(generation, "dry_run", "commands printed", new_container, old_container)
    lock = await _lock(store)
    try:
        rollout_id, _ = await store.begin_record(generation, "docker", old_container,
                                                 **plan.begin_fields())

        def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

        status, reason = "rolled_back", ""
        started = await trio.to_thread.run_sync(run, commands["start"][0])
        if started.returncode != 0:
            reason = f"docker run failed: {started.stderr.strip()[:200]}"
        else:
            deadline = trio.current_time() + health_timeout
            reason = f"the container was not healthy within {health_timeout:g}s"
            while trio.current_time() < deadline:
                health = await trio.to_thread.run_sync(run, commands["health"][0])
                if health.stdout.strip() == "healthy":
                    status, reason = "success", "healthy"
                    break
                await trio.sleep(1)
        for cmd in commands["cutover" if status == "success" else "rollback"]:
            await trio.to_thread.run_sync(run, cmd)
        result = RolloutResult(generation, status, reason, new_container, old_container,
                               [*plan.checks, Check("health", status == "success", reason)],
                               rollout_id)
        await _finish(store, rollout_id, result)
        return result
    finally:
        await lock.aclose()
