"""CONTRACT.md section 10 in parts: `SignatureCheck` on every upstream and internal topic, the owners of
each internal event type, the settings that turn it on, and the relay's signed headers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from cancelflow import events, topics
from cancelflow.messaging.relay import OutboxRelay
from cancelflow.messaging.signatures import (
    INTERNAL_TOPICS,
    UPSTREAM_TOPICS,
    SignatureCheck,
    parse_keys,
    sign,
    signature_headers,
)
from cancelflow.settings import CommonSettings
from cancelflow_tools.services import SERVICES, service_settings
from cancelflow_tools.stack.embedded import child_env

ROOT = Path(__file__).resolve().parents[2]
VALUE = b'{"event_type": "ChargeCaptured"}'
UPSTREAM = SignatureCheck.from_text("storefront:new,storefront:old,platform:plat")
SERVICE_KEYS = ",".join(f"{s}:{s}-key" for s in SERVICES)
BOTH = SignatureCheck.from_text("platform:plat", SERVICE_KEYS)


def signed(value: bytes, name: str, key: str) -> list[tuple[str, bytes]]:
    return [("cf-producer", name.encode()), ("cf-signature", sign(value, key).encode())]


def test_the_checked_topics_are_the_three_upstream_and_the_three_internal_ones() -> None:
    assert UPSTREAM_TOPICS == {"cancellations.requested", "platform.subscriptions", "payments.charges"}
    assert INTERNAL_TOPICS == {"cancellations.saga", "cancellations.status", "cancellations.dlq"}
    assert UPSTREAM_TOPICS | INTERNAL_TOPICS == {t.name for t in topics.TOPICS}


@pytest.mark.parametrize("topic", ["cancellations.requested", "platform.subscriptions", "payments.charges"])
def test_every_upstream_topic_needs_a_producer_signature(topic: str) -> None:
    assert UPSTREAM is not None
    assert UPSTREAM.problem(topic, VALUE, signed(VALUE, "platform", "plat")) is None
    assert UPSTREAM.problem(topic, VALUE, signed(VALUE, "storefront", "old")) is None  # rotation
    assert "not signed" in UPSTREAM.problem(topic, VALUE, None)  # type: ignore[operator]
    assert "not signed" in UPSTREAM.problem(topic, VALUE, [("cf-producer", b"platform")])  # type: ignore[operator]
    assert "not a configured producer" in UPSTREAM.problem(  # type: ignore[operator]
        topic, VALUE, signed(VALUE, "mallory", "plat"))
    assert "does not match" in UPSTREAM.problem(  # another producer's key  # type: ignore[operator]
        topic, VALUE, signed(VALUE, "storefront", "plat"))
    assert "does not match" in UPSTREAM.problem(  # the value altered after signing  # type: ignore[operator]
        topic, VALUE + b" ", signed(VALUE, "platform", "plat"))
    assert "not signed" in UPSTREAM.problem(topic, None, None)  # type: ignore[operator]


@pytest.mark.parametrize("topic", sorted(INTERNAL_TOPICS))
def test_internal_topics_are_unchecked_without_service_keys(topic: str) -> None:
    assert UPSTREAM is not None
    assert UPSTREAM.problem(topic, VALUE, None) is None
    assert UPSTREAM.not_owner(topic, "DuplicateRefundRequested", None) is None


@pytest.mark.parametrize("topic", sorted(INTERNAL_TOPICS))
def test_every_internal_topic_needs_a_service_signature(topic: str) -> None:
    assert BOTH is not None
    assert BOTH.problem(topic, VALUE, signed(VALUE, "billing", "billing-key")) is None
    assert "not signed" in BOTH.problem(topic, VALUE, None)  # type: ignore[operator]
    assert "not a configured producer" in BOTH.problem(  # an upstream name has no say here  # type: ignore[operator]
        topic, VALUE, signed(VALUE, "platform", "plat"))
    assert "does not match" in BOTH.problem(  # type: ignore[operator]
        topic, VALUE, signed(VALUE, "billing", "notification-key"))
    assert "does not match" in BOTH.problem(  # type: ignore[operator]
        topic, VALUE.replace(b"Charge", b"Refund"), signed(VALUE, "billing", "billing-key"))


def test_only_the_owner_of_a_type_may_publish_it() -> None:
    assert BOTH is not None
    headers = signed(VALUE, "billing", "billing-key")
    assert BOTH.not_owner(topics.SAGA, "PlatformCommitted", headers) is None
    assert "published by dispute" in BOTH.not_owner(  # type: ignore[operator]
        topics.SAGA, "DuplicateRefundRequested", headers)
    notification = signed(VALUE, "notification", "notification-key")
    assert BOTH.not_owner(topics.SAGA, "PlatformCommitted", notification) is not None
    assert BOTH.not_owner(topics.SAGA, "Failed", notification) is None  # several services report failures
    assert BOTH.not_owner(topics.STATUS, "CancellationStatusChanged", headers) is not None
    assert BOTH.not_owner(topics.DLQ, "RecordDeadLettered", notification) is None  # any service dead-letters
    assert BOTH.not_owner(topics.REQUESTED, "CancellationRequested", headers) is None  # upstream: no owners


def test_upstream_topics_stay_unchecked_with_service_keys_only() -> None:
    only_services = SignatureCheck.from_text(None, SERVICE_KEYS)
    assert only_services is not None
    assert only_services.problem(topics.PAYMENTS_CHARGES, VALUE, None) is None
    assert SignatureCheck.from_text(None, None) is None
    assert SignatureCheck.from_text("", "") is None


def test_keys_parse_and_refuse_malformed_entries() -> None:
    assert parse_keys(" a:1, a:2 ,b:3,") == {"a": ("1", "2"), "b": ("3",)}
    with pytest.raises(ValueError, match="CANCELFLOW_SERVICE_KEYS entries are name:key"):
        parse_keys("billing", "CANCELFLOW_SERVICE_KEYS")


# --- who owns what ----------------------------------------------------------------------------------


def _internal_types() -> list[type[events.Payload]]:
    return [cls for cls in events.REGISTRY.values() if cls.topic in INTERNAL_TOPICS]


def test_every_internal_type_names_its_publishers_among_the_services() -> None:
    for cls in _internal_types():
        if cls is events.RecordDeadLettered:
            assert cls.published_by is None  # every service dead-letters
            continue
        assert cls.published_by, f"{cls.event_type} names no publisher"
        assert cls.published_by <= set(SERVICES), cls.event_type


def _emitted_by(service: str) -> set[str]:
    """The internal event classes a service's code constructs (what it emits)."""
    internal = {cls.__name__ for cls in _internal_types()}
    found = set()
    for path in (ROOT / "services" / service / service).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in internal:
                found.add(node.func.id)
    return found


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_each_service_emits_only_what_it_owns(service: str) -> None:
    emitted = _emitted_by(service)
    assert emitted
    for name in emitted:
        cls = getattr(events, name)
        assert cls.published_by is None or service in cls.published_by, f"{service} emits {name}"


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_the_consume_loop_reports_failures_only_for_owners_of_failed(service: str, tmp_path: Path) -> None:
    # ConsumeLoop._dead_letter emits Failed on behalf of a service that names its saga step.
    runtime = importlib.import_module(f"{service}.bootstrap").build()
    try:
        assert events.Failed.published_by is not None
        assert (runtime.failure_source is not None) == (service in events.Failed.published_by)
    finally:
        await runtime.engine.dispose()
    assert events.CancellationStatusChanged.published_by == {"status_tracker"}


