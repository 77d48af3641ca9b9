"""deploy/: the Dockerfile, compose.yaml and the CI workflow say what the runbook requires.

No Docker engine is needed: the Dockerfile is read by BuildKit's own parser (the
`dockerfile` package), the YAML files by PyYAML. Every SPECTRAL_* value they set is parsed
by the real Settings.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

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


# --- the Dockerfile, as BuildKit parses it ---------------------------------------------------


def stages(commands: tuple[dockerfile.Command, ...]) -> list[list[dockerfile.Command]]:
    """The instructions of each build stage, in order (a stage starts at its FROM)."""
    out: list[list[dockerfile.Command]] = []
    for command in commands:
        if command.cmd == "FROM":
            out.append([])
        assert out, f"{command.original!r} before the first FROM"
        out[-1].append(command)
    return out


@pytest.fixture(scope="module")
def docker() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def final_stage(docker: tuple[dockerfile.Command, ...]) -> list[dockerfile.Command]:
    return stages(docker)[-1]


def only(stage: list[dockerfile.Command], instruction: str) -> dockerfile.Command:
    found = [c for c in stage if c.cmd == instruction]
    assert len(found) == 1, f"expected one {instruction} in the final stage, found {found}"
    return found[0]


def env_of(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for c in stage:
        if c.cmd == "ENV":
            assert re.match(r"ENV\s+\w+=", c.original), f"ENV in the legacy 'KEY value' form: {c.original!r}"
            # BuildKit keeps a value's quotes for the build's shell-like expansion.
            for key, value in zip(c.value[::2], c.value[1::2], strict=True):
                words = shlex.split(value) or [""]
                assert len(words) == 1, f"ENV {key}: {value!r}"
                env[key] = words[0]
    return env


def test_the_dockerfile_parser_reads_flags_forms_and_stages() -> None:
    parsed = dockerfile.parse_string(
        "FROM a AS b\nRUN x \\\n  && y\nFROM c\nCOPY --from=b /p /q\nENV A=1 B=\"2 3\"\nCMD [\"s\", \"r\"]\n")
    first, second = stages(parsed)
    assert [c.cmd for c in first] == ["FROM", "RUN"] and first[1].value[0].split() == ["x", "&&", "y"]
    assert second[1].flags == ("--from=b",) and second[1].value == ("/p", "/q")
    assert env_of(second) == {"A": "1", "B": "2 3"}
    assert second[-1].json and second[-1].value == ("s", "r")


def test_every_stage_builds_from_python_312_slim(docker: tuple[dockerfile.Command, ...]) -> None:
    bases = [c.value[0] for c in docker if c.cmd == "FROM"]
    assert bases and all(base == "python:3.12-slim" for base in bases), bases


def test_the_package_is_installed_with_pip_not_editable(docker: tuple[dockerfile.Command, ...]) -> None:
    runs = [" ".join(c.value) for c in docker if c.cmd == "RUN"]
    installs = [r for r in runs if re.search(r"pip install \.(\s|$)", r)]
    assert installs, "no `pip install .`"
    assert not any(re.search(r"pip install[^&;]*\s(-e|--editable)\b", r) for r in runs)


def test_the_image_stops_with_sigterm(docker: tuple[dockerfile.Command, ...]) -> None:
    assert only(final_stage(docker), "STOPSIGNAL").value == ("SIGTERM",)


def test_the_healthcheck_calls_health_with_python_urllib(docker: tuple[dockerfile.Command, ...]) -> None:
    check = only(final_stage(docker), "HEALTHCHECK")
    assert check.json and check.value[0] == "CMD"
    argv = check.value[1:]
    assert argv[0] in ("python", "python3") and argv[1] == "-c"
    assert "urllib" in argv[2] and "/health" in argv[2]
    assert "curl" not in check.original and "wget" not in check.original
    assert "SPECTRAL_HTTP_PORT" in argv[2], "the check must follow the configured port"
    assert any(flag.startswith("--timeout=") for flag in check.flags)


def test_the_process_runs_as_a_non_root_user(docker: tuple[dockerfile.Command, ...]) -> None:
    users = [c.value[0] for c in final_stage(docker) if c.cmd == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", "")


def test_the_default_command_is_spectral_run(docker: tuple[dockerfile.Command, ...]) -> None:
    stage = final_stage(docker)
    cmd = only(stage, "CMD")
    assert cmd.json and cmd.value == ("spectral", "run")
    assert not [c for c in stage if c.cmd == "ENTRYPOINT"]


def test_version_json_is_copied_to_app_version_json(docker: tuple[dockerfile.Command, ...]) -> None:
    copies = [c for c in final_stage(docker) if c.cmd == "COPY"]
    matches = [c for c in copies if c.value == ("version.json", "/app/version.json")]
    assert matches, f"no COPY version.json /app/version.json in {[c.original for c in copies]}"
    # The runtime user is not root: the file must not keep a host umask of 077.
    assert any(f.startswith("--chmod=") and int(f.split("=")[1], 8) & 0o004 for f in matches[0].flags)


def test_runtime_environment_and_port(docker: tuple[dockerfile.Command, ...]) -> None:
    stage = final_stage(docker)
    env = env_of(stage)
    assert env["SPECTRAL_VERSION_FILE"] == "/app/version.json"
    assert env["SPECTRAL_HTTP_HOST"] == "0.0.0.0"
    assert only(stage, "WORKDIR").value == ("/app",)
    assert only(stage, "EXPOSE").value == ("8080",)
    settings = Settings.load(environ={k: v for k, v in env.items() if k.startswith("SPECTRAL_")})
    assert settings.http_port == 8080 and settings.version_file == Path("/app/version.json")


def test_the_generation_is_not_baked_into_the_image(docker: tuple[dockerfile.Command, ...]) -> None:
    for c in docker:
        assert "SPECTRAL_GENERATION" not in c.original, c.original


def test_the_build_context_sends_what_the_dockerfile_copies_and_not_git(
    docker: tuple[dockerfile.Command, ...],
) -> None:
    ignore = (DEPLOY / "app.Dockerfile.dockerignore").read_text("utf-8").splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list starts by excluding everything"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    sources = {source for c in docker if c.cmd == "COPY"
               and not any(f.startswith("--from") for f in c.flags) for source in c.value[:-1]}
    assert sources and sources <= allowed, f"COPY sources outside the context: {sources - allowed}"
    assert not {".git", ".env", ".venv"} & allowed


# --- compose's own rules ---------------------------------------------------------------------


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


def test_interpolation_nests_defaults_and_refuses_a_missing_required_variable() -> None:
    assert interpolate("${A:-x${B:-y}z}", {}) == "xyz"
    assert interpolate("${A:-x}", {"A": "1"}) == "1"
    with pytest.raises(LookupError):
        interpolate("${G:?set it}", {"G": ""})
    assert duration_seconds("1m30s") == 90.0


# --- compose.yaml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text("utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def service_environment(compose: dict[str, Any], service: str, environ: dict[str, str]) -> dict[str, str]:
    env = compose["services"][service]["environment"]
    assert isinstance(env, dict), "environment as a mapping, please"
    return {key: interpolate("" if value is None else str(value), environ) for key, value in env.items()}


def test_compose_has_postgres_migrate_and_app(compose: dict[str, Any]) -> None:
    assert {"postgres", "migrate", "app"} <= set(compose["services"])


def test_postgres_is_16_with_a_healthcheck_and_a_volume(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:16(\.\d+)?(-[\w.]+)?", pg["image"])
    test = pg["healthcheck"]["test"]
    assert test and "pg_isready" in test[-1]
    volumes = pg["volumes"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in volumes)
    named = volumes[0].split(":")[0]
    assert named in compose["volumes"], "a named volume, declared"


def test_migrate_is_a_one_shot_spectral_migrate_after_postgres(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["spectral", "migrate"]
    # The string "no": unquoted, YAML would read false, which compose refuses.
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_app_runs_spectral_run_after_postgres_and_migrate(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    assert app["command"][:2] == ["spectral", "run"]
    deps = app["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert any(str(p).endswith(":8080") for p in app["ports"]), app["ports"]


def test_compose_builds_the_image_from_the_dockerfile(compose: dict[str, Any]) -> None:
    for service in ("migrate", "app"):
        build = compose["services"][service]["build"]
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_the_app_requires_a_generation_from_the_environment(compose: dict[str, Any]) -> None:
    raw = compose["services"]["app"]["environment"]["SPECTRAL_GENERATION"]
    assert re.fullmatch(r"\$\{SPECTRAL_GENERATION:\?[^}]+\}", raw), raw
    with pytest.raises(LookupError):
        service_environment(compose, "app", {})
    env = service_environment(compose, "app", {"SPECTRAL_GENERATION": "12"})
    assert env["SPECTRAL_GENERATION"] == "12"
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
    assert "SPECTRAL_GENERATION" not in service_environment(compose, "migrate", {})


def test_the_app_environment_is_valid_settings(compose: dict[str, Any]) -> None:
    env = service_environment(compose, "app", {"SPECTRAL_GENERATION": "3"})
    settings = Settings.load(environ=env)
    settings.validate_runtime()
    assert settings.environment == "production" and settings.generation == 3
    assert settings.database_url is not None
    for name in KILL_SWITCHES:
        assert name in env, f"{name} is not passed to the app"


def test_stop_grace_period_outlasts_the_drain_and_its_watchdog(compose: dict[str, Any]) -> None:
    app = compose["services"]["app"]
    grace = duration_seconds(app.get("stop_grace_period", "10s"))  # docker's default
    env = service_environment(compose, "app", {"SPECTRAL_GENERATION": "1"})
    drain = Settings.load(environ=env).drain_timeout
    assert grace > drain + WATCHDOG_GRACE, (grace, drain)
    # An operator's SPECTRAL_DRAIN_TIMEOUT must not outgrow the fixed grace period.
    assert "${" not in str(app["environment"]["SPECTRAL_DRAIN_TIMEOUT"])


# --- the CI workflow -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    loaded = yaml.safe_load(WORKFLOW.read_text("utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    (job,) = workflow["jobs"].values()
    return list(job["steps"])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield str(key)
            yield from _strings(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _strings(inner)
    else:
        yield str(value)


def step_text(step: dict[str, Any]) -> str:
    """Every key and value of a step, one per line, for searching."""
    return "\n".join(_strings(step))


def test_one_production_deploy_at_a_time_never_cancelled(workflow: dict[str, Any]) -> None:
    concurrency = workflow["concurrency"]
    assert concurrency["group"] == "deploy-production"
    assert concurrency["cancel-in-progress"] is False


def test_the_workflow_steps_run_in_the_runbook_order(workflow: dict[str, Any]) -> None:
    texts = [step_text(s) for s in steps(workflow)]
    order = ["deploy/build-version.sh", "docker build", "spectral migrate",
             "spectral deploy allocate", "spectral deploy rollout", "/health"]
    positions = []
    for needle in order:
        found = [i for i, t in enumerate(texts) if needle in t]
        assert found, f"no step runs {needle!r}"
        positions.append(found[0])
    assert positions == sorted(positions), dict(zip(order, positions, strict=True))


def test_allocate_captures_the_generation_as_json(workflow: dict[str, Any]) -> None:
    (allocate,) = [s["run"] for s in steps(workflow) if "spectral deploy allocate" in s.get("run", "")]
    for flag in ("--reference", "--tag", "--deployed-by", "--json"):
        assert flag in allocate
    assert '["generation"]' in allocate and "GITHUB_OUTPUT" in allocate


def test_rollout_names_the_image_and_generation(workflow: dict[str, Any]) -> None:
    rollouts = [s["run"] for s in steps(workflow) if "spectral deploy rollout" in s.get("run", "")]
    first = rollouts[0]
    for flag in ("--target docker", "--image", "--generation"):
        assert flag in first
    assert "SPECTRAL_GENERATION" not in first.split("spectral deploy rollout")[1]


def test_a_60_second_health_loop_then_a_rollback_on_failure(workflow: dict[str, Any]) -> None:
    all_steps = steps(workflow)
    (health,) = [s for s in all_steps if "/health" in step_text(s)]
    assert health["env"]["HEALTH_SECONDS"] == "60"
    assert "time.monotonic() + seconds" in health["run"]
    assert 'float(os.environ["HEALTH_SECONDS"])' in health["run"]
    last = all_steps[-1]
    assert "failure()" in last.get("if", "")
    assert "spectral deploy rollout" in last["run"]


def test_no_expression_is_pasted_into_a_script(workflow: dict[str, Any]) -> None:
    runs = [s["run"] for s in steps(workflow) if "run" in s]
    assert runs
    for run in runs:
        assert "${{" not in run, run


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


def test_every_production_rollout_in_the_workflow_brings_staging_evidence(
    workflow: dict[str, Any],
) -> None:
    rollouts = [s["run"] for s in steps(workflow) if "spectral deploy rollout" in s.get("run", "")]
    assert len(rollouts) == 2
    for text in rollouts:
        assert '--staging-database-url "$STAGING_DATABASE_URL"' in text
        assert "--override-staging-gate" not in text
    assert "--record deploy-record.md" in rollouts[0] and "--yes" not in rollouts[0]
