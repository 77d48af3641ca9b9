"""Property tests of per-key ordering: random interleavings of keys, failures, retries,
dead events and requeues, with several in-process workers and a generation cutover, on
the real PostgreSQL.

Properties: within a key, events are handled in publish order, one at a time (no two
turns of one key overlap, and the database never holds two claims of one key); a key
whose event is DEAD blocks only itself; every event is handled exactly once.

CI runs a few examples; ``SPECTRAL_PROPERTY_EXAMPLES=200 pytest --timeout 0 ...`` runs more.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import spectral
from spectral.config import Settings
from spectral.db import Store, open_database
from spectral.events import publish_extras
from spectral.runtime import run_workers
from spectral.state import RuntimeState

from ..pg import Server

EXAMPLES = int(os.environ.get("SPECTRAL_PROPERTY_EXAMPLES", "") or 4)
TOPIC = "prop.event"
MAX_ATTEMPTS = 3
SETTINGS = Settings(
    poll_interval=0.05, handler_max=2.0, claim_ttl=30.0, drain_timeout=2.0,
    heartbeat_interval=1.0, reap_interval=0.5, retry_base=0.02, retry_max=0.05,
    max_attempts=MAX_ATTEMPTS, concurrency=6, batch_size=4,
)

scenario_st = st.fixed_dictionaries({
    "events": st.lists(
        st.fixed_dictionaries({
            "key": st.sampled_from(["a", "b", "c", "d", None]),
            "fails": st.integers(0, MAX_ATTEMPTS - 1),
            "poison": st.sampled_from([False] * 9 + [True]),
            "sleep": st.sampled_from([0.0, 0.0, 0.005, 0.02]),
        }),
        min_size=2, max_size=24,
    ),
    "workers": st.integers(1, 3),
    "cutover_at": st.none() | st.integers(0, 23),
})


class _ClaimErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@asynccontextmanager
async def _workers(app: spectral.App, store: Store, generation: int, n: int) -> AsyncIterator[None]:
    states = [RuntimeState(f"w{i}-g{generation}", generation) for i in range(n)]
    async with trio.open_nursery() as nursery:
        for state in states:
            await nursery.start(run_workers, app, SETTINGS, store, state)
        yield
        for state in states:
            state.begin_drain(SETTINGS.drain_timeout)


async def _wait(store: Store, sql: str, *args: Any, seconds: float = 30.0) -> None:
    with trio.fail_after(seconds):
        while True:
            if await store.fetchval(sql, *args):
                return
            await trio.sleep(0.03)


async def _scenario(url: str, scenario: dict[str, Any]) -> None:
    events = scenario["events"]
    running: dict[str, int] = {}
    overlaps: list[str] = []
    healed: set[int] = set()
    app = spectral.App(service="prop")

    @app.handler(TOPIC, name="prop.h")
    async def handle(event: spectral.Event, tx: spectral.Tx) -> None:
        spec = event.payload
        if event.key is not None:
            if event.key in running:
                overlaps.append(f"key {event.key}: {event.id} ran beside {running[event.key]}")
            running[event.key] = event.id
        try:
            await trio.sleep(spec["sleep"])
            if spec["poison"] and event.id not in healed:
                raise RuntimeError("poison")
            if event.attempt <= spec["fails"]:
                raise RuntimeError(f"planned failure {event.attempt}")
            await tx.execute("INSERT INTO handled (key, event_id, generation) VALUES ($1, $2, $3)",
                             event.key, event.id, event.generation)
        finally:
            if event.key is not None:
                running.pop(event.key, None)

    errors = _ClaimErrors()
    logging.getLogger("spectral").addHandler(errors)
    try:
        async with open_database(url, pool_size=20) as store:
            await store.execute("CREATE TABLE handled (seq bigserial PRIMARY KEY, key text,"
                                " event_id bigint NOT NULL, generation bigint NOT NULL)")
            # The database refuses a second claim of one key outright.
            await store.execute("CREATE UNIQUE INDEX one_claim_per_key ON core.outbox (key)"
                                " WHERE status = 'CLAIMED'")
            ids = await _run(app, store, scenario, healed)
            rows = await store.fetch("SELECT key, event_id FROM handled ORDER BY seq")
    finally:
        logging.getLogger("spectral").removeHandler(errors)

    assert overlaps == []
    assert [m for m in errors.messages if "claim" in m] == []
    handled = [r["event_id"] for r in rows]
    assert sorted(handled) == sorted(ids)  # each exactly once
    for key in {e["key"] for e in events if e["key"] is not None}:
        mine = [i for i, e in zip(ids, events, strict=True) if e["key"] == key]
        assert [r["event_id"] for r in rows if r["key"] == key] == mine, key


async def _run(app: spectral.App, store: Store, scenario: dict[str, Any], healed: set[int]) -> list[int]:
    events = scenario["events"]
    cut = scenario["cutover_at"]
    old = int((await store.allocate_generation("old", None, None))["generation"])
    ids: list[int] = []

    async def publish(gen: int, e: dict[str, Any]) -> None:
        ids.append(await store.publish(TOPIC, json.dumps(e), generation=gen,
                                       extras=publish_extras(e["key"])))

    async with _workers(app, store, old, scenario["workers"]):
        for i, e in enumerate(events):
            if i == cut:
                break
            await publish(old, e)
        new = None
        if cut is not None and cut < len(events):
            new = int((await store.allocate_generation("new", None, None))["generation"])
        async with _workers(app, store, new or old, scenario["workers"] if new else 0):
            for e in events[len(ids):]:
                await publish(new or old, e)
            # No key is blocked by another: every event not behind a DEAD one finishes.
            free, poison = _not_behind_poison(ids, events)
            await _wait(store, "SELECT count(*) = $2 FROM core.outbox"
                        " WHERE id = ANY($1::bigint[]) AND status = 'DONE'", free, len(free))
            # A poison event behind another of its key waits (it never runs, so never dies).
            await _wait(store, "SELECT count(*) = $2 FROM core.outbox"
                        " WHERE id = ANY($1::bigint[]) AND status = 'DEAD'", poison, len(poison))
            # Heal every poison event and requeue the dead ones: their keys drain in order.
            healed.update(i for i, e in zip(ids, events, strict=True) if e["poison"])
            assert sorted(await store.requeue_ids(poison)) == sorted(poison)
            await _wait(store, "SELECT count(*) = 0 FROM core.outbox WHERE status <> 'DONE'")
    return ids


def _not_behind_poison(ids: list[int], events: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """The events that must finish while poison blocks its keys, and the poison events
    that must end DEAD (the first of each key, and unkeyed ones)."""
    blocked: set[str] = set()
    free: list[int] = []
    dead: list[int] = []
    for event_id, e in zip(ids, events, strict=True):
        behind = e["key"] is not None and e["key"] in blocked
        if e["poison"]:
            if not behind:
                dead.append(event_id)
            if e["key"] is not None:
                blocked.add(e["key"])
        elif not behind:
            free.append(event_id)
    return free, dead


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenario_st)
# Always run: a DEAD event of the old generation holding its key across the cutover.
@example(scenario={
    "events": [
        {"key": "a", "fails": 1, "poison": False, "sleep": 0.0},
        {"key": "a", "fails": 0, "poison": True, "sleep": 0.0},
        {"key": "b", "fails": 2, "poison": False, "sleep": 0.005},
        {"key": "a", "fails": 0, "poison": False, "sleep": 0.0},
        {"key": None, "fails": 1, "poison": False, "sleep": 0.0},
        {"key": "b", "fails": 0, "poison": False, "sleep": 0.0},
        {"key": "a", "fails": 1, "poison": False, "sleep": 0.02},
    ],
    "workers": 2,
    "cutover_at": 3,
})
# Always run: a poison event waiting behind another poison event of its key (parked).
@example(scenario={
    "events": [
        {"key": "d", "fails": 0, "poison": True, "sleep": 0.0},
        {"key": "c", "fails": 1, "poison": False, "sleep": 0.0},
        {"key": "d", "fails": 0, "poison": True, "sleep": 0.005},
        {"key": "d", "fails": 1, "poison": False, "sleep": 0.0},
        {"key": None, "fails": 0, "poison": True, "sleep": 0.0},
    ],
    "workers": 2,
    "cutover_at": 2,
})
def test_keys_are_handled_in_order_one_at_a_time_and_block_only_themselves(
    pg_server: Server, scenario: dict[str, Any],
) -> None:
    url = pg_server.fresh()
    try:
        trio.run(_scenario, url, scenario)
    finally:
        pg_server.drop(url)
