"""The fault suite's fast subset: the most telling scenarios with small numbers.

Each runs real ``spectral worker`` processes against PostgreSQL, injects one fault, and
asserts the history checker's figures: nothing lost, no transactional effect twice,
nothing done for a rolled-back publish, and the scenario's own expectations. The whole
suite, with the full numbers and the table for docs/reliability.md, is
``python -m tests.faults.run_all``.
"""

from __future__ import annotations

import signal

import pytest

from ..pg import Server
from .harness import Scene, scalar
from .scenarios import run

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SUBSET = (
    "sigkill-mid-turn",
    "sigkill-after-commit",
    "sigterm-burst",
    "poison",
    "pg-terminate",
    "pg-restart-immediate",
    "pg-down-past-budget",
    "half-open",
    "malformed-input",
    "clock-skew",
)


def _report(figures: object) -> str:
    return f"{figures}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", SUBSET)
def test_nothing_is_lost_or_applied_twice_under(name: str, pg_server: Server) -> None:
    figures = run(name, pg_server)
    assert figures.committed > 0, _report(figures)
    assert figures.failures == [], _report(figures)
    assert (figures.lost, figures.missing_effects, figures.dup_tx, figures.rolled_back_effects) == (
        0, 0, 0, 0), _report(figures)


@pytest.mark.timeout(120)
def test_the_checker_catches_a_handler_writing_outside_its_transaction(pg_server: Server) -> None:
    """The canary: a real run where effects do happen twice, so the suite can fail."""
    scene = Scene("canary", shared=pg_server, env={"SPECTRAL_HANDLER_MAX": "5", "SPECTRAL_CLAIM_TTL": "9"})
    try:
        victim = scene.spawn()
        scene.ready(victim)
        scene.produce(6, topic="fx.canary", payload={"sleep": 4}, rollback_every=0)
        assert scene.wait_for(lambda: scalar(scene.url, "SELECT count(*) FROM fx_effects") == 6, 20,
                              "six canary effects"), scene.tail()
        scene.signal(victim, signal.SIGKILL)
        scene.ready(scene.spawn())
        scene.wait_settled(60)
        figures = scene.finish()
    finally:
        scene.close()
    assert (figures.committed, figures.lost, figures.dup_tx) == (6, 0, 6), _report(figures)
    assert not figures.ok
