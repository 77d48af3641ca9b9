#!/usr/bin/env bash
# Create the benchmark's own virtualenv: Spectral (editable) plus the peers it is measured
# against. Nothing from the peers is vendored; they come from the package index by name.
#
#   bench/setup.sh                 # venv at /tmp/spectral-bench-venv
#   bench/setup.sh /path/to/venv   # or SPECTRAL_BENCH_VENV=/path/to/venv bench/setup.sh
#
# PYTHON picks the interpreter (default python3; Spectral needs 3.11-3.13).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${SPECTRAL_BENCH_VENV:-/tmp/spectral-bench-venv}}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# Peers: the newest releases that install on this interpreter (pip resolves that).
# psycopg[binary] gives procrastinate psycopg's compiled implementation, as deployed.
"$venv/bin/python" -m pip install --quiet -e "$repo" pgqueuer procrastinate "psycopg[binary]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(spectral-outbox|pgqueuer|procrastinate|asyncpg|psycopg|trio) '
echo "bench venv ready: $venv/bin/python $repo/bench/run.py --help"
