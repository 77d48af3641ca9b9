"""The history checker's counting, on hand-built histories: each figure can go wrong."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from .history import History, Row, check, read_outside

pytestmark = pytest.mark.faults

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def done(event_id: int, topic: str = "fx.work", after: float = 1.0) -> Row:
    return Row(event_id, topic, "DONE", None, T0 + timedelta(seconds=after))


def clean() -> History:
    """Two fx.work events and one fan-out event, each applied exactly once."""
    h = History(committed={1: "fx.work", 2: "fx.work", 3: "fx.fan"}, fault_at=T0)
    h.rows = {1: done(1), 2: done(2, after=4.5), 3: done(3, "fx.fan", after=2)}
    h.tx_effects = [("fx.tx", 1, None), ("fx.tx", 2, None), ("fx.fan.a", 3, None), ("fx.fan.b", 3, None)]
    h.outside = [("fx.outside", 1, None), ("fx.outside", 2, None), ("fx.fan.out", 3, None)]
    return h


def test_a_clean_history_has_no_problems_and_recovers_at_the_last_settlement() -> None:
    figures = check("clean", clean())
    assert (figures.committed, figures.lost, figures.missing_effects, figures.dup_tx,
            figures.dup_outside, figures.rolled_back_effects, figures.dead) == (3, 0, 0, 0, 0, 0, 0)
    assert figures.recovery_s == 4.5
    assert figures.ok and figures.problems() == []


def test_a_row_still_pending_or_claimed_or_missing_counts_as_lost() -> None:
    h = clean()
    h.rows[1] = Row(1, "fx.work", "PENDING", None, None)
    h.rows[2] = Row(2, "fx.work", "CLAIMED", None, None)
    del h.rows[3]
    figures = check("lost", h)
    assert figures.lost == 3 and not figures.ok
    assert figures.recovery_s is None, "no recovery time while events are lost"


def test_dead_with_a_reason_is_settled_but_dead_without_one_is_lost() -> None:
    h = clean()
    h.rows[1] = Row(1, "fx.work", "DEAD", "failed 2 of 2 attempts", T0)
    h.rows[2] = Row(2, "fx.work", "DEAD", None, T0)
    figures = check("dead", h)
    assert (figures.dead, figures.lost) == (1, 1)


def test_a_transactional_effect_applied_twice_is_a_duplicate() -> None:
    h = clean()
    h.tx_effects += [("fx.fan.b", 3, None), ("fx.tx", 1, None), ("fx.tx", 1, None)]
    figures = check("dup", h)
    assert figures.dup_tx == 3 and not figures.ok
    assert figures.problems() == ["dup_tx = 3"]


def test_repeated_outside_effects_are_counted_but_allowed() -> None:
    h = clean()
    h.outside += [("fx.outside", 2, None), ("fx.fan.out", 3, None), ("fx.fan.out", 3, None)]
    figures = check("outside", h)
    assert figures.dup_outside == 3 and figures.dup_tx == 0 and figures.ok


def test_a_done_event_missing_any_handler_effect_is_reported() -> None:
    h = clean()
    h.tx_effects.remove(("fx.fan.b", 3, None))
    h.outside.remove(("fx.outside", 2, None))
    figures = check("missing", h)
    assert figures.missing_effects == 2 and not figures.ok


def test_anything_done_for_a_rolled_back_publish_is_counted() -> None:
    h = clean()
    h.rolled_back_ids = {10, 11}
    h.rolled_back_markers = {"rb-1"}
    assert check("rb-none", h).rolled_back_effects == 0
    h.rows[10] = Row(10, "fx.work", "PENDING", None, None)  # the row itself landed
    h.tx_effects.append(("fx.tx", 11, None))  # an effect by id
    h.outside.append(("fx.outside", 99, "rb-1"))  # an effect by marker
    figures = check("rb", h)
    assert figures.rolled_back_effects == 3 and not figures.ok


def test_recovery_is_zero_when_everything_settled_before_the_fault() -> None:
    h = clean()
    h.fault_at = T0 + timedelta(seconds=60)
    assert check("early", h).recovery_s == 0.0


def test_outside_lines_are_read_from_every_process_log(tmp_path: Path) -> None:
    (tmp_path / "outside-10.log").write_text("fx.outside 5 - 10\nfx.fan.out 6 rb-2 10\n")
    (tmp_path / "outside-11.log").write_text("fx.outside 5 - 11\n")
    assert sorted(read_outside(tmp_path)) == [
        ("fx.fan.out", 6, "rb-2"), ("fx.outside", 5, None), ("fx.outside", 5, None)]
