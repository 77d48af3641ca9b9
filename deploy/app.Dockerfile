# syntax=docker/dockerfile:1
# Spectral's one image: `spectral run` serves the HTTP endpoints and runs the workers in
# one process (the runbook's one-container topology). Build from the project root:
#
#   bash deploy/build-version.sh version.json            # REQUIRED first, see below
#   docker build -f deploy/app.Dockerfile \
#       --build-arg SPECTRAL_COMMIT_SHA="$(git rev-parse HEAD)" -t spectral-app .
#
# version.json is written BEFORE `docker build`, on the host or CI runner, by
# deploy/build-version.sh: it needs the git checkout, which is kept out of the build
# context (see app.Dockerfile.dockerignore). The build fails if ./version.json is missing
# or is not a JSON object with a commit_sha, and, when SPECTRAL_COMMIT_SHA is passed as a
# build argument, if it names another commit (a stale file from an earlier build).
#
# Any platform: pgserver (the development database) is only a dependency on x86_64 Linux
# and macOS, where it has wheels. BuildKit is required (COPY --chmod, RUN heredoc).
#
# Not baked in: SPECTRAL_GENERATION (set per deploy on the container: runbook invariant 1)
# and the database URL or any other secret.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README.md is the package's readme in pyproject.toml: the build needs it.
COPY pyproject.toml README.md ./
COPY spectral ./spectral
# A regular (not editable) install into a virtualenv that the runtime stage copies whole.
RUN python -m venv /opt/spectral \
    && /opt/spectral/bin/pip install . \
    && /opt/spectral/bin/spectral --version

FROM python:3.12-slim
RUN groupadd --system --gid 10001 spectral \
    && useradd --system --uid 10001 --gid spectral --home-dir /home/spectral \
       --create-home --shell /usr/sbin/nologin spectral
COPY --from=build /opt/spectral /opt/spectral

# SPECTRAL_ENVIRONMENT=production is the safe default of a deployable image: a container
# started without SPECTRAL_GENERATION, or on an unmigrated database, exits with status 2
# instead of allocating a generation of its own. Set SPECTRAL_ENVIRONMENT=development to
# try the demo app against a scratch database.
ENV PATH=/opt/spectral/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SPECTRAL_ENVIRONMENT=production \
    SPECTRAL_VERSION_FILE=/app/version.json \
    SPECTRAL_HTTP_HOST=0.0.0.0 \
    SPECTRAL_HTTP_PORT=8080

WORKDIR /app
# World-readable whatever the host's umask: the runtime user is not root, and an
# unreadable file would make /version fall back to computed values ("unknown").
COPY --chmod=0444 version.json /app/version.json
ARG SPECTRAL_COMMIT_SHA=""
RUN python - <<'PY'
import json, os, sys
doc = json.load(open("/app/version.json", encoding="utf-8"))
if not (isinstance(doc, dict) and isinstance(doc.get("commit_sha"), str) and doc["commit_sha"]):
    sys.exit("version.json: not a JSON object with a commit_sha; run deploy/build-version.sh")
want = os.environ.get("SPECTRAL_COMMIT_SHA", "")
if want and want != doc["commit_sha"]:
    sys.exit(f"version.json is for commit {doc['commit_sha']}, not {want}: "
             "rerun deploy/build-version.sh before docker build")
print("version.json: commit", doc["commit_sha"])
PY

USER 10001:10001
EXPOSE 8080
# Spectral drains on SIGTERM (stops claiming, finishes in-flight turns within
# SPECTRAL_DRAIN_TIMEOUT, marks its worker row exited). Give the container a stop grace
# period longer than SPECTRAL_DRAIN_TIMEOUT + 5 s (docker stop --time, stop_grace_period).
STOPSIGNAL SIGTERM
# Liveness: /health answers 200 {"status":"ok"}, and 503 while draining. Slim images have
# no curl; urllib is enough. Proxies are bypassed: the check is always local.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('SPECTRAL_HTTP_PORT', '8080') + '/health', timeout=4)"]
# The exec form: spectral is PID 1 and receives SIGTERM itself, not through a shell.
# The demo app runs by default; name yours as an argument, e.g.
#   docker run ... spectral-app spectral run myservice.outbox:app
# (/app is on the import path: an image FROM this one can COPY its module there).
CMD ["spectral", "run"]
