"""Turning record bytes into envelopes and payloads, and back; every way a record can be bad."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, TypeVar

import orjson
from pydantic import ValidationError

from cancelflow.events import REGISTRY, Envelope, Payload
from cancelflow.messaging.store import KEY_CHARS

MAX_RECORD_BYTES = 1024 * 1024  # CONTRACT.md section 7
# Set by the outbox relay on every record: consumers skip types they do not handle without decoding.
EVENT_TYPE_HEADER = "cf-event-type"


class BadRecord(Exception):
    """A record that no handler may see. `reason` is a short code, `detail` reads as a sentence."""

    def __init__(self, reason: str, detail: str, *, request_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.request_id = request_id


# The payload's class: `Message[VendorProvisioned]` is what a handler of that event receives.
P_co = TypeVar("P_co", bound=Payload, covariant=True)


@dataclass(frozen=True)
class Message(Generic[P_co]):
    """A decoded record: the envelope, its typed payload, and where it came from."""

    envelope: Envelope
    payload: P_co
    topic: str
    partition: int
    offset: int
    key: str | None

    @cached_property
    def event_id(self) -> str:  # asked for several times per record (inbox, logs, causation)
        return str(self.envelope.event_id)

    @property
    def event_type(self) -> str:
        return self.envelope.event_type


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in errors[:3]]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def _guess_request_id(data: Any) -> str | None:
    """The request a bad record speaks for, when it names one: a UUID, as every request id is (CONTRACT.md
    section 4). Anything else names no request: a `rejected` status could not carry it."""
    if not isinstance(data, dict):
        return None
    payload = data.get("payload")
    # In the payload; or at the top, when a producer sent the payload without its envelope.
    candidate = payload.get("request_id") if isinstance(payload, dict) else data.get("request_id")
    if not isinstance(candidate, str) or not 0 < len(candidate) <= 64:
        return None
    try:
        return str(uuid.UUID(candidate))
    except ValueError:
        return None


def decode(value: bytes | None, *, topic: str, partition: int = 0, offset: int = 0,
           key: bytes | None = None) -> Message[Payload]:
    if value is None:
        raise BadRecord("empty", "the record has no value (tombstone or empty)")
    if len(value) > MAX_RECORD_BYTES:
        raise BadRecord("too_large", f"the record is {len(value)} bytes, over the 1 MiB limit")
    # Strict, as JSON (CONTRACT.md section 1: wrong types are bad input): `"2"` is no quantity, `1` no
    # date, `"yes"` no bool. Parsed once by pydantic-core; orjson reads a record only to say what is wrong.
    try:
        envelope = Envelope.model_validate_json(value, strict=True)
    except ValidationError as exc:
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError as not_json:
            raise BadRecord("not_json", f"the record is not JSON: {not_json}") from None
        raise BadRecord("not_an_envelope", _first_error(exc), request_id=_guess_request_id(data)) from None
    request_id = _guess_request_id({"payload": envelope.payload})
    # Every contract key is an id, far shorter; the outbox could not hold this one (in the DLQ it is fitted).
    if key is not None and len(key) > KEY_CHARS and len(text_key := key.decode("utf-8", "replace")) > KEY_CHARS:
        raise BadRecord("key_too_long", f"the record key has {len(text_key)} characters, over {KEY_CHARS}",
                        request_id=request_id)
    model = REGISTRY.get((envelope.event_type, envelope.schema_version))
    if model is None:
        known = any(t == envelope.event_type for t, _ in REGISTRY)
        reason = "unknown_schema_version" if known else "unknown_event_type"
        detail = (f"{envelope.event_type} version {envelope.schema_version} is not known"
                  if known else f"event type {envelope.event_type!r} is not known")
        raise BadRecord(reason, detail, request_id=request_id)
    if model.topic != topic:
        raise BadRecord("wrong_topic", f"{envelope.event_type} does not belong on {topic}",
                        request_id=request_id)
    try:
        body = orjson.dumps(envelope.payload)
    except TypeError:  # an integer beyond 64 bits, which orjson does not write: the standard library does
        body = json.dumps(envelope.payload).encode()
    try:
        payload = model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise BadRecord("invalid_payload", _first_error(exc), request_id=request_id) from None
    return Message(envelope, payload, topic, partition, offset, key.decode("utf-8", "replace") if key else None)


_ENVELOPE_JSON = Envelope.__pydantic_serializer__


def encode(envelope: Envelope) -> bytes:
    """The record value: the envelope as compact JSON, written by pydantic-core in one pass (the same
    bytes as `orjson.dumps(envelope.model_dump(mode="json"))`, in about half the time; one encode per
    record every service emits)."""
    return _ENVELOPE_JSON.to_json(envelope)
