"""Running ``spectral`` as a subprocess: start, wait for a log line, signal, collect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SPECTRAL = [sys.executable, "-m", "spectral"]


class Spectral:
    """A ``spectral ...`` child process whose stderr is captured line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        full_env = {**os.environ, "SPECTRAL_LOG_LEVEL": "INFO", **(env or {})}
        self._attach(subprocess.Popen(
            [*SPECTRAL, *args], env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))

    @classmethod
    def wrap(cls, proc: subprocess.Popen[str]) -> Spectral:
        """Read the output of a process started otherwise (text mode, stdout piped)."""
        self = cls.__new__(cls)
        self._attach(proc)
        return self

    def _attach(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """Block until a line containing ``text`` appears; fail with the output if not."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{text!r} not seen; output:\n{self.output}")
                self._cond.wait(min(remaining, 0.2))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

    def __enter__(self) -> Spectral:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
