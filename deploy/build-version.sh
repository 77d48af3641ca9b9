#!/usr/bin/env bash
# Write version.json: the identity of a build, served by GET /version (commit_sha) and
# GET /version/detail (the whole object). Run it from the project root, before
# `docker build` (deploy/app.Dockerfile COPYs ./version.json to /app/version.json):
#
#   bash deploy/build-version.sh [OUTPUT]        # OUTPUT defaults to ./version.json
#
# Keys: commit_sha, built_at, lock_hashes, python, package_version.
#   commit_sha       `git rev-parse HEAD` of the current directory's checkout; outside a
#                    checkout, $SPECTRAL_COMMIT_SHA; else "unknown"
#   built_at         now, UTC, ISO-8601 to the second
#   lock_hashes      sha256 of pyproject.toml, requirements*.txt and *.lock in the current
#                    directory, those that exist, as {file name: hex digest}
#   python           the version of the python3 that runs this script ($PYTHON overrides
#                    which one): build with the image's Python version (3.12) so it matches
#   package_version  [project] version of ./pyproject.toml
#
# The JSON is written by Python, so any value is quoted correctly, and the file replaces
# the old one only once complete. It is made world-readable: the image runs as a non-root
# user, and an unreadable version.json would silently fall back to computed values.
set -euo pipefail

out=${1:-./version.json}
python=${PYTHON:-python3}

if [[ ! -f pyproject.toml ]]; then
    echo "build-version.sh: no pyproject.toml in $PWD; run it from the project root" >&2
    exit 2
fi

commit_sha=""
if command -v git >/dev/null 2>&1 && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    commit_sha=$(git rev-parse --verify --quiet HEAD || true)
    if [[ -n "$commit_sha" && -n "${SPECTRAL_COMMIT_SHA:-}" && "$commit_sha" != "${SPECTRAL_COMMIT_SHA}" ]]; then
        echo "build-version.sh: warning: SPECTRAL_COMMIT_SHA=${SPECTRAL_COMMIT_SHA} differs from" \
             "the checkout's HEAD $commit_sha; using HEAD" >&2
    fi
fi
if [[ -z "$commit_sha" ]]; then
    commit_sha=${SPECTRAL_COMMIT_SHA:-unknown}
fi

# Values reach Python through its argv, never through the program text.
"$python" - "$out" "$commit_sha" <<'PY'
import glob
import hashlib
import json
import os
import platform
import re
import sys
from datetime import datetime, timezone

out, commit_sha = sys.argv[1], sys.argv[2]


def project_version(text):
    """[project] version of a pyproject.toml (tomllib on 3.11+, a plain scan before)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the [project] table's `version = "..."` line
        section = None
        for line in text.splitlines():
            stripped = line.strip()
            header = re.match(r"^\[([^\[\]]+)\]$", stripped)
            if header:
                section = header.group(1).strip()
                continue
            found = re.match(r"""^version\s*=\s*["']([^"']+)["']""", stripped)
            if section == "project" and found:
                return found.group(1)
        return None
    version = tomllib.loads(text).get("project", {}).get("version")
    return version if isinstance(version, str) else None


names = sorted(
    {"pyproject.toml", *glob.glob("requirements*.txt"), *glob.glob("*.lock")}
)
lock_hashes = {}
for name in names:
    if os.path.isfile(name):
        with open(name, "rb") as f:
            lock_hashes[name] = hashlib.sha256(f.read()).hexdigest()

with open("pyproject.toml", encoding="utf-8") as f:
    package_version = project_version(f.read())
if package_version is None:
    print("build-version.sh: warning: pyproject.toml has no static [project] version",
          file=sys.stderr)
    package_version = "unknown"

doc = {
    "commit_sha": commit_sha,
    "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "lock_hashes": lock_hashes,
    "python": platform.python_version(),
    "package_version": package_version,
}

tmp = f"{out}.tmp-{os.getpid()}"
try:
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
finally:
    if os.path.exists(tmp):
        os.remove(tmp)
print(f"build-version.sh: wrote {out} (commit {commit_sha}, {package_version})", file=sys.stderr)
PY
