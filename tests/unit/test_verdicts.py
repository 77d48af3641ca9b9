from datetime import UTC, datetime

from spectral.verdicts import verdicts

NOW = datetime.now(UTC)


def _worker(gen: int, state: str = "running", stale: bool = False, wid: str = "w") -> dict[str, object]:
    return {"worker_id": wid, "generation": gen, "state": state, "stale": stale, "last_seen": NOW}


def _names(found: list) -> list[str]:  # type: ignore[type-arg]
    return [v.name for v in found]


def test_workers_on_the_head_generation_are_healthy() -> None:
    found = verdicts([{"generation": 3}], [_worker(3)], [], 60)
    assert _names(found) == ["healthy"]
    assert found[0].ok


def test_workers_behind_the_head_are_lag() -> None:
    found = verdicts([{"generation": 4}, {"generation": 3}], [_worker(3)], [], 60)
    assert _names(found) == ["lag"]
    assert "head is generation 4" in found[0].message


def test_stale_workers_are_named_and_do_not_count_as_live() -> None:
    found = verdicts([{"generation": 2}], [_worker(2, stale=True, wid="dead-1")], [], 60)
    assert _names(found) == ["no_workers", "stale_workers"]
    assert "dead-1" in found[1].message


def test_unfinished_rows_of_an_older_generation_without_workers_are_stranded() -> None:
    outbox = [
        {"generation": 1, "status": "PENDING", "n": 5},
        {"generation": 1, "status": "CLAIMED", "n": 2},
        {"generation": 1, "status": "DONE", "n": 100},
        {"generation": 2, "status": "PENDING", "n": 9},
    ]
    found = verdicts([{"generation": 2}, {"generation": 1}],
                     [_worker(2), _worker(1, state="exited")], outbox, 60)
    assert _names(found) == ["healthy", "stranded_rows"]
    assert "generation 1 has 7 unfinished rows" in found[1].message


def test_an_older_generation_still_served_is_not_stranded() -> None:
    outbox = [{"generation": 1, "status": "PENDING", "n": 5}]
    found = verdicts([{"generation": 2}, {"generation": 1}], [_worker(2), _worker(1)], outbox, 60)
    assert _names(found) == ["healthy"]


def test_no_deployment_yet() -> None:
    assert _names(verdicts([], [], [], 60)) == ["no_deployments"]
