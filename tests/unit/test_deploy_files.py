"""deploy/: the Dockerfile, compose.yaml and the CI workflow say what the runbook requires.

No Docker engine is needed: the Dockerfile is read instruction by instruction, and the
YAML files (PyYAML is not a dependency) through a small reader of YAML's block style that
is enough for these files. Every SPECTRAL_* value they set is parsed by the real Settings.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from spectral.config import Settings
from spectral.runtime import WATCHDOG_GRACE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "app.Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
WORKFLOW = DEPLOY / "ci" / "deploy-production.yml"

SETTING_VARIABLES = {f.metadata["env"] for f in Settings.fields()}
#: SPECTRAL_* names in deploy/ that are not settings of the runtime.
DEPLOY_ONLY_VARIABLES = {
    "SPECTRAL_COMMIT_SHA",  # build-version.sh and the image's build argument
    "SPECTRAL_APP", "SPECTRAL_IMAGE", "SPECTRAL_PORT",  # compose.yaml's own knobs
}
KILL_SWITCHES = ("SPECTRAL_RECONCILE_ENABLED", "SPECTRAL_LISTEN_ENABLED",
                 "SPECTRAL_REAPER_ENABLED", "SPECTRAL_RETIRE_POLICY")


# --- the Dockerfile, as (stage, instruction, arguments) ----------------------------------


def dockerfile_instructions(text: str) -> list[tuple[int, str, str]]:
    """Instructions with continuation lines joined; comments and heredoc bodies skipped.

    Returns (stage index, INSTRUCTION, arguments); the stage counts FROM lines from 0.
    """
    out: list[tuple[int, str, str]] = []
    stage = -1
    pending = ""
    heredoc: str | None = None
    for raw in text.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage += 1
        out.append((stage, instruction, args.strip()))
        marker = re.search(r"<<-?'?\"?(\w+)'?\"?", args)
        if instruction == "RUN" and marker:
            heredoc = marker.group(1)
    return out


@pytest.fixture(scope="module")
def docker() -> list[tuple[int, str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text("utf-8"))


def final_stage(docker: list[tuple[int, str, str]]) -> list[tuple[str, str]]:
    last = max(stage for stage, _, _ in docker)
    return [(ins, args) for stage, ins, args in docker if stage == last]


def only(stage: list[tuple[str, str]], instruction: str) -> str:
    found = [args for ins, args in stage if ins == instruction]
    assert len(found) == 1, f"expected one {instruction} in the final stage, found {found}"
    return found[0]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, args in stage:
        if ins == "ENV":
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV in the legacy 'KEY value' form: {args!r}"
                env[key] = value
    return env


def test_every_stage_builds_from_python_312_slim(docker: list[tuple[int, str, str]]) -> None:
    bases = [args.split()[0] for _, ins, args in docker if ins == "FROM"]
    assert bases and all(base == "python:3.12-slim" for base in bases), bases


def test_the_package_is_installed_with_pip_not_editable(docker: list[tuple[int, str, str]]) -> None:
    runs = [args for _, ins, args in docker if ins == "RUN"]
    installs = [r for r in runs if re.search(r"pip install \.(\s|$)", r)]
    assert installs, "no `pip install .`"
    assert not any(re.search(r"pip install[^&;]*\s(-e|--editable)\b", r) for r in runs)


def test_the_image_stops_with_sigterm(docker: list[tuple[int, str, str]]) -> None:
    assert only(final_stage(docker), "STOPSIGNAL") == "SIGTERM"


def test_the_healthcheck_calls_health_with_python_urllib(docker: list[tuple[int, str, str]]) -> None:
    check = only(final_stage(docker), "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    argv = json.loads(command)
    assert argv[0] in ("python", "python3") and argv[1] == "-c"
    assert "urllib" in argv[2] and "/health" in argv[2]
    assert "curl" not in check and "wget" not in check
    assert "SPECTRAL_HTTP_PORT" in argv[2], "the check must follow the configured port"
    assert "--timeout=" in options


def test_the_process_runs_as_a_non_root_user(docker: list[tuple[int, str, str]]) -> None:
    users = [args for ins, args in final_stage(docker) if ins == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", "")


def test_the_default_command_is_spectral_run(docker: list[tuple[int, str, str]]) -> None:
    stage = final_stage(docker)
    assert json.loads(only(stage, "CMD")) == ["spectral", "run"]
    assert not [args for ins, args in stage if ins == "ENTRYPOINT"]


def test_version_json_is_copied_to_app_version_json(docker: list[tuple[int, str, str]]) -> None:
    copies = [shlex.split(args) for ins, args in final_stage(docker) if ins == "COPY"]
    matches = [words for words in copies
               if [w for w in words if not w.startswith("--")] == ["version.json", "/app/version.json"]]
    assert matches, f"no COPY version.json /app/version.json in {copies}"
    # The runtime user is not root: the file must not keep a host umask of 077.
    assert any(w.startswith("--chmod=") and int(w.split("=")[1], 8) & 0o004 for w in matches[0])


def test_runtime_environment_and_port(docker: list[tuple[int, str, str]]) -> None:
    stage = final_stage(docker)
    env = env_of(stage)
    assert env["SPECTRAL_VERSION_FILE"] == "/app/version.json"
    assert env["SPECTRAL_HTTP_HOST"] == "0.0.0.0"
    assert only(stage, "WORKDIR") == "/app"
    assert only(stage, "EXPOSE").split() == ["8080"]
    settings = Settings.load(environ={k: v for k, v in env.items() if k.startswith("SPECTRAL_")})
    assert settings.http_port == 8080 and settings.version_file == Path("/app/version.json")


def test_the_generation_is_not_baked_into_the_image(docker: list[tuple[int, str, str]]) -> None:
    for _, ins, args in docker:
        assert "SPECTRAL_GENERATION" not in args, f"{ins} {args}"


def test_the_build_context_sends_what_the_dockerfile_copies_and_not_git() -> None:
    ignore = (DEPLOY / "app.Dockerfile.dockerignore").read_text("utf-8").splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list starts by excluding everything"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    sources = set()
    for _, ins, args in dockerfile_instructions(DOCKERFILE.read_text("utf-8")):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if ins == "COPY" and not args.startswith("--from"):
            sources.update(words[:-1])
    assert sources and sources <= allowed, f"COPY sources outside the context: {sources - allowed}"
    assert not {".git", ".env", ".venv"} & allowed


# --- a small reader of YAML's block style --------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _significant(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def block(lines: list[str], *path: str) -> list[str]:
    """The lines nested under the mapping keys ``path`` (or a block scalar's text), dedented."""
    current = _significant(lines)
    for key in path:
        starts = [i for i, ln in enumerate(current)
                  if _indent(ln) == 0
                  and re.fullmatch(rf"{re.escape(key)}:\s*([|>][-+]?)?\s*(#.*)?", ln.rstrip())]
        assert starts, f"no block {key!r} under {path}"
        body: list[str] = []
        for ln in current[starts[0] + 1:]:
            if _indent(ln) == 0:
                break
            body.append(ln)
        assert body, f"block {key!r} is empty"
        depth = _indent(body[0])
        current = [ln[depth:] for ln in body]
    return current


def scalar(lines: list[str], key: str) -> str | None:
    """The value of ``key: value`` at column 0 of ``lines``, unquoted; None if absent."""
    for ln in lines:
        found = re.fullmatch(rf"{re.escape(key)}:\s+(.+?)(\s+#.*)?", ln.rstrip())
        if _indent(ln) == 0 and found:
            value = found.group(1)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            return value
    return None


def keys(lines: list[str]) -> list[str]:
    return [ln.split(":")[0] for ln in lines if _indent(ln) == 0 and not ln.startswith("-")]


def items(lines: list[str]) -> list[list[str]]:
    """A block sequence's items, each as its lines dedented past the '- '."""
    out: list[list[str]] = []
    for ln in lines:
        if _indent(ln) == 0 and ln.startswith("- "):
            out.append([ln[2:]])
        elif _indent(ln) > 0:
            assert out, f"a continuation line before the first item: {ln!r}"
            out[-1].append(ln[2:])
    return out


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, nested, innermost first.

    Raises:
        LookupError: a required variable is unset (compose refuses to start).
    """
    pattern = re.compile(r"\$\{(\w+)(?:(:?)([-?])([^${}]*))?\}")

    def one(m: re.Match[str]) -> str:
        name, colon, op, arg = m.groups()
        present = name in environ and (environ[name] != "" or not colon)
        if present:
            return environ[name]
        if op == "?":
            raise LookupError(f"{name}: {arg}")
        return arg or ""

    while pattern.search(value):
        value = pattern.sub(one, value)
    return value


def duration_seconds(text: str) -> float:
    """Compose's duration format: 40s, 1m30s, 2m, 1.5s."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * unit[u] for n, u in parts)


def test_the_yaml_reader_reads_nesting_sequences_and_interpolation() -> None:
    text = ["a:", "  # note", "  b:", "    c: 'x'  # why", "    d:", "      - one", "      - two: 2",
            "        three: 3", "e: f"]
    assert scalar(block(text, "a", "b"), "c") == "x"
    assert items(block(text, "a", "b", "d")) == [["one"], ["two: 2", "three: 3"]]
    assert keys(text) == ["a", "e"]
    assert interpolate("${A:-x${B:-y}z}", {}) == "xyz"
    assert interpolate("${A:-x}", {"A": "1"}) == "1"
    with pytest.raises(LookupError):
        interpolate("${G:?set it}", {"G": ""})
    assert duration_seconds("1m30s") == 90.0


# --- compose.yaml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> list[str]:
    return COMPOSE.read_text("utf-8").splitlines()


def service_environment(compose: list[str], service: str, environ: dict[str, str]) -> dict[str, str]:
    env = block(compose, "services", service, "environment")
    assert all(not ln.startswith("-") for ln in env), "environment as a mapping, please"
    return {ln.split(":", 1)[0]: interpolate(scalar(env, ln.split(":", 1)[0]) or "", environ)
            for ln in env if _indent(ln) == 0}


def test_compose_has_postgres_migrate_and_app(compose: list[str]) -> None:
    assert {"postgres", "migrate", "app"} <= set(keys(block(compose, "services")))


def test_postgres_is_16_with_a_healthcheck_and_a_volume(compose: list[str]) -> None:
    pg = block(compose, "services", "postgres")
    assert re.fullmatch(r"postgres:16(\.\d+)?(-[\w.]+)?", scalar(pg, "image") or "")
    test = json.loads(scalar(block(pg, "healthcheck"), "test") or "[]")
    assert test and "pg_isready" in test[-1]
    volumes = [v[2:] for v in block(pg, "volumes")]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in volumes)
    named = volumes[0].split(":")[0]
    assert named in keys(block(compose, "volumes")), "a named volume, declared"


