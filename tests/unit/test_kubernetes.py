"""deploy/kubernetes/: valid against the Kubernetes schemas, and true to Spectral's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spectral.config import Settings
from spectral.runtime import WATCHDOG_GRACE

FOLDER = Path(__file__).parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(FOLDER.glob("*.yaml"))
#: The oldest Kubernetes release the manifests are meant for, and the newest schemas shipped.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def kind(name: str) -> dict[str, Any]:
    (found,) = [d for d in documents() if d["kind"] == name]
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_folder_holds_a_deployment_a_migrate_job_a_service_and_a_secret() -> None:
    assert sorted(d["kind"] for d in documents()) == ["Deployment", "Job", "Secret", "Service"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = kind("Deployment")
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_grace_period_covers_the_drain_timeout_and_the_watchdog() -> None:
    pod = kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {k: v for k, v in env_of(container).items() if isinstance(v, str)}
    settings = Settings.load(environ=env)
    assert settings.given("drain_timeout"), "the Deployment should state its drain timeout"
    # The watchdog exits the process at drain + grace; the kubelet's SIGKILL must come later.
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout + WATCHDOG_GRACE


def test_the_deployment_runs_one_non_root_read_only_container_with_its_probes() -> None:
    pod = kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = env_of(container)
    assert env["SPECTRAL_GENERATION"].isdigit()
    assert env["SPECTRAL_ENVIRONMENT"] == "production"
    for name, key in (("SPECTRAL_DATABASE_URL", "database-url"), ("SPECTRAL_DETAIL_TOKEN", "detail-token")):
        assert env[name] == {"secretKeyRef": {"name": "spectral", "key": key}}
    Settings.load(environ={k: v for k, v in env.items() if isinstance(v, str)})  # every value parses


def test_the_migrate_job_runs_spectral_migrate_with_the_secret_url() -> None:
    job = kind("Job")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    assert container["args"] == ["spectral", "migrate"] and job["restartPolicy"] == "Never"
    assert env_of(container)["SPECTRAL_DATABASE_URL"] == {
        "secretKeyRef": {"name": "spectral", "key": "database-url"}}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
