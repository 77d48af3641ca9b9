"""What runs: version.json written at build time, or values computed in development."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from ._version import __version__

#: Files whose sha256 identifies the dependency set (the lock hashes of version.json);
#: the same patterns as deploy/build-version.sh.
LOCK_PATTERNS = ("pyproject.toml", "requirements*.txt", "*.lock")

log = logging.getLogger("spectral.version")


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _git_sha(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def compute(root: Path) -> dict[str, Any]:
    """version.json's content for the tree at ``root`` (build script and development)."""
    names = sorted({p.name for pattern in LOCK_PATTERNS for p in root.glob(pattern) if p.is_file()})
    locks = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in names}
    return {
        "commit_sha": _git_sha(root) or "unknown",
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "lock_hashes": locks,
        "python": platform.python_version(),
        "package_version": __version__,
        "source": "computed",
    }


@dataclass(frozen=True)
class VersionInfo:
    """The build's identity plus this process's runtime facts."""

    build: dict[str, Any]
    started: float = field(default_factory=time.monotonic)

    @property
    def commit_sha(self) -> str:
        return str(self.build.get("commit_sha") or self.build.get("sha") or "unknown")

    def runtime(self) -> dict[str, Any]:
        return {
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
            "trio": _dist_version("trio"),
            "asyncpg": _dist_version("asyncpg"),
            "hypercorn": _dist_version("hypercorn"),
            "spectral": __version__,
            "platform": platform.platform(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }


def load(path: Path) -> VersionInfo:
    """Read ``path`` (version.json); fall back to values computed from the working tree."""
    try:
        build = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return VersionInfo(compute(Path.cwd()))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): /version shows values computed here instead", path, exc)
        return VersionInfo(compute(Path.cwd()))
    if not isinstance(build, dict):
        log.warning("%s is not a JSON object: /version shows values computed here instead", path)
        return VersionInfo(compute(Path.cwd()))
    build.setdefault("source", str(path))
    return VersionInfo(build)