def test_migrate_is_a_one_shot_spectral_migrate_after_postgres(compose: list[str]) -> None:
    migrate = block(compose, "services", "migrate")
    assert json.loads(scalar(migrate, "command") or "[]") == ["spectral", "migrate"]
    assert scalar(migrate, "restart") == "no"
    assert scalar(block(migrate, "depends_on", "postgres"), "condition") == "service_healthy"


def test_the_app_runs_spectral_run_after_postgres_and_migrate(compose: list[str]) -> None:
    app = block(compose, "services", "app")
    assert json.loads(scalar(app, "command") or "[]")[:2] == ["spectral", "run"]
    deps = block(app, "depends_on")
    assert scalar(block(deps, "postgres"), "condition") == "service_healthy"
    assert scalar(block(deps, "migrate"), "condition") == "service_completed_successfully"
    ports = [p[2:].strip("'\"") for p in block(app, "ports")]
    assert any(p.endswith(":8080") for p in ports), ports


def test_compose_builds_the_image_from_the_dockerfile(compose: list[str]) -> None:
    for service in ("migrate", "app"):
        build = block(compose, "services", service, "build")
        context = (COMPOSE.parent / (scalar(build, "context") or ".")).resolve()
        assert (context / (scalar(build, "dockerfile") or "Dockerfile")).resolve() == DOCKERFILE


