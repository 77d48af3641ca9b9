"""Run the fault-injection suite and print the history checker's table (markdown).

    .venv/bin/python -m tests.faults.run_all                 # every scenario, full numbers
    .venv/bin/python -m tests.faults.run_all --small         # the subset's numbers
    .venv/bin/python -m tests.faults.run_all --only poison,half-open --out table.md

Uses SPECTRAL_TEST_DATABASE_URL (a superuser URL; each scenario makes its own database)
or an embedded server; scenarios that stop PostgreSQL start a private one. Exits 1 when
any scenario fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..pg import Server
from .history import Figures
from .scenarios import SCENARIOS, run

HEADER = ("| scenario | committed | lost | missing effects | dup tx effects | dup outside effects "
          "| rolled-back effects | DEAD (reason) | recovery s | result |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def row(f: Figures) -> str:
    recovery = "—" if f.recovery_s is None else f"{f.recovery_s:.1f}"
    result = "pass" if f.passed else "FAIL"
    return (f"| {f.scenario} | {f.committed} | {f.lost} | {f.missing_effects} | {f.dup_tx} | "
            f"{f.dup_outside} | {f.rolled_back_effects} | {f.dead} | {recovery} | {result} |")


def table(results: list[Figures]) -> str:
    lines = [HEADER, *(row(f) for f in results), "", "Notes:", ""]
    for f in results:
        for note in f.notes:
            lines.append(f"- {f.scenario}: {note}")
        for failure in f.failures:
            lines.append(f"- {f.scenario}: FAIL {failure}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the fast subset's numbers")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    server = Server()
    results = []
    started = time.monotonic()
    try:
        for name in names:
            t0 = time.monotonic()
            figures = run(name, server, full=not args.small)
            results.append(figures)
            print(f"{name}: {'pass' if figures.passed else 'FAIL'} in {time.monotonic() - t0:.0f}s "
                  f"{figures.failures or ''}", file=sys.stderr, flush=True)
    finally:
        server.close()
    text = table(results) + f"\n\nTotal run time: {time.monotonic() - started:.0f}s\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if all(f.passed for f in results) else 1


if __name__ == "__main__":
    sys.exit(main())