# --- settings and the embedded stack ------------------------------------------------------------------


def test_producer_keys_without_service_keys_refuse_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCELFLOW_PRODUCER_KEYS", "platform:plat")
    with pytest.raises(ValidationError, match="CANCELFLOW_SERVICE_KEYS"):
        service_settings("billing")
    monkeypatch.setenv("CANCELFLOW_SERVICE_KEYS", "billing:k")
    with pytest.raises(ValidationError, match="no key for dispute"):
        service_settings("billing")
    monkeypatch.setenv("CANCELFLOW_SERVICE_KEYS", SERVICE_KEYS)
    configured = service_settings("billing")
    assert configured.service_signing_key("billing") == "billing-key"
    assert "billing-key" not in repr(configured)


def test_cancelflow_up_makes_service_keys_when_producer_keys_are_set(tmp_path: Path) -> None:
    def env(**values: str) -> dict[str, str]:
        return child_env(CommonSettings(CANCELFLOW_DATA_DIR=str(tmp_path), **values), {})  # type: ignore[arg-type]

    made = env(CANCELFLOW_PRODUCER_KEYS="platform:plat")["CANCELFLOW_SERVICE_KEYS"]
    keys = parse_keys(made)
    assert set(keys) == set(SERVICES)
    assert len({k for (k,) in keys.values()}) == len(SERVICES) and all(len(k) == 64 for (k,) in keys.values())
    # Kept in the data dir, readable by its owner only: a restart signs and checks with the same keys.
    assert (tmp_path / "service-keys").stat().st_mode & 0o777 == 0o600
    assert env(CANCELFLOW_PRODUCER_KEYS="platform:plat")["CANCELFLOW_SERVICE_KEYS"] == made
    assert "CANCELFLOW_SERVICE_KEYS" not in env()  # embedded default: unsigned
    given = env(CANCELFLOW_PRODUCER_KEYS="p:k", CANCELFLOW_SERVICE_KEYS=SERVICE_KEYS)
    assert given["CANCELFLOW_SERVICE_KEYS"] == SERVICE_KEYS


