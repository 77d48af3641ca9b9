"""Logging: one line per state transition, as text or JSON lines.

Actors log with ``extra={...}`` (worker_id, generation, event_id, handler, ...); the JSON
formatter puts those fields on the line, the text formatter appends them as key=value.
Secrets are scrubbed from every line.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from .db.urls import scrub

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class _Scrubbing(logging.Formatter):
    secrets: tuple[str, ...] = ()

    def format(self, record: logging.LogRecord) -> str:
        return scrub(self._format(record), *self.secrets)

    def _format(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class TextFormatter(_Scrubbing):
    def _format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        if extra:
            line = f"{line} [{extra}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(_Scrubbing):
    def _format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


#: The database driver's own logger: its warnings go through Spectral's handler.
DRIVER_LOGGER = "asyncpg"


class OneLineConnectionErrors(logging.Filter):
    """The driver's warnings about a server it cannot reach, on one line.

    asyncpg's pool logs every failed attempt to reopen its idle connections with a
    traceback ("Failed to restore the pool connection floor; retrying"). Spectral reports
    the same loss once per consumer (``spectral.reconnect``) and, past the reconnect
    budget, exits with a one-line error; a traceback per retry buried it. Connection
    errors (``OSError``, timeouts, the driver's own exceptions) keep their type and
    message on the line; anything else keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, OSError | TimeoutError)
                                or type(exc).__module__.startswith("asyncpg")):
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure(fmt: str = "text", level: str = "INFO", secrets: tuple[str, ...] = ()) -> None:
    """Send Spectral's logs to stderr in ``fmt`` ('text' or 'json') at ``level``, and the
    driver's warnings and errors in the same format."""
    formatter: _Scrubbing = JsonFormatter() if fmt == "json" else TextFormatter()
    formatter.secrets = tuple(s for s in secrets if s)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger("spectral")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # A handler of its own: a logger's filters do not apply to its children's records
    # (asyncpg.pool), a handler's do.
    driver_handler = logging.StreamHandler(sys.stderr)
    driver_handler.setFormatter(formatter)
    driver_handler.addFilter(OneLineConnectionErrors())
    driver = logging.getLogger(DRIVER_LOGGER)
    driver.handlers[:] = [driver_handler]
    driver.setLevel(logging.WARNING)
    driver.propagate = False
