"""Producer-side checks: topics and payloads are refused before any I/O, in one line."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest

from spectral import Event
from spectral.errors import (
    InvalidEventError,
    InvalidPayloadError,
    InvalidTopicError,
    PayloadTooLargeError,
    SpectralError,
)
from spectral.events import DEFAULT_MAX_PAYLOAD_BYTES, check_topic, encode_payload


@pytest.mark.parametrize("topic", [
    "a",
    "orders",
    "orders.created",
    "Billing-v2.invoice_paid.EU",
    "0.1.2",
    "a" * 128,
    ".".join(["ab"] * 42) + ".a",  # 128 characters, 43 segments
])
def test_valid_topics_are_returned_unchanged(topic: str) -> None:
    assert len(topic) <= 128
    assert check_topic(topic) is topic


BAD_TOPICS = [
    pytest.param("", id="empty"),
    pytest.param("a" * 129, id="129-chars"),
    pytest.param("orders created", id="space"),
    pytest.param(" orders", id="leading-space"),
    pytest.param(".orders", id="leading-dot"),
    pytest.param("orders.", id="trailing-dot"),
    pytest.param("orders..created", id="double-dot"),
    pytest.param("-orders", id="leading-dash"),
    pytest.param("orders/created", id="slash"),
    pytest.param("orders.créé", id="non-ascii"),
    pytest.param("orders.created\n", id="trailing-newline"),
    pytest.param("orders\ncreated", id="inner-newline"),
    pytest.param("orders.*", id="wildcard"),
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_bad_topics_are_refused_in_one_line(topic: str) -> None:
    with pytest.raises(InvalidTopicError) as info:
        check_topic(topic)
    message = str(info.value)
    assert message.startswith("invalid topic")
    assert "\n" not in message
    assert "1-128 characters" in message


@pytest.mark.parametrize("topic", [None, 5, b"orders", ["orders"], 1.5])
def test_a_topic_that_is_not_a_string_is_refused(topic: object) -> None:
    with pytest.raises(InvalidTopicError, match=f"must be a string, got {type(topic).__name__}$"):
        check_topic(topic)


def test_a_very_long_topic_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidTopicError) as info:
        check_topic("x" * 5000)
    assert len(str(info.value)) < 200
    assert "..." in str(info.value)


def test_a_payload_is_encoded_as_compact_json_text() -> None:
    payload = {"order_id": 42, "items": [1, 2], "note": "ünïcode", "nested": {"ok": True}}
    text = encode_payload(payload)
    assert json.loads(text) == payload
    assert " " not in text.replace("ünïcode", "")
    assert "ünïcode" in text  # kept as UTF-8, not \u escapes


def test_an_empty_object_is_a_valid_payload() -> None:
    assert encode_payload({}) == "{}"


@pytest.mark.parametrize("payload", [
    pytest.param([1, 2], id="list"),
    pytest.param("text", id="string"),
    pytest.param(3, id="int"),
    pytest.param(2.5, id="float"),
    pytest.param(None, id="null"),
    pytest.param(True, id="bool"),
    pytest.param((1, 2), id="tuple"),
    pytest.param('{"looks": "like json"}', id="json-text"),
])
def test_a_payload_that_is_not_an_object_is_refused(payload: object) -> None:
    with pytest.raises(InvalidPayloadError) as info:
        encode_payload(payload)
    message = str(info.value)
    assert message == (
        f"invalid payload: must be a JSON object (dict), got {type(payload).__name__}"
    )


@pytest.mark.parametrize("payload", [
    pytest.param({"tags": {"a", "b"}}, id="set"),
    pytest.param({"x": float("nan")}, id="nan"),
    pytest.param({"x": float("inf")}, id="infinity"),
    pytest.param({"x": [float("-inf")]}, id="nested-infinity"),
    pytest.param({"when": datetime(2026, 1, 1, tzinfo=UTC)}, id="datetime"),
    pytest.param({"raw": b"bytes"}, id="bytes"),
    pytest.param({("a", "b"): 1}, id="tuple-key"),
    pytest.param({"x": object()}, id="object"),
])
def test_a_payload_that_is_not_json_serialisable_is_refused(payload: object) -> None:
    with pytest.raises(InvalidPayloadError) as info:
        encode_payload(payload)
    message = str(info.value)
    assert message.startswith("invalid payload: not JSON-serialisable")
    assert "\n" not in message
    # The encoder's exception is not chained into the user's traceback.
    assert info.value.__suppress_context__


def test_a_nul_character_is_refused_because_jsonb_cannot_store_it() -> None:
    with pytest.raises(InvalidPayloadError, match="jsonb cannot store"):
        encode_payload({"x": "a\x00b"})


def test_the_default_cap_is_256_kib() -> None:
    assert DEFAULT_MAX_PAYLOAD_BYTES == 256 * 1024


def test_a_payload_exactly_at_the_cap_is_accepted() -> None:
    # '{"x":"' + n + '"}' is n + 8 bytes.
    encode_payload({"x": "a" * (DEFAULT_MAX_PAYLOAD_BYTES - 8)})
    assert len(encode_payload({"x": "a" * 92}, max_bytes=100).encode()) == 100


def test_a_payload_over_the_cap_is_refused_in_one_line() -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        encode_payload({"x": "a" * (DEFAULT_MAX_PAYLOAD_BYTES - 7)})
    assert str(info.value) == (
        f"payload too large: {DEFAULT_MAX_PAYLOAD_BYTES + 1} bytes of JSON, "
        f"the cap is {DEFAULT_MAX_PAYLOAD_BYTES} bytes"
    )


def test_the_cap_counts_utf8_bytes_not_characters() -> None:
    payload = {"x": "é" * 46}  # 46 characters, 92 bytes: 100 bytes of JSON
    assert len(encode_payload(payload, max_bytes=100).encode()) == 100
    with pytest.raises(PayloadTooLargeError):
        encode_payload(payload, max_bytes=99)


@pytest.mark.parametrize("error", [InvalidTopicError, InvalidPayloadError, PayloadTooLargeError])
def test_bad_input_errors_share_one_family(error: type[Exception]) -> None:
    assert issubclass(error, InvalidEventError)
    assert issubclass(error, SpectralError)
    # A ValueError too, so generic "bad argument" handling catches it.
    assert issubclass(error, ValueError)


def test_an_event_is_immutable_and_compares_without_its_handler_set() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    event = Event(1, "a.b", {"x": 1}, 3, 1, created, handled_by=frozenset({"h1"}))
    same = Event(1, "a.b", {"x": 1}, 3, 1, created)
    assert event == same
    assert "handled_by" not in repr(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.attempt = 2  # type: ignore[misc]
