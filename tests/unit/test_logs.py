"""The driver's warnings reach stderr in Spectral's format, connection errors on one line."""

from __future__ import annotations

import json
import logging

import pytest

from spectral import logs


def _pool_warning_with(exc: BaseException) -> None:
    try:
        raise exc
    except BaseException:
        # What asyncpg's pool logs when it cannot restore its connection floor.
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor; retrying", exc_info=True)


def test_a_refused_connection_is_one_line_in_the_driver_log(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("text")
    _pool_warning_with(ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5499)"))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.endswith("WARNING asyncpg.pool: Failed to restore the pool connection floor; "
                         "retrying: ConnectionRefusedError: [Errno 111] Connect call failed "
                         "('127.0.0.1', 5499)")


def test_driver_warnings_follow_the_json_format_and_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", secrets=("hunter2",))
    _pool_warning_with(TimeoutError("connect to postgresql://u:hunter2@db timed out"))
    [line] = capsys.readouterr().err.splitlines()
    doc = json.loads(line)
    assert doc["logger"] == "asyncpg.pool" and doc["level"] == "WARNING"
    assert doc["msg"].endswith("retrying: TimeoutError: connect to postgresql://u:***@db timed out")
    assert "exc" not in doc


def test_other_driver_errors_keep_their_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("text")
    _pool_warning_with(KeyError("bug"))
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "KeyError: 'bug'" in err


def test_driver_debug_and_info_stay_out(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("text", level="DEBUG")
    logging.getLogger("asyncpg.pool").info("connection opened")
    assert capsys.readouterr().err == ""
