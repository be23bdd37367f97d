"""Whatever arrives on a topic, decoding ends in a valid message or in a `BadRecord` with a readable
reason, never another exception: a poison record cannot stop a partition (CONTRACT.md section 7).

Hypothesis mutates valid envelopes (dropped, retyped or extra fields, wrong versions and types,
truncated or garbage bytes) and throws raw bytes at the codec. And the other way: what `encode` writes
for generated envelopes is exactly what dumping them with orjson writes, and decodes back."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cancelflow import topics
from cancelflow.events import (
    CancellationRequested,
    Envelope,
    Failed,
    Source,
    SubscriptionActivated,
    ValidationCode,
    envelope_for,
)
from cancelflow.messaging.codec import BadRecord, Message, decode, encode

REASONS = {"empty", "too_large", "not_json", "not_an_envelope", "unknown_event_type", "unknown_schema_version",
           "wrong_topic", "invalid_payload"}
PROFILE = settings(max_examples=300, derandomize=True, deadline=None)


def _valid() -> dict[str, Any]:
    request = CancellationRequested(request_id=uuid.uuid4(), account_id="acct", target="subscription",
                                    subscription_id="sub", mode="past_dated", effective_date="2026-11-01",
                                    requested_by={"user_id": "u", "role": "customer", "channel": "bss"})
    return orjson.loads(encode(envelope_for(request, producer="storefront", correlation_id="c", causation_id=None)))


def _json_values(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | integers | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=8)


# What a producer may send: integers beyond 64 bits too (the standard library writes them; orjson does not).
json_values = _json_values(st.integers(-(2**70), 2**70))
json_values_64 = _json_values(st.integers(-(2**63), 2**63 - 1))
envelope_fields = st.sampled_from(["event_id", "event_type", "schema_version", "occurred_at", "correlation_id",
                                   "causation_id", "producer", "payload"])
# request ids: a UUID (the valid one), or any string (a bad record may name anything)
request_ids = st.uuids().map(str) | st.text(max_size=70)
payload_fields = st.sampled_from(["request_id", "account_id", "requested_by", "target", "subscription_id", "mode",
                                  "effective_date", "quantity", "charge_ids", "requires_approval"])


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> bytes:
    envelope = _valid()
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["drop", "set", "drop_payload", "set_payload", "extra"]))
        if action == "drop":
            envelope.pop(draw(envelope_fields), None)
        elif action == "set":
            envelope[draw(envelope_fields)] = draw(json_values)
        elif isinstance(envelope.get("payload"), dict) and action == "drop_payload":
            envelope["payload"].pop(draw(payload_fields), None)
        elif isinstance(envelope.get("payload"), dict) and action == "set_payload":
            field = draw(payload_fields)
            envelope["payload"][field] = draw(request_ids if field == "request_id" else json_values)
        else:
            envelope[draw(st.text(max_size=10))] = draw(json_values)
    raw = json.dumps(envelope).encode()
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated on the wire
    return raw


def _decoded_or_rejected(raw: bytes | None, topic: str) -> None:
    try:
        message = decode(raw, topic=topic, partition=0, offset=0, key=b"k")
    except BadRecord as bad:
        assert bad.reason in REASONS and bad.detail.strip()
        if bad.request_id is not None:
            # the dead-letter path publishes a `rejected` status for it: that must be possible
            Failed(request_id=bad.request_id, source=Source.validation, code=ValidationCode.bad_input,
                   message=bad.detail)
    else:
        assert isinstance(message, Message) and message.topic == topic


@PROFILE
@given(mutated_envelopes())
def test_mutated_envelopes_are_decoded_or_rejected_with_a_reason(raw: bytes) -> None:
    _decoded_or_rejected(raw, topics.REQUESTED)


@PROFILE
@given(st.binary(max_size=512) | st.none())
def test_arbitrary_bytes_are_rejected_with_a_reason(raw: bytes | None) -> None:
    _decoded_or_rejected(raw, topics.REQUESTED)


@PROFILE
@given(json_values)
def test_any_json_value_is_decoded_or_rejected(value: Any) -> None:
    _decoded_or_rejected(json.dumps(value).encode(), topics.PLATFORM_SUBSCRIPTIONS)


@pytest.mark.parametrize("request_id", ["req-42", "x" * 64, "", "12345678-1234-1234-1234-1234567890"])
def test_a_bad_record_names_a_request_only_by_a_uuid(request_id: str) -> None:
    """A record whose request id is no UUID is dead-lettered without a `rejected` status (there is no
    request it could be about); building one raised, and the consumer stopped on the record."""
    envelope = _valid()
    envelope["payload"]["request_id"] = request_id
    with pytest.raises(BadRecord) as bad:
        decode(orjson.dumps(envelope), topic=topics.REQUESTED)
    assert bad.value.request_id is None
    _decoded_or_rejected(orjson.dumps(envelope), topics.REQUESTED)


@pytest.mark.parametrize("field", ["quantity", "an_unknown_field"])
def test_an_integer_beyond_64_bits_is_read_like_any_other(field: str) -> None:
    """Unknown fields are ignored, whatever their values; a known one is checked (a request to remove 2**70
    licenses is rejected by billing's validation, not by a crash of the decoder)."""
    envelope = _valid()
    envelope["payload"][field] = 2**70
    raw = json.dumps(envelope).encode()  # orjson does not write it; a producer in another language may
    message = decode(raw, topic=topics.REQUESTED)
    assert getattr(message.payload, field, None) == (2**70 if field == "quantity" else None)


def test_a_payload_sent_without_its_envelope_still_names_its_request() -> None:
    bare = _valid()["payload"]
    with pytest.raises(BadRecord) as bad:
        decode(orjson.dumps(bare), topic=topics.REQUESTED)
    assert bad.value.reason == "not_an_envelope" and bad.value.request_id == bare["request_id"]


def test_a_bad_record_names_its_request_in_the_canonical_form() -> None:
    envelope = _valid()
    rid = uuid.uuid4()
    envelope["payload"]["request_id"] = str(rid).upper()
    del envelope["payload"]["account_id"]
    with pytest.raises(BadRecord) as bad:
        decode(orjson.dumps(envelope), topic=topics.REQUESTED)
    assert bad.value.request_id == str(rid)


def _activated() -> dict[str, Any]:
    facts = SubscriptionActivated(
        subscription_id="s", account_id="a", customer={"email": "a@b.c", "name": "n"}, product_name="p",
        vendor="v", vendor_subscription_id="vs", billing_period="monthly", unit_price="1.00", currency="USD",
        quantity=2, status="active", current_period_start="2026-11-01", current_period_end="2026-12-01",
        auto_renew=True)
    return orjson.loads(encode(envelope_for(facts, producer="platform", correlation_id="s", causation_id=None)))


@pytest.mark.parametrize(("where", "field", "value"), [
    ("payload", "quantity", "2"),
    ("payload", "quantity", 2.0),
    ("payload", "auto_renew", "yes"),
    ("payload", "auto_renew", 1),
    ("payload", "current_period_start", 1764547200),
    ("payload", "unit_price", 1),
    ("payload", "unit_price", 1.0),
    ("payload", "account_id", 7),
    ("envelope", "schema_version", True),
    ("envelope", "schema_version", "1"),
    ("envelope", "occurred_at", 1764547200),
])
def test_a_value_of_the_wrong_json_type_is_bad_input(where: str, field: str, value: Any) -> None:
    """CONTRACT.md section 1: wrong types are bad input, not quietly converted."""
    envelope = _activated()
    assert decode(orjson.dumps(envelope), topic=topics.PLATFORM_SUBSCRIPTIONS)  # as it is: fine
    (envelope["payload"] if where == "payload" else envelope)[field] = value
    with pytest.raises(BadRecord) as bad:
        decode(orjson.dumps(envelope), topic=topics.PLATFORM_SUBSCRIPTIONS)
    assert bad.value.reason == ("invalid_payload" if where == "payload" else "not_an_envelope")
    assert field in bad.value.detail


def test_an_event_on_another_topic_is_rejected() -> None:
    facts = SubscriptionActivated(
        subscription_id="s", account_id="a", customer={"email": "a@b.c", "name": "n"}, product_name="p",
        vendor="v", vendor_subscription_id="vs", billing_period="monthly", unit_price="1.00", currency="USD",
        quantity=1, status="active", current_period_start="2026-11-01", current_period_end="2026-12-01",
        auto_renew=True)
    raw = encode(envelope_for(facts, producer="platform", correlation_id="c", causation_id=None))
    try:
        decode(raw, topic=topics.REQUESTED)
    except BadRecord as bad:
        assert bad.reason == "wrong_topic"
    else:
        raise AssertionError("a subscription fact on the request topic was accepted")


@PROFILE
@given(payload=st.dictionaries(st.text(max_size=10), json_values_64, max_size=6), text=st.text(min_size=1),
       micro=st.integers(0, 999_999))
def test_encode_writes_what_dumping_the_envelope_with_orjson_writes(payload: dict[str, Any], text: str,
                                                                     micro: int) -> None:
    envelope = Envelope(event_id=uuid.uuid4(), event_type=text, schema_version=1,
                        occurred_at=datetime(2026, 12, 6, 1, 2, 3, micro, tzinfo=UTC), correlation_id=text,
                        causation_id=None, producer="storefront", payload=payload)
    assert encode(envelope) == orjson.dumps(envelope.model_dump(mode="json"))
    # and it decodes back to the same envelope (with a payload decoding accepts)
    request = envelope.model_copy(update={"event_type": "CancellationRequested", "payload": _valid()["payload"]})
    assert decode(encode(request), topic=topics.REQUESTED).envelope == request
