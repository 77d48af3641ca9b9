"""An embedded PostgreSQL for development, used when no database URL is given.

The server lives under ``<data_dir>/pgdata`` and keeps running between ``spectral``
commands so the next one reuses it (``spectral db stop`` stops it). It comes from the
``pgserver`` package where that has wheels (CPython 3.11/3.12), otherwise from PostgreSQL
binaries on PATH (``initdb`` and ``pg_ctl``). It listens on a Unix socket only.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbeddedServerError

log = logging.getLogger("spectral.embedded")

_HOW_TO = (
    "give a database URL with --database-url or DATABASE_URL "
    "(e.g. postgresql://postgres@127.0.0.1:5432/postgres)"
)


@dataclass(frozen=True)
class EmbeddedServer:
    pgdata: Path
    url: str
    source: str


def _pgdata(data_dir: Path) -> Path:
    return (data_dir / "pgdata").resolve()


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def start(data_dir: Path) -> EmbeddedServer:
    """Start the embedded server under ``data_dir`` (or reuse the running one).

    Raises:
        EmbeddedServerError: no way to run PostgreSQL here, or it failed to start; the
            message says how to give a database URL instead.
    """
    pgdata = _pgdata(data_dir)
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
            warnings.simplefilter("ignore")
            import pgserver  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return _start_from_path(pgdata)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined,unused-ignore]
        return EmbeddedServer(pgdata, server.get_uri(database="postgres"), "pgserver")
    except Exception as exc:
        raise EmbeddedServerError(
            f"the embedded PostgreSQL failed to start under {pgdata} ({exc}); {_HOW_TO}"
        ) from None


def _let_others_traverse(folder: Path) -> None:
    """Add the search (x) bit for others on ``folder`` and its parents where it lacks.

    The server runs as 'postgres' and must reach its data directory through folders a
    root shell made private (a home directory, a mkdtemp folder). Only traversal is
    granted: the folders' contents stay unreadable to others.
    """
    for path in (folder, *folder.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("letting the postgres user traverse %s (o+x)", path)
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _start_from_path(pgdata: Path) -> EmbeddedServer:
    bindir = _bin_dir()
    if bindir is None:
        raise EmbeddedServerError(
            "no embedded PostgreSQL here: pgserver has no wheel for this Python and "
            f"initdb/pg_ctl are not on PATH; {_HOW_TO}"
        )
    run_as: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as the 'postgres' system user.
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise EmbeddedServerError(
                f"running as root and there is no 'postgres' user to run the server; {_HOW_TO}"
            ) from None
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
        _let_others_traverse(pgdata.parent)
        run_as = ["runuser", "-u", "postgres", "--"]
    try:
        if not (pgdata / "PG_VERSION").exists():
            subprocess.run(
                [*run_as, str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8"],
                check=True, capture_output=True, timeout=120,
            )
        status = subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(pgdata), "status"],
            capture_output=True, timeout=30,
        )
        if status.returncode != 0:
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(pgdata), "-w", "-t", "60",
                 "-l", str(pgdata / "server.log"),
                 "-o", f"-c listen_addresses='' -k {pgdata}", "start"],
                check=True, capture_output=True, timeout=90,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else [str(exc)]
        raise EmbeddedServerError(
            f"the embedded PostgreSQL failed to start under {pgdata} ({' '.join(text)}); {_HOW_TO}"
        ) from None
    return EmbeddedServer(pgdata, f"postgresql://postgres@/postgres?host={pgdata}", "PATH")


def stop(data_dir: Path) -> bool:
    """Stop the embedded server under ``data_dir``; False when none was running."""
    pgdata = _pgdata(data_dir)
    if not (pgdata / "postmaster.pid").exists():
        return False
    bindir: Path | None
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        bindir = Path(POSTGRES_BIN_PATH)
    except ImportError:
        bindir = _bin_dir()
    if bindir is None:
        raise EmbeddedServerError("cannot find pg_ctl to stop the embedded server")
    run_as: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwuid(pgdata.stat().st_uid).pw_name
        run_as = ["runuser", "-u", owner, "--"]
    result = subprocess.run(
        [*run_as, str(bindir / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast", "stop"],
        capture_output=True, timeout=60,
    )
    return result.returncode == 0
