from datetime import UTC, datetime

from spectral.verdicts import (
    DEAD_TUPLES_WARN,
    HORIZON_WARN_SECONDS,
    SLOT_WARN_XIDS,
    health_verdicts,
    verdicts,
)

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


def _horizon(xact: float | None = None, slot: int | None = None,
             prepared: float | None = None) -> dict[str, object]:
    return {"oldest_xact_seconds": xact, "slot_xid_age": slot, "oldest_prepared_seconds": prepared,
            "oldest_xact": None if xact is None else
            {"pid": 4242, "state": "idle in transaction", "application_name": "psql"}}


def _table(name: str, live: int, dead: int) -> dict[str, object]:
    return {"table": name, "live_tuples": live, "dead_tuples": dead, "total_bytes": 8 * 1048576}


def test_a_quiet_horizon_and_vacuumed_tables_are_healthy() -> None:
    found = health_verdicts([_table("outbox", 1000, 50)], _horizon(xact=2.0))
    assert [(v.name, v.ok) for v in found] == [("xmin_horizon", True), ("table_ok", True)]
    assert "core.outbox: 1000 live, 50 dead tuples, 8.0 MiB" in found[1].message


def test_a_transaction_open_past_five_minutes_holds_back_vacuum() -> None:
    found = health_verdicts([], _horizon(xact=HORIZON_WARN_SECONDS + 1))
    assert [(v.name, v.ok) for v in found] == [("vacuum_held_back", False)]
    assert "pid 4242" in found[0].message and "idle in transaction" in found[0].message
    assert health_verdicts([], _horizon(xact=HORIZON_WARN_SECONDS - 1))[0].ok


def test_a_lagging_slot_or_an_old_prepared_transaction_holds_back_vacuum() -> None:
    slot = health_verdicts([], _horizon(slot=SLOT_WARN_XIDS + 1))[0]
    prepared = health_verdicts([], _horizon(prepared=HORIZON_WARN_SECONDS + 1))[0]
    assert (slot.name, prepared.name) == ("vacuum_held_back", "vacuum_held_back")
    assert "replication slot" in slot.message and "prepared transaction" in prepared.message


def test_dead_tuples_past_the_threshold_and_a_fifth_of_the_live_ones_are_bloat() -> None:
    bloated = health_verdicts([_table("outbox", 100_000, DEAD_TUPLES_WARN + 1)], _horizon())[1]
    assert (bloated.name, bloated.ok) == ("bloat", False)
    # Many dead tuples on a much bigger table are what autovacuum is about to clean.
    big = health_verdicts([_table("outbox", 10_000_000, DEAD_TUPLES_WARN + 1)], _horizon())[1]
    assert big.ok


def test_lost_workers_are_neither_live_nor_stale() -> None:
    found = verdicts([{"generation": 2}], [_worker(2, state="lost")], [], 60)
    assert _names(found) == ["no_workers"]
