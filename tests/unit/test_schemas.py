"""schemas/ is generated from the event models: it must be current, and records must match it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest

from cancelflow.events import (
    REGISTRY,
    CancellationRequested,
    CancellationStatusChanged,
    Failed,
    Payload,
    RecordDeadLettered,
    RefundIssued,
    RequestedBy,
    Source,
    State,
    SubscriptionActivated,
    envelope_for,
)
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
REQUEST_ID = uuid.UUID("7d7f3c2e-0d7e-4d55-9f0b-2f4f1a6f7a10")


gen = load_script("gen_schemas")


def _validator(event_type: str, version: int = 1) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{event_type}.v{version}.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _record(payload: Payload) -> dict:
    envelope = envelope_for(payload, producer="test", correlation_id=str(REQUEST_ID), causation_id=None)
    return json.loads(envelope.model_dump_json())


def test_schemas_folder_is_current() -> None:
    problems = gen.compare(SCHEMAS)
    assert not problems, f"schemas/ is out of date, run `python scripts/gen_schemas.py`: {problems}"


def test_generation_is_deterministic() -> None:
    assert gen.render_all() == gen.render_all()
    assert all(text.endswith("\n") for text in gen.render_all().values())


def test_check_lists_stale_missing_and_extra(tmp_path: Path) -> None:
    gen.write(tmp_path)
    assert gen.compare(tmp_path) == []
    (tmp_path / "Failed.v1.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "EmailSent.v1.json").unlink()
    (tmp_path / "Gone.v1.json").write_text("{}\n", encoding="utf-8")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    assert sorted(gen.compare(tmp_path)) == ["extra: Gone.v1.json", "missing: EmailSent.v1.json",
                                             "stale: Failed.v1.json"]
    gen.write(tmp_path)
    assert gen.compare(tmp_path) == []
    assert not (tmp_path / "Gone.v1.json").exists()


@pytest.mark.parametrize("key", sorted(REGISTRY), ids=lambda k: f"{k[0]}.v{k[1]}")
def test_every_schema_is_valid_and_describes_its_record(key: tuple[str, int]) -> None:
    cls = REGISTRY[key]
    schema = json.loads((SCHEMAS / gen.file_name(cls)).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["x-topic"] == cls.topic
    assert schema["x-key"]
    assert schema["description"]
    assert schema["properties"]["event_type"]["const"] == cls.event_type
    assert schema["properties"]["schema_version"]["const"] == cls.schema_version
    assert set(schema["required"]) >= {"event_id", "event_type", "schema_version", "occurred_at",
                                       "correlation_id", "producer", "payload"}


def _samples() -> list[Payload]:
    return [
        SubscriptionActivated(
            subscription_id="sub-1", account_id="acc-1", customer={"email": "a@example.com", "name": "A"},
            product_name="Office", vendor="acme", vendor_subscription_id="v-1", billing_period="monthly",
            unit_price="49.95", currency="EUR", quantity=3, status="active",
            current_period_start=date(2026, 11, 1), current_period_end=date(2026, 12, 1), auto_renew=True,
        ),
        CancellationRequested(
            request_id=REQUEST_ID, account_id="acc-1",
            requested_by=RequestedBy(user_id="u-1", role="customer", channel="storefront"),
            target="subscription", subscription_id="sub-1", mode="past_dated",
            effective_date=date(2026, 11, 21), quantity=1,
        ),
        RefundIssued(request_id=REQUEST_ID, subscription_id="sub-1", amount=Decimal("16.65"),
                     currency="EUR", status="succeeded"),
        Failed(request_id=REQUEST_ID, source=Source.vendor, code="vendor_error", message="HTTP 500"),
        CancellationStatusChanged(
            request_id=REQUEST_ID, state=State.completed, version=3, updated_at=datetime.now(UTC),
            refund={"amount": "16.65", "currency": "EUR", "status": "succeeded"},
            history=[{"at": datetime.now(UTC), "message": "Status is set to canceled"}],
        ),
        RecordDeadLettered(
            reason="not_json", detail="Expecting value", topic="cancellations.requested", partition=0,
            offset=12, consumer_group="cancelflow-billing", original_size=3, original_sha256="ab" * 32,
            original_base64="e30=",
        ),
    ]


@pytest.mark.parametrize("payload", _samples(), ids=lambda p: p.event_type)
def test_sample_records_match_their_schema(payload: Payload) -> None:
    _validator(payload.event_type).validate(_record(payload))


def test_money_is_a_two_place_string_in_the_schema() -> None:
    record = _record(_samples()[2])
    assert record["payload"]["amount"] == "16.65"
    record["payload"]["amount"] = 16.65
    assert not _validator("RefundIssued").is_valid(record)


def test_missing_required_payload_field_fails() -> None:
    record = _record(_samples()[1])
    del record["payload"]["account_id"]
    errors = list(_validator("CancellationRequested").iter_errors(record))
    assert any("'account_id' is a required property" in e.message for e in errors)


def test_wrong_event_type_or_version_fails() -> None:
    record = _record(_samples()[3])
    validator = _validator("Failed")
    assert not validator.is_valid({**record, "event_type": "RefundIssued"})
    assert not validator.is_valid({**record, "schema_version": 2})
    assert not validator.is_valid({k: v for k, v in record.items() if k != "event_id"})


def test_unknown_extra_fields_are_allowed() -> None:
    record = _record(_samples()[3])
    record["trace"] = "abc"
    record["payload"]["new_optional_field"] = 1
    assert _validator("Failed").is_valid(record)