def test_the_relay_signs_each_record_as_its_service() -> None:
    relay = OutboxRelay(lambda: None, None, None, signer=("billing", "billing-key"))  # type: ignore[arg-type]
    row = {"value": VALUE, "headers": {"x": "1"}, "event_type": "PlatformCommitted"}
    headers = relay._headers(row)
    assert headers[:2] == [("x", b"1"), ("cf-event-type", b"PlatformCommitted")]
    assert headers[2:] == signature_headers(VALUE, "billing", "billing-key")
    assert BOTH is not None and BOTH.problem(topics.SAGA, VALUE, headers) is None
    unsigned = OutboxRelay(lambda: None, None, None)  # type: ignore[arg-type]
    assert [name for name, _ in unsigned._headers(row)] == ["x", "cf-event-type"]


def test_the_live_feed_shows_only_statuses_the_tracker_signed() -> None:
    from types import SimpleNamespace

    from status_tracker.feed import StatusFeed

    status = orjson.dumps({"event_id": "e1", "event_type": "CancellationStatusChanged",
                           "payload": {"request_id": "r1", "state": "completed"}})
    lie = orjson.dumps({"event_id": "e2", "event_type": "RecordDeadLettered", "payload": {"request_id": "r1"}})

    def record(value: bytes, headers: list[tuple[str, bytes]]) -> SimpleNamespace:
        return SimpleNamespace(topic=topics.STATUS, value=value, headers=headers)

    feed = StatusFeed(service_settings("status_tracker", service_keys=SERVICE_KEYS))
    assert feed._status_of(record(status, signature_headers(status, "status_tracker", "status_tracker-key"))) == {
        "event_id": "e1", "request_id": "r1", "state": "completed"}
    assert feed._status_of(record(status, [])) is None
    assert feed._status_of(record(status, signature_headers(status, "billing", "billing-key"))) is None
    assert feed._status_of(record(lie, signature_headers(lie, "status_tracker", "status_tracker-key"))) is None
    unsigned_feed = StatusFeed(service_settings("status_tracker"))
    assert unsigned_feed._status_of(record(status, [])) is not None  # keys off: as before
