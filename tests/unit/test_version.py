import json
import logging
from pathlib import Path

import pytest

from spectral.version import compute, load


def test_a_version_file_is_served_as_written(tmp_path: Path) -> None:
    path = tmp_path / "version.json"
    path.write_text(json.dumps({"commit_sha": "abc", "lock_hashes": {"x": "y"}}))
    info = load(path)
    assert info.commit_sha == "abc"
    assert info.build["lock_hashes"] == {"x": "y"}
    assert info.build["source"] == str(path)


def test_a_missing_file_falls_back_to_computed_values_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="spectral.version"):
        info = load(tmp_path / "absent.json")
    assert info.build["source"] == "computed"
    assert caplog.records == []


def test_an_unreadable_or_malformed_file_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "version.json"
    for text in ("{not json", "[1, 2]"):
        bad.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spectral.version"):
            info = load(bad)
        assert info.build["source"] == "computed"
        assert len(caplog.records) == 1 and str(bad) in caplog.records[0].getMessage()


def test_computed_lock_hashes_follow_the_build_script_patterns(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "requirements-dev.txt", "uv.lock", "notes.txt"):
        (tmp_path / name).write_text(name)
    build = compute(tmp_path)
    assert sorted(build["lock_hashes"]) == ["pyproject.toml", "requirements-dev.txt", "uv.lock"]
    assert len(build["lock_hashes"]["uv.lock"]) == 64