def test_the_app_requires_a_generation_from_the_environment(compose: list[str]) -> None:
    raw = scalar(block(compose, "services", "app", "environment"), "SPECTRAL_GENERATION") or ""
    assert re.fullmatch(r"\$\{SPECTRAL_GENERATION:\?[^}]+\}", raw), raw
    with pytest.raises(LookupError):
        service_environment(compose, "app", {})
    env = service_environment(compose, "app", {"SPECTRAL_GENERATION": "12"})
    assert env["SPECTRAL_GENERATION"] == "12"
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
    assert "SPECTRAL_GENERATION" not in service_environment(compose, "migrate", {})


def test_the_app_environment_is_valid_settings(compose: list[str]) -> None:
    env = service_environment(compose, "app", {"SPECTRAL_GENERATION": "3"})
    settings = Settings.load(environ=env)
    settings.validate_runtime()
    assert settings.environment == "production" and settings.generation == 3
    assert settings.database_url is not None
    for name in KILL_SWITCHES:
        assert name in env, f"{name} is not passed to the app"


def test_stop_grace_period_outlasts_the_drain_and_its_watchdog(compose: list[str]) -> None:
    app = block(compose, "services", "app")
    grace = duration_seconds(scalar(app, "stop_grace_period") or "10s")  # docker's default
    env = service_environment(compose, "app", {"SPECTRAL_GENERATION": "1"})
    drain = Settings.load(environ=env).drain_timeout
    assert grace > drain + WATCHDOG_GRACE, (grace, drain)
    # An operator's SPECTRAL_DRAIN_TIMEOUT must not outgrow the fixed grace period.
    raw = scalar(block(app, "environment"), "SPECTRAL_DRAIN_TIMEOUT") or ""
    assert "${" not in raw


