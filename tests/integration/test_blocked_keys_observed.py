"""Blocked keys as operators see them: the queue snapshot behind /queue and /metrics."""

from __future__ import annotations

import re

from spectral.db import Store
from spectral.metrics import Metrics
from spectral.observe import QueueSnapshot
from spectral.state import RuntimeState


async def test_the_snapshot_and_metrics_show_each_blocked_key_with_its_head(store: Store) -> None:
    await store.allocate_generation("v1", None, None)
    sql = "SELECT core.publish('order.paid', '{}', key => $1)"
    head = await store.fetchval(sql, "order-1")
    await store.fetchval(sql, "order-1")
    await store.fetchval(sql, "order-1")
    await store.fetchval(sql, "order-2")  # pending, not blocked
    await store.execute("UPDATE core.outbox SET status = 'DEAD', dead_reason = 'boom' WHERE id = $1",
                        head)
    snapshot = QueueSnapshot(store, stale_after=10)
    metrics = Metrics(RuntimeState("w", 1), snapshot)
    await snapshot.refresh()
    blocked = snapshot.data["blocked_keys"]
    assert blocked["count"] == 1
    assert [(h["key"], h["head_id"], h["waiting"], h["dead_reason"]) for h in blocked["heads"]] == [
        ("order-1", head, 2, "boom")]
    assert re.search(r"^spectral_blocked_keys 1\.0$", metrics.render().decode(), re.M)

    await store.skip_ids([head])
    await snapshot.refresh()
    assert snapshot.data["blocked_keys"] == {"count": 0, "heads": []}
    assert re.search(r"^spectral_blocked_keys 0\.0$", metrics.render().decode(), re.M)


async def test_the_oldest_due_age_per_generation_is_measured_by_the_database(store: Store) -> None:
    for reference in ("v1", "v2"):
        await store.allocate_generation(reference, None, None)
    await store.execute("SELECT core.publish('a.b', '{}', now() - interval '90 seconds', 1)")
    await store.execute("SELECT core.publish('a.b', '{}', now() - interval '5 seconds', 1)")
    await store.execute("SELECT core.publish('a.b', '{}', now() + interval '1 hour', 2)")
    snapshot = QueueSnapshot(store, stale_after=10)
    metrics = Metrics(RuntimeState("w", 1), snapshot)
    await snapshot.refresh()
    ages = snapshot.data["oldest_due"]
    assert set(ages) == {1, 2}
    assert 90 <= ages[1] < 120
    assert ages[2] == 0  # its only event is not due yet
    text = metrics.render().decode()
    assert re.search(r'^spectral_oldest_due_age_seconds\{generation="1"\} (9\d|1[01]\d)\.', text, re.M)


async def test_commit_to_handled_time_is_observed_per_topic(store: Store) -> None:
    import trio

    import spectral
    from spectral.runtime import run_workers

    from .test_worker_turns import FAST, wait_until

    app = spectral.App(service="t")

    @app.handler("a.one", name="one")
    async def one(event: spectral.Event, tx: spectral.Tx) -> None:
        pass

    @app.handler("a.two", name="two")
    async def two(event: spectral.Event, tx: spectral.Tx) -> None:
        pass

    gen = int((await store.allocate_generation("v1", None, None))["generation"])
    for topic, n in (("a.one", 3), ("a.two", 2)):
        for _ in range(n):
            await store.execute("SELECT core.publish($1, '{}', now() - interval '2 seconds', $2)",
                                topic, gen)
    state = RuntimeState("w-topic", gen)
    metrics = Metrics(state, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_workers, app, FAST, store, state)
        await wait_until(lambda: _none_pending(store), 10)
        state.begin_drain(FAST.drain_timeout)
    text = metrics.render().decode()
    count = r'^spectral_commit_to_handled_by_topic_seconds_count\{topic="%s"\} %d\.0$'
    assert re.search(count % ("a\\.one", 3), text, re.M), text
    assert re.search(count % ("a\\.two", 2), text, re.M), text
    # Each waited at least the 2 s it was due before the workers started: none below 1 s.
    assert re.search(r'_bucket\{le="1\.0",topic="a\.one"\} 0\.0$', text, re.M), text


async def _none_pending(store: Store) -> bool:
    return bool(await store.fetchval("SELECT count(*) = 0 FROM core.outbox WHERE status <> 'DONE'"))
