"""The schemas' limits and the stores' columns agree: whatever an event's string field may hold fits every
column of the same name in every service's database, so a value the stores cannot hold is refused as
bad input when its record is read (CONTRACT.md section 7), never by the database halfway through a
handler. Walks the pydantic models (as JSON Schema) and the ORM tables, so neither can drift alone."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String

from cancelflow.contract import cancellation_refund_key as refund_key
from cancelflow.contract import dispute_refund_key
from cancelflow.events import ACTOR_CHARS, ID_CHARS, NAME_CHARS, REGISTRY, RequestedBy
from cancelflow.messaging.store import KEY_CHARS
from cancelflow_tools.services import SERVICES
from dispute.domain import requester

# Columns whose name an event field shares with another meaning: (model, field) -> the columns it is
# not kept in.
OTHER_MEANING = {
    # a request's free text; dispute_charges.reason is the detection verdict's code
    ("CancellationRequested", "reason"): {"dispute.dispute_charges"},
    ("CancellationReceived", "reason"): {"dispute.dispute_charges"},
    # an email's kind; refunds.kind is refund | reversal (RefundLine.kind)
    ("EmailSent", "kind"): {"payment_gateway.refunds"},
}
# Columns that keep a field under another name: column -> the (model, field) it holds.
RENAMED = {
    "dispute.disputes.requested_by": ("DisputeStepRecorded", "actor"),
    "dispute.dispute_charges.gateway_state": ("ChargeVerification", "state"),
    "dispute.dispute_charges.related_charge_id": ("DuplicateRefundLine", "duplicate_of"),
    "dispute.dispute_charges.refund_kind": ("RefundLine", "kind"),
    "billing.subscriptions.status": ("SubscriptionSnapshot", "subscription_status"),
}


def _lengths() -> dict[str, int]:
    """"service.table.column" -> length, for every String column with a length."""
    found = {}
    for service in SERVICES:
        for table in importlib.import_module(f"{service}.orm").metadata.tables.values():
            for column in table.columns:
                if isinstance(column.type, String) and column.type.length:
                    found[f"{service}.{table.name}.{column.name}"] = column.type.length
    return found


def _strings(schema: dict[str, Any], defs: dict[str, Any], model: str,
             field: str | None) -> Iterator[tuple[str, str, int | None]]:
    """(model, field, maxLength) of every free string in a JSON Schema, nested models included."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        yield from _strings(defs[name], defs, name, field)
        return
    for alternative in schema.get("anyOf", ()):
        yield from _strings(alternative, defs, model, field)
    for name, sub in schema.get("properties", {}).items():
        yield from _strings(sub, defs, model, name)
    if schema.get("type") == "array" and "items" in schema:
        yield from _strings(schema["items"], defs, model, field)
    bounded_otherwise = {"enum", "const", "format"} & set(schema)
    if schema.get("type") == "string" and field is not None and not bounded_otherwise:
        yield model, field, schema.get("maxLength")


def _fields() -> dict[tuple[str, str], int | None]:
    fields = {}
    for model in REGISTRY.values():
        schema = model.model_json_schema(by_alias=False)
        for owner, name, limit in _strings(schema, schema.get("$defs", {}), model.__name__, None):
            fields[(owner, name)] = limit
    return fields


FIELDS = _fields()
LENGTHS = _lengths()
COLUMNS: dict[str, list[tuple[str, int]]] = {}  # column name -> (service.table, length)
for _column, _length in LENGTHS.items():
    _table, _name = _column.rsplit(".", 1)
    COLUMNS.setdefault(_name, []).append((_table, _length))


def _kept_in(model: str, field: str) -> list[tuple[str, int]]:
    same_name = [(table, n) for table, n in COLUMNS.get(field, ())
                 if table not in OTHER_MEANING.get((model, field), ())]
    renamed = [(column, LENGTHS[column]) for column, holds in RENAMED.items() if holds == (model, field)]
    return same_name + renamed


@pytest.mark.parametrize(("model", "field"), sorted(f for f in FIELDS if _kept_in(*f)))
def test_a_field_fits_every_column_that_keeps_it(model: str, field: str) -> None:
    columns = _kept_in(model, field)
    limit = FIELDS[(model, field)]
    assert limit is not None, f"{model}.{field} has no max_length; its columns: {columns}"
    too_short = [(table, n) for table, n in columns if n < limit]
    assert not too_short, f"{model}.{field} takes {limit} characters; too short: {too_short}"


def test_each_id_is_bounded_by_its_narrowest_column() -> None:
    """Not only fits: the schema takes what the stores take (a longer id is refused by the schema)."""
    for name in ("subscription_id", "account_id", "charge_id", "gateway_charge_id", "vendor",
                 "vendor_subscription_id", "product_name", "idempotency_key", "decided_by"):
        narrowest = min(n for _, n in COLUMNS[name])
        limits = {limit for (_, field), limit in FIELDS.items() if field == name}
        assert limits == {narrowest}, f"{name}: schemas say {limits}, the narrowest column {narrowest}"


def test_the_exceptions_name_real_columns() -> None:
    for column, holds in RENAMED.items():
        assert column in LENGTHS and holds in FIELDS, (column, holds)
    for (model, field), tables in OTHER_MEANING.items():
        assert (model, field) in FIELDS
        assert tables <= {t for t, _ in COLUMNS[field]}


def test_a_record_key_fits_the_outbox() -> None:
    outbox_key = [n for table, n in COLUMNS["key"] if table.endswith(".outbox")]
    assert set(outbox_key) == {KEY_CHARS}


def test_the_longest_requester_fits_the_dispute_audit() -> None:
    longest = requester(RequestedBy(user_id="u" * NAME_CHARS, role="operator", channel="storefront"))
    assert len(longest) <= ACTOR_CHARS == FIELDS[("DisputeStepRecorded", "actor")]
    assert len(longest) <= min(LENGTHS["dispute.disputes.requested_by"], LENGTHS["dispute.dispute_audit.actor"])


def test_the_longest_refund_keys_fit() -> None:
    request_id, charge_id = str(uuid.uuid4()), "c" * ID_CHARS
    for key in (refund_key(request_id, charge_id), dispute_refund_key(request_id, charge_id)):
        assert len(key) <= FIELDS[("RefundLine", "idempotency_key")] <= LENGTHS["payment_gateway.refunds.idempotency_key"]
