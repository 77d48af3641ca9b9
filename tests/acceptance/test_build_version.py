"""deploy/build-version.sh run with bash, and its version.json read by spectral.version.

Also the image's own checks, run outside Docker: the build step that refuses a missing or
stale version.json, and the HEALTHCHECK command against a loopback /health.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import platform
import re
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spectral.version import load

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "build-version.sh"
DOCKERFILE = ROOT / "deploy" / "app.Dockerfile"
KEYS = {"commit_sha", "built_at", "lock_hashes", "python", "package_version"}


def run_script(
    *args: str, cwd: Path, env: dict[str, str] | None = None, umask: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "SPECTRAL_COMMIT_SHA"}
    # The python3 that runs the script is this test's interpreter, so its version is known.
    full_env = {**base, "PYTHON": sys.executable, **(env or {})}
    command = ["bash", str(SCRIPT), *args]
    if umask is not None:
        command = ["bash", "-c", f'umask {umask} && exec "$@"', "bash", *command]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)


def git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    return out.stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def project_version() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["version"]
    assert isinstance(version, str)
    return version


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A directory with a copy of pyproject.toml and no git checkout above it."""
    work = tmp_path / "src"
    work.mkdir()
    (work / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    # git must not find a repository in any parent of the temporary directory.
    yield work, {"GIT_CEILING_DIRECTORIES": str(tmp_path), "GIT_DIR": str(tmp_path / "no-git")}


def test_version_json_of_the_checkout(tmp_path: Path) -> None:
    out = tmp_path / "version.json"
    before = git_head()
    result = run_script(str(out), cwd=ROOT)
    after = git_head()
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text("utf-8"))

    assert set(doc) == KEYS
    assert doc["commit_sha"] in (before, after)  # others may commit while the test runs
    assert re.fullmatch(r"[0-9a-f]{40}", doc["commit_sha"])
    assert doc["lock_hashes"]["pyproject.toml"] == sha256(ROOT / "pyproject.toml")
    expected = {p.name for pattern in ("pyproject.toml", "requirements*.txt", "*.lock")
                for p in ROOT.glob(pattern) if p.is_file()}
    assert set(doc["lock_hashes"]) == expected
    assert doc["package_version"] == project_version()
    assert doc["python"] == platform.python_version()
    built_at = datetime.fromisoformat(doc["built_at"])
    assert built_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - built_at) < timedelta(minutes=2)

    info = load(out)
    assert info.commit_sha == doc["commit_sha"]
    # Read from the file, not the computed fallback (which would also find HEAD here).
    assert info.build["source"] == str(out)
    assert info.build["built_at"] == doc["built_at"]
    assert info.build["lock_hashes"] == doc["lock_hashes"]


def test_outside_a_checkout_the_commit_comes_from_spectral_commit_sha(
    outside: tuple[Path, dict[str, str]],
) -> None:
    work, no_git = outside
    (work / "requirements-dev.txt").write_text("pytest\n")
    (work / "uv.lock").write_text("version = 1\n")
    (work / "notes.txt").write_text("not a lock file\n")
    sha = "0123456789abcdef0123456789abcdef01234567"

    result = run_script(cwd=work, env={**no_git, "SPECTRAL_COMMIT_SHA": sha})  # default output
    assert result.returncode == 0, result.stderr
    doc = json.loads((work / "version.json").read_text("utf-8"))
    assert doc["commit_sha"] == sha
    assert doc["lock_hashes"] == {
        name: sha256(work / name) for name in ("pyproject.toml", "requirements-dev.txt", "uv.lock")
    }
    assert doc["package_version"] == project_version()
    assert load(work / "version.json").commit_sha == sha


def test_outside_a_checkout_without_a_sha_the_commit_is_unknown(
    outside: tuple[Path, dict[str, str]],
) -> None:
    work, no_git = outside
    result = run_script("v.json", cwd=work, env=no_git)
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "v.json").read_text("utf-8"))["commit_sha"] == "unknown"


def test_any_sha_text_is_quoted_into_valid_json(outside: tuple[Path, dict[str, str]]) -> None:
    work, no_git = outside
    awkward = 'a"b\\c $(x) `y` \u00e9'
    result = run_script("v.json", cwd=work, env={**no_git, "SPECTRAL_COMMIT_SHA": awkward})
    assert result.returncode == 0, result.stderr
    assert load(work / "v.json").commit_sha == awkward


def test_the_file_is_readable_by_the_image_user_whatever_the_umask(
    outside: tuple[Path, dict[str, str]],
) -> None:
    work, no_git = outside
    result = run_script("v.json", cwd=work, env=no_git, umask="077")
    assert result.returncode == 0, result.stderr
    mode = stat.S_IMODE((work / "v.json").stat().st_mode)
    assert mode & 0o444 == 0o444, oct(mode)
    assert sorted(p.name for p in work.iterdir()) == ["pyproject.toml", "v.json"], "no temp file left"


def test_without_pyproject_it_fails_and_writes_nothing(tmp_path: Path) -> None:
    result = run_script("v.json", cwd=tmp_path)
    assert result.returncode == 2
    assert "pyproject.toml" in result.stderr
    assert not (tmp_path / "v.json").exists()


# --- the image's checks, outside Docker -------------------------------------------------------


def dockerfile_heredoc() -> str:
    """The Python program of the Dockerfile's RUN ... <<'PY' step (the version.json check)."""
    found = re.search(r"^RUN python - <<'PY'\n(.*?)^PY$", DOCKERFILE.read_text("utf-8"), re.S | re.M)
    assert found, "the Dockerfile no longer checks version.json with a RUN heredoc"
    return found.group(1)


def run_build_check(version_json: Path, commit: str = "") -> subprocess.CompletedProcess[str]:
    program = dockerfile_heredoc().replace('"/app/version.json"', json.dumps(str(version_json)))
    assert str(version_json) in program
    env = {**os.environ, "SPECTRAL_COMMIT_SHA": commit}
    return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_image_build_refuses_a_bad_or_stale_version_json(tmp_path: Path) -> None:
    good = tmp_path / "version.json"
    good.write_text(json.dumps({"commit_sha": "abc123", "built_at": "x"}))
    assert run_build_check(good).returncode == 0
    assert run_build_check(good, commit="abc123").returncode == 0
    stale = run_build_check(good, commit="def456")
    assert stale.returncode != 0 and "rerun deploy/build-version.sh" in stale.stderr
    for bad in ('["abc123"]', '{"sha": ""}', '{"commit_sha": ""}'):
        good.write_text(bad)
        assert run_build_check(good).returncode != 0, bad


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}' if code == 200 else b'{"status": "draining"}')

    def log_message(self, format: str, *args: object) -> None:
        pass


def healthcheck_argv() -> list[str]:
    line = next(ln for ln in DOCKERFILE.read_text("utf-8").splitlines() if "CMD [\"python\"" in ln)
    argv = json.loads(line.split("CMD", 1)[1])
    assert isinstance(argv, list)
    return [sys.executable if argv[0] in ("python", "python3") else argv[0], *argv[1:]]


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_healthcheck_passes_on_200_and_fails_while_draining(status: int, healthy: bool) -> None:
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "SPECTRAL_HTTP_PORT": str(server.server_address[1]),
               "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
        result = subprocess.run(healthcheck_argv(), env=env, capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert (result.returncode == 0) is healthy, result.stderr


def test_the_healthcheck_fails_when_nothing_listens() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    server.server_close()  # the port is now free
    env = {**os.environ, "SPECTRAL_HTTP_PORT": str(port)}
    result = subprocess.run(healthcheck_argv(), env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
