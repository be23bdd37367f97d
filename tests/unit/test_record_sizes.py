"""A request's size is bounded by its schema, so that whatever a service derives from it fits in a record
(issue 24, item 3: a valid request of about 1 MiB was re-wrapped by billing at 1,048,608 bytes, over the
1 MiB every consumer takes, and never got a status)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from billing.handlers import _received
from cancelflow.events import (
    ID_CHARS,
    MAX_CHARGES,
    NAME_CHARS,
    TEXT_CHARS,
    CancellationApproved,
    CancellationRequested,
    envelope_for,
)
from cancelflow.messaging.codec import MAX_RECORD_BYTES, encode
from cancelflow.messaging.deadletter import dead_letter_record
from cancelflow.topics import MAX_MESSAGE_BYTES

WIDE = "\U0001f600"  # four bytes in UTF-8


def _largest_request(**changes: object) -> CancellationRequested:
    fields: dict[str, object] = dict(
        request_id=uuid.uuid4(), account_id=WIDE * ID_CHARS, target="charges",
        charge_ids=[f"{i:03d}" + WIDE * (ID_CHARS - 3) for i in range(MAX_CHARGES)],
        requested_by={"user_id": WIDE * NAME_CHARS, "role": "customer", "channel": "storefront"},
        reason=WIDE * TEXT_CHARS)
    return CancellationRequested(**{**fields, **changes})


def _size(payload: object) -> int:
    return len(encode(envelope_for(payload, producer="billing", correlation_id=str(uuid.uuid4()),  # type: ignore[arg-type]
                                   causation_id=None)))


def test_everything_derived_from_the_largest_request_fits_many_times_over() -> None:
    request = _largest_request()
    # CancellationReceived carries the whole request; the status view carries it again with its history.
    assert _size(_received(request)) < MAX_RECORD_BYTES // 8
    assert _size(request) < MAX_RECORD_BYTES // 8


@pytest.mark.parametrize("change", [
    {"reason": "x" * (TEXT_CHARS + 1)},
    {"reason": "x" * 1_000_000},
    {"charge_ids": ["c"] * (MAX_CHARGES + 1)},
    {"charge_ids": ["c" * (ID_CHARS + 1)]},
    {"account_id": "a" * (ID_CHARS + 1)},
])
def test_a_request_beyond_the_bounds_is_invalid(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _largest_request(**change)


def test_an_operators_note_is_bounded_too() -> None:
    with pytest.raises(ValidationError):
        CancellationApproved(request_id=uuid.uuid4(), decided_by="op", note="n" * (TEXT_CHARS + 1))


def test_the_dead_letter_record_of_a_1_mib_record_fits_the_topics() -> None:
    value = b'{"payload": {"reason": "' + b"x" * (MAX_RECORD_BYTES - 64) + b'"}}'
    record = SimpleNamespace(topic="cancellations.requested", partition=0, offset=1, key=b"k" * 10_000, value=value)
    dead = dead_letter_record(record, reason="invalid_payload", detail="d" * 100_000, request_id=None,
                              consumer_group="cancelflow-billing")
    assert dead.original_base64 is not None  # kept readable, not only as a digest
    assert _size(dead) + len(dead.record_key()) < MAX_MESSAGE_BYTES