# --- the CI workflow -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow() -> list[str]:
    return WORKFLOW.read_text("utf-8").splitlines()


def steps(workflow: list[str]) -> list[list[str]]:
    jobs = block(workflow, "jobs")
    (job,) = keys(jobs)
    return items(block(jobs, job, "steps"))


def step_text(step: list[str]) -> str:
    return "\n".join(step)


def test_one_production_deploy_at_a_time_never_cancelled(workflow: list[str]) -> None:
    concurrency = block(workflow, "concurrency")
    assert scalar(concurrency, "group") == "deploy-production"
    assert scalar(concurrency, "cancel-in-progress") == "false"


def test_the_workflow_steps_run_in_the_runbook_order(workflow: list[str]) -> None:
    texts = [step_text(s) for s in steps(workflow)]
    order = ["deploy/build-version.sh", "docker build", "spectral migrate",
             "spectral deploy allocate", "spectral deploy rollout", "/health"]
    positions = []
    for needle in order:
        found = [i for i, t in enumerate(texts) if needle in t]
        assert found, f"no step runs {needle!r}"
        positions.append(found[0])
    assert positions == sorted(positions), dict(zip(order, positions, strict=True))


def test_allocate_captures_the_generation_as_json(workflow: list[str]) -> None:
    (allocate,) = [step_text(s) for s in steps(workflow) if "spectral deploy allocate" in step_text(s)]
    for flag in ("--reference", "--tag", "--deployed-by", "--json"):
        assert flag in allocate
    assert '["generation"]' in allocate and "GITHUB_OUTPUT" in allocate


def test_rollout_names_the_image_and_generation(workflow: list[str]) -> None:
    rollouts = [step_text(s) for s in steps(workflow) if "spectral deploy rollout" in step_text(s)]
    first = rollouts[0]
    for flag in ("--target docker", "--image", "--generation"):
        assert flag in first
    assert "SPECTRAL_GENERATION" not in first.split("spectral deploy rollout")[1]


def test_a_60_second_health_loop_then_a_rollback_on_failure(workflow: list[str]) -> None:
    all_steps = steps(workflow)
    (health,) = [s for s in all_steps if "/health" in step_text(s)]
    assert scalar(block(health, "env"), "HEALTH_SECONDS") == "60"
    assert "time.monotonic() + seconds" in step_text(health)
    assert 'float(os.environ["HEALTH_SECONDS"])' in step_text(health)
    last = all_steps[-1]
    condition = scalar(last, "if") or ""
    assert "failure()" in condition
    assert "spectral deploy rollout" in step_text(last)


def test_no_expression_is_pasted_into_a_script(workflow: list[str]) -> None:
    for step in steps(workflow):
        if any(re.match(r"run:\s*[|>]", ln) for ln in step):
            run = block(step, "run")
        else:
            run = [scalar(step, "run") or ""]
        assert not any("${{" in ln for ln in run), step_text(step)


# --- names across deploy/ ----------------------------------------------------------------------


def test_every_spectral_variable_in_deploy_is_a_real_setting() -> None:
    named: set[str] = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            named |= set(re.findall(r"\bSPECTRAL_[A-Z][A-Z_]*[A-Z]\b", path.read_text("utf-8")))
    unknown = named - SETTING_VARIABLES - DEPLOY_ONLY_VARIABLES
    assert not unknown, f"not settings of spectral/config.py: {sorted(unknown)}"


def test_the_readme_documents_the_kill_switches_and_the_live_one() -> None:
    readme = (DEPLOY / "README.md").read_text("utf-8")
    for name in KILL_SWITCHES:
        assert f"`{name}`" in readme
    assert "`keep` stops hand-overs" in readme or "SPECTRAL_RETIRE_POLICY=keep" in readme
    assert "spectral reconcile off" in readme and "without a restart" in readme
    for path in ("build-version.sh", "app.Dockerfile", "compose.yaml", "ci/deploy-production.yml"):
        assert f"`{path}`" in readme and (DEPLOY / path).is_file()


def test_every_production_rollout_in_the_workflow_brings_staging_evidence(workflow: list[str]) -> None:
    rollouts = [step_text(s) for s in steps(workflow) if "spectral deploy rollout" in step_text(s)]
    assert len(rollouts) == 2
    for text in rollouts:
        assert '--staging-database-url "$STAGING_DATABASE_URL"' in text
        assert "--override-staging-gate" not in text
    assert "--record deploy-record.md" in rollouts[0] and "--yes" not in rollouts[0]
