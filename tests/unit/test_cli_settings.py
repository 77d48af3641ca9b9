"""Each command's --help names, and its flags accept, only the settings it reads."""

from __future__ import annotations

import re

import pytest

from spectral.cli import main
from spectral.config import Settings

CONNECTION = {"--database-url", "--database-url-file", "--pooler", "--data-dir", "--log-format",
              "--log-level"}
EXPECTED = {
    ("migrate",): CONNECTION | {"--max-payload-bytes", "--heartbeat-interval"},
    ("publish", "a.b", "{}"): CONNECTION | {"--generation", "--environment", "--max-payload-bytes"},
    ("requeue", "--id", "1"): CONNECTION,
    ("inspect",): CONNECTION | {"--heartbeat-interval"},
    ("deploy", "allocate", "--reference", "x"): CONNECTION,
    ("deploy", "rollout"): CONNECTION | {"--generation", "--environment", "--drain-timeout",
                                         "--heartbeat-interval", "--reconcile-interval"},
    ("deploy", "history"): CONNECTION,
    ("prune",): CONNECTION | {"--prune-enabled", "--prune-interval", "--prune-batch",
                              "--retain-done", "--retain-dead", "--retain-workers",
                              "--retain-records", "--worker-lost-after"},
    ("reconcile", "status"): CONNECTION,
    ("db", "start"): {"--data-dir", "--log-format", "--log-level"},
}


def settings_flags(capsys: pytest.CaptureFixture[str], *command: str) -> set[str]:
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    section = text.split("settings (flags override environment variables):", 1)[1]
    return set(re.findall(r"^  (--[a-z-]+) VALUE", section, re.MULTILINE))


@pytest.mark.parametrize("command", list(EXPECTED), ids=" ".join)
def test_a_command_lists_only_the_settings_it_reads(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    assert settings_flags(capsys, *command) == EXPECTED[command]


@pytest.mark.parametrize("command", ["run", "worker", "api"])
def test_the_runtime_commands_list_every_setting(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    every = {"--" + f.name.replace("_", "-") for f in Settings.fields() if f.metadata["flag"]}
    assert len(every) >= 34
    assert settings_flags(capsys, command, "x:app") == every


def test_a_setting_flag_a_command_does_not_read_is_a_usage_error(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["deploy", "allocate", "--reference", "x", "--concurrency", "5"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --concurrency 5" in capsys.readouterr().err
