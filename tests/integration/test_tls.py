"""TLS to PostgreSQL: sslmode and certificate options in the URL, verify-full included.

A private PostgreSQL server (initdb/pg_ctl from the machine's binaries, a free port, a
temporary folder) runs with ssl=on and a server certificate for ``localhost`` signed by a
CA the test generates with the openssl CLI. Its pg_hba accepts TLS connections only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from spectral.db import migrate, open_database
from spectral.db.embedded import _bin_dir
from spectral.errors import DatabaseUnavailableError

from ..bouncer import free_port


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca: Path  # the CA that signed the server certificate
    other_ca: Path  # a CA that did not

    def url(self, host: str = "localhost", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://postgres@{host}:{self.port}/postgres" + (f"?{query}" if query else "")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(folder: Path) -> None:
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN=spectral test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 cwd=folder)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName = DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
             cwd=folder)


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    bindir = _bin_dir()
    assert bindir is not None, "PostgreSQL binaries (initdb, pg_ctl) are needed for this test"
    folder = Path(tempfile.mkdtemp(prefix="spectral-tls-"))
    os.chmod(folder, 0o755)
    _make_certificates(folder)
    pgdata = folder / "data"
    pgdata.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in (pgdata, folder / "server.key", folder / "server.crt"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    os.chmod(folder / "server.key", 0o600)
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres",
                    "--auth=trust"], check=True, capture_output=True, timeout=120)
    port = free_port()
    with open(pgdata / "postgresql.conf", "a") as conf:
        conf.write(f"port = {port}\nlisten_addresses = 'localhost'\n"
                   f"unix_socket_directories = '{pgdata}'\nssl = on\n"
                   f"ssl_cert_file = '{folder / 'server.crt'}'\n"
                   f"ssl_key_file = '{folder / 'server.key'}'\n")
    (pgdata / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n"
        "host all all 127.0.0.1/32 reject\nhost all all ::1/128 reject\n")
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(pgdata), "-w", "-t", "60",
                    "-l", str(pgdata / "server.log"), "start"],
                   check=True, capture_output=True, timeout=90)
    try:
        yield TlsServer(port, folder / "ca.crt", folder / "other-ca.crt")
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _ssl_in_use(url: str) -> bool:
    async def run() -> bool:
        async with open_database(url, pool_size=1) as store:
            return bool(await store.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))

    return trio.run(run)


def _refusal(url: str) -> str:
    with pytest.raises(DatabaseUnavailableError) as info:
        _ssl_in_use(url)
    return str(info.value)


def test_verify_full_with_the_servers_ca_connects_over_tls(tls_server: TlsServer) -> None:
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.ca))
    assert _ssl_in_use(url) is True


def test_verify_full_with_another_ca_is_refused_in_one_line(tls_server: TlsServer) -> None:
    message = _refusal(tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.other_ca)))
    assert "certificate verify failed" in message
    assert len(message.splitlines()) == 1


def test_verify_full_refuses_a_host_the_certificate_does_not_name(tls_server: TlsServer) -> None:
    message = _refusal(tls_server.url("127.0.0.1", sslmode="verify-full",
                                      sslrootcert=str(tls_server.ca)))
    assert "127.0.0.1" in message


def test_verify_ca_accepts_the_ca_whatever_the_host_name(tls_server: TlsServer) -> None:
    url = tls_server.url("127.0.0.1", sslmode="verify-ca", sslrootcert=str(tls_server.ca))
    assert _ssl_in_use(url) is True


def test_sslmode_disable_is_refused_by_a_tls_only_server(tls_server: TlsServer) -> None:
    message = _refusal(tls_server.url(sslmode="disable"))
    assert "pg_hba.conf" in message and "no encryption" in message


def test_migrate_and_the_cli_work_over_verify_full(tls_server: TlsServer, tmp_path: Path) -> None:
    url = tls_server.url(sslmode="verify-full", sslrootcert=str(tls_server.ca))

    async def run() -> int:
        async with open_database(url, pool_size=1):
            return (await migrate(url, None)).current

    assert trio.run(run) >= 7
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTRAL_")}
    env["SPECTRAL_DATABASE_URL"] = url
    done = subprocess.run([sys.executable, "-m", "spectral", "publish", "a.b", "{}"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")
