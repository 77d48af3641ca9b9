"""Every named SQL block is run by something: a block nobody loads is dead code."""

from __future__ import annotations

import re
from pathlib import Path

from spectral.actors.pruner import KINDS
from spectral.db import _queries

ROOT = Path(__file__).resolve().parents[2]


def test_every_named_query_is_used_by_the_package_a_test_or_a_benchmark() -> None:
    sources = "\n".join(p.read_text("utf-8") for folder in ("spectral", "tests", "bench")
                        for p in (ROOT / folder).rglob("*.py"))
    # The pruner runs PRUNE's blocks by the name of the kind it prunes.
    by_name = {("PRUNE", kind) for kind, _ in KINDS}
    unused = []
    for const, value in vars(_queries).items():
        if not isinstance(value, _queries.Queries):
            continue
        for name in _queries.load(value._filename):
            if (const, name) not in by_name and not re.search(rf"\b{const}\.{name}\b", sources):
                unused.append(f"{value._filename}: {name}")
    assert unused == []
