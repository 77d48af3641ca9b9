"""A private PgBouncer (Debian's ``pgbouncer``, installed by .ci/run) in front of the test server.

Each test starts its own process on a free loopback port, in the pool mode it asks for,
pointing every database name at the test server; the system service is never used.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the pooler's (a socket ``host=`` dropped)."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    query = {k: v for k, v in parse_qs(parts.query).items() if k != "host"}
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, doseq=True),
                       parts.fragment))


@contextmanager
def pgbouncer(server_url: str, mode: str, *, pool_size: int = 40) -> Iterator[int]:
    """Run PgBouncer in ``mode`` ('session' or 'transaction'); yields its port."""
    if not Path(BINARY).exists():
        raise AssertionError("pgbouncer is not installed: .ci/run installs Debian's pgbouncer")
    target = urlsplit(server_url)
    # A TCP server, or the embedded one on its Unix socket folder (?host=/path).
    host = parse_qs(target.query).get("host", [target.hostname or "127.0.0.1"])[0]
    folder = Path(tempfile.mkdtemp(prefix="spectral-bouncer-"))
    port = free_port()
    users = folder / "users.txt"
    users.write_text('"postgres" ""\n')
    config = folder / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={host} port={target.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {users}\n"
        f"pool_mode = {mode}\n"
        "max_client_conn = 500\n"
        f"default_pool_size = {pool_size}\n"
        # The pooler-side bound on a transaction left open (docs/how-to/poolers.md).
        "idle_transaction_timeout = 600\n"
        f"logfile = {folder / 'pgbouncer.log'}\n"
        f"pidfile = {folder / 'pgbouncer.pid'}\n"
    )
    command = [BINARY, str(config)]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root: it switches to the postgres system user.
        pw = pwd.getpwnam("postgres")
        for path in (folder, users, config):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        command = [BINARY, "-u", "postgres", str(config)]
        if host.startswith("/"):
            # The embedded server's socket lives in a private temporary folder of root's:
            # let the postgres user traverse it (search permission only, nothing readable).
            for path in (Path(host), *Path(host).parents):
                mode = path.stat().st_mode
                if not mode & 0o001:
                    path.chmod(mode | 0o001)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (folder / "pgbouncer.log")
                    raise AssertionError(
                        f"pgbouncer did not start (exit {proc.poll()}): "
                        f"{(log.read_text() if log.exists() else '')[-2000:]}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(folder, ignore_errors=True)
