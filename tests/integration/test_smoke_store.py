from spectral.db import Store


async def test_store_claims_a_published_event(store: Store) -> None:
    gen = (await store.allocate_generation("test", None, None))["generation"]
    event_id = await store.publish("a.b", '{"x": 1}')
    rows = await store.claim(gen, 10, "w1", 60)
    assert [r.id for r in rows] == [event_id]
    assert rows[0].payload == {"x": 1}
