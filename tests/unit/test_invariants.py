"""The checker finds each kind of broken promise (and none in a clean run)."""

from __future__ import annotations

import importlib
from datetime import UTC, date, datetime
from decimal import Decimal
from email.message import EmailMessage

from sqlalchemy import Table, insert

from cancelflow.db import create_schema, make_engine
from cancelflow_tools.invariants import Evidence, Expectations, check, read_databases, read_records
from payment_gateway import orm as pg_orm
from provisioning import orm as prov_orm


def status(request_id: str, version: int, state: str, **extra: object) -> dict:
    return {"request_id": request_id, "version": version, "state": state, "stage": None, "target": "subscription",
            "error": None, **extra}


def mail(request_id: str, kind: str, message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["X-Cancelflow-Request-Id"] = request_id
    message["X-Cancelflow-Kind"] = kind
    message["Message-ID"] = message_id
    return message


def clean() -> Evidence:
    return Evidence(
        statuses=[status("r1", 1, "received"), status("r1", 2, "in_progress"), status("r1", 3, "completed"),
                  status("r1", 3, "completed"),  # the same record republished: fine
                  status("r1", 4, "completed")],
        dead_letters=[{"original_key": "bad-1", "reason": "not_json", "detail": "not JSON", "topic": "t", "offset": 1}],
        vendor_ledger={"effects": [{"type": "cancellation", "request_id": "r1"}]},
        gateway_ledger={"effects": [
            {"type": "charge_captured", "gateway_charge_id": "g1", "amount": "30.00"},
            {"type": "refund", "idempotency_key": "k1", "gateway_charge_id": "g1", "amount": "20.00"}]},
        mails=[mail("r1", "completed", "<a@x>"), mail("r1", "completed", "<a@x>")],  # a resend, same id
    )


def expected() -> Expectations:
    return Expectations(accepted={"r1"}, injected_bad_keys={"bad-1"})


def violated(evidence: Evidence, expectations: Expectations | None = None) -> set[str]:
    report = check(evidence, expectations or expected())
    return {name for name, found in report.violations.items() if found}


def test_a_clean_run_passes() -> None:
    report = check(clean(), expected())
    assert report.ok, dict(report.violations)
    assert report.checked["only legal state transitions, versions one by one"] == 5


def test_stuck_and_double_terminal_requests() -> None:
    evidence = clean()
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "in_progress")]
    assert "every accepted request ends in one terminal state" in violated(evidence)
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "rejected"), status("r1", 3, "completed")]
    assert "every accepted request ends in one terminal state" in violated(evidence)


def test_illegal_transitions_and_version_gaps() -> None:
    evidence = clean()
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "completed")]
    assert "only legal state transitions, versions one by one" in violated(evidence)
    evidence.statuses = [status("r1", 1, "received"), status("r1", 3, "rejected")]
    assert "only legal state transitions, versions one by one" in violated(evidence)
    evidence.statuses = [status("r1", 1, "received"), status("r1", 1, "rejected")]
    assert "only legal state transitions, versions one by one" in violated(evidence)


def test_double_vendor_effect_and_refunds() -> None:
    evidence = clean()
    evidence.vendor_ledger["effects"].append({"type": "cancellation", "request_id": "r1"})
    evidence.gateway_ledger["effects"] += [
        {"type": "refund", "idempotency_key": "k1", "gateway_charge_id": "g1", "amount": "5.00"},
        {"type": "reversal", "idempotency_key": "k2", "gateway_charge_id": "g1", "amount": "9.00"}]
    assert violated(evidence) >= {"at most one vendor effect per request", "at most one refund per key",
                                  "never more refunded than captured"}


def test_emails_doubled_or_missing() -> None:
    evidence = clean()
    evidence.mails.append(mail("r1", "completed", "<b@x>"))
    assert "at most one email per outcome" in violated(evidence)
    evidence.mails = []
    assert "every owed email delivered once SMTP is back" in violated(evidence)
    assert "every owed email delivered once SMTP is back" not in violated(
        evidence, Expectations(accepted={"r1"}, injected_bad_keys={"bad-1"}, smtp_up=False))


def test_a_stuck_request_finished_by_the_system_owes_the_stuck_emails_and_its_outcome() -> None:
    evidence = clean()
    timeout = {"source": "vendor", "code": "timeout", "message": "No progress"}
    resolved = {"by": "system", "at": "2026-11-21T10:00:00+00:00", "action": "completed", "note": ""}
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "in_progress"),
                         status("r1", 3, "manual_review", error=timeout),
                         status("r1", 4, "manual_review", resolution=resolved)]
    evidence.mails = [mail("r1", "manual_review", "<m@x>"), mail("r1", "support_stuck", "<s@x>")]
    assert violated(evidence) == {"every owed email delivered once SMTP is back"}  # no "completed" email
    evidence.mails.append(mail("r1", "completed", "<a@x>"))
    assert violated(evidence) == set()


def test_dead_letters_must_be_the_injected_ones() -> None:
    evidence = clean()
    evidence.dead_letters.append({"original_key": "r-valid", "reason": "handler_error", "detail": "x",
                                  "topic": "t", "offset": 2})
    assert "only injected bad records dead-lettered, each with a reason" in violated(evidence)
    assert "every injected bad record dead-lettered" in violated(
        clean(), Expectations(accepted={"r1"}, injected_bad_keys={"bad-1", "bad-2"}))


def test_half_done_work_in_a_database() -> None:
    evidence = clean()
    evidence.databases = {"billing": {"outbox": 0, "locked_subscriptions": 1}, "payment_gateway": {"outbox": 3}}
    assert "nothing left unpublished or half done" in violated(evidence)


# --- from cancelflow's own stores (SQLite and PostgreSQL) ------------------------------------------------

NOW = datetime(2026, 11, 11, tzinfo=UTC)


def charge_row(charge_id: str, amount: str, refunded: str) -> dict:
    return {"charge_id": charge_id, "account_id": "acc-1", "subscription_id": "sub-1",
            "gateway_charge_id": f"gw-{charge_id}", "amount": Decimal(amount), "refunded_amount": Decimal(refunded),
            "currency": "USD", "captured_at": NOW, "period_start": date(2026, 11, 1), "period_end": date(2026, 12, 1)}


def refund_row(key: str, request_id: str, charge_id: str, amount: str, status: str = "succeeded") -> dict:
    return {"idempotency_key": key, "request_id": request_id, "charge_id": charge_id,
            "gateway_charge_id": f"gw-{charge_id}", "amount": Decimal(amount), "currency": "USD", "status": status,
            "created_at": NOW, "updated_at": NOW}


def vendor_op(request_id: str, vendor_subscription_id: str = "V-1", *, operation: str = "cancel",
              status: str = "succeeded", already_applied: bool | None = False) -> dict:
    return {"request_id": request_id, "subscription_id": "sub-1", "vendor": "acme",
            "vendor_subscription_id": vendor_subscription_id, "operation": operation,
            "effective_date": date(2026, 11, 11), "current_quantity": 1, "new_quantity": 0, "status": status,
            "already_applied": already_applied, "attempts": 1, "started_at": NOW}


def refund_effect(key: str, charge_id: str, amount: str) -> dict:
    return {"type": "refund", "idempotency_key": key, "gateway_charge_id": f"gw-{charge_id}", "amount": amount}


def cancellation_effect(request_id: str) -> dict:
    return {"type": "cancellation", "request_id": request_id, "vendor_subscription_id": "V-1"}


async def stored(store, service: str, rows: dict[Table, list[dict]]) -> str:  # type: ignore[no-untyped-def]
    """A new database of `service` holding `rows`; its URL."""
    url = store(service)
    engine = make_engine(url)
    try:
        await create_schema(engine, importlib.import_module(f"{service}.orm").metadata)
        async with engine.begin() as conn:
            for table, values in rows.items():
                if values:
                    await conn.execute(insert(table), values)
    finally:
        await engine.dispose()
    return url


async def from_stores(store, rows: dict[str, dict[Table, list[dict]]], *, vendor: list[dict] | None = None,  # type: ignore[no-untyped-def]
                      gateway: list[dict] | None = None) -> set[str]:
    """The violations found in stores holding `rows` (service -> table -> rows), next to the sandbox
    ledgers given (a clean run's otherwise)."""
    urls = {service: await stored(store, service, tables) for service, tables in rows.items()}
    evidence = clean()
    evidence.statuses = []
    evidence.mails = []
    evidence.vendor_ledger = {"effects": vendor or []}
    evidence.gateway_ledger = {"effects": gateway or []}
    evidence.databases = await read_databases(urls)
    evidence.records = await read_records(urls)
    return violated(evidence, Expectations(accepted=set(), injected_bad_keys={"bad-1"}))


def gateway_store(charges: list[dict], refunds: list[dict]) -> dict[str, dict[Table, list[dict]]]:
    return {"payment_gateway": {pg_orm.charges: charges, pg_orm.refunds: refunds}}


async def test_clean_stores_pass(store) -> None:  # type: ignore[no-untyped-def]
    found = await from_stores(
        store, {**gateway_store([charge_row("c1", "30.00", "10.00"), charge_row("c2", "30.00", "0.00")],
                                [refund_row("k1", "r1", "c1", "10.00"), refund_row("k2", "r2", "c2", "5.00", "failed")]),
                "provisioning": {prov_orm.vendor_operations: [
                    vendor_op("r1"), vendor_op("r2", already_applied=True),
                    vendor_op("r3", "V-2", operation="set_quantity"), vendor_op("r4", "V-3", status="failed")]}},
        vendor=[cancellation_effect("r1")], gateway=[refund_effect("k1", "c1", "10.00")])
    assert found == set()


async def test_two_refunds_of_one_charge_for_one_request_whatever_the_keys(store) -> None:  # type: ignore[no-untyped-def]
    found = await from_stores(
        store, gateway_store([charge_row("c1", "30.00", "20.00")],
                             [refund_row("k1", "r1", "c1", "10.00"), refund_row("k1-again", "r1", "c1", "10.00")]),
        gateway=[refund_effect("k1", "c1", "10.00"), refund_effect("k1-again", "c1", "10.00")])
    assert found == {"one refund per request and charge"}


async def test_refunds_beyond_the_capture_or_the_guard(store) -> None:  # type: ignore[no-untyped-def]
    name = "never more refunded than captured, the guard matching its refunds"
    over = await from_stores(
        store, gateway_store([charge_row("c1", "30.00", "30.00")],
                             [refund_row("k1", "r1", "c1", "20.00"), refund_row("k2", "r2", "c1", "15.00", "pending")]),
        gateway=[refund_effect("k1", "c1", "20.00")])
    assert name in over
    unguarded = await from_stores(store, gateway_store([charge_row("c1", "30.00", "0.00")],
                                                       [refund_row("k1", "r1", "c1", "10.00")]),
                                  gateway=[refund_effect("k1", "c1", "10.00")])
    assert unguarded == {name}


async def test_the_gateway_ledger_against_payment_gateways_refunds(store) -> None:  # type: ignore[no-untyped-def]
    name = "gateway refunds match payment-gateway's records"
    books = gateway_store([charge_row("c1", "30.00", "10.00"), charge_row("c2", "30.00", "0.00")],
                          [refund_row("k1", "r1", "c1", "10.00"), refund_row("k2", "r2", "c2", "5.00", "failed")])
    assert await from_stores(store, books, gateway=[]) == {name}  # succeeded, never applied
    assert await from_stores(store, books, gateway=[refund_effect("k1", "c1", "10.00"),
                                                    refund_effect("k2", "c2", "5.00")]) == {name}  # failed, yet applied
    assert await from_stores(store, books, gateway=[refund_effect("k1", "c1", "12.00")]) == {name}
    assert await from_stores(store, books, gateway=[refund_effect("k1", "c1", "10.00"),
                                                    refund_effect("k9", "c1", "1.00")]) == {name}  # unknown key


async def test_vendor_operations_against_the_vendor_ledger(store) -> None:  # type: ignore[no-untyped-def]
    name = "one vendor operation per request"

    def provisioning(*ops: dict) -> dict[str, dict[Table, list[dict]]]:
        return {"provisioning": {prov_orm.vendor_operations: list(ops)}}

    # Two requests each canceled the subscription at the vendor, neither finding it done already.
    assert await from_stores(store, provisioning(vendor_op("r1"), vendor_op("r2")),
                             vendor=[cancellation_effect("r1")]) == {name}
    assert await from_stores(store, provisioning(vendor_op("r1")), vendor=[]) == {name}
    assert await from_stores(store, provisioning(vendor_op("r1", status="failed")),
                             vendor=[cancellation_effect("r1")]) == {name}
    assert await from_stores(store, provisioning(), vendor=[cancellation_effect("r1")]) == {name}
    assert name in await from_stores(store, provisioning(vendor_op("r1", already_applied=True)),
                                     vendor=[cancellation_effect("r1"), cancellation_effect("r1")])


async def test_half_done_work_in_the_stores(store) -> None:  # type: ignore[no-untyped-def]
    def half_done(found: set[str]) -> bool:
        return "nothing left unpublished or half done" in found

    async def reported(rows: dict[str, dict[Table, list[dict]]], what: str) -> bool:
        urls = {service: await stored(store, service, tables) for service, tables in rows.items()}
        evidence = clean()
        evidence.databases = await read_databases(urls)
        report = check(evidence, expected())
        return any(what in line for line in report.violations.get("nothing left unpublished or half done", []))

    assert await reported(gateway_store([charge_row("c1", "30.00", "10.00")],
                                        [refund_row("k1", "r1", "c1", "10.00", "pending")]), "pending_refunds")
    assert await reported(gateway_store([charge_row("c1", "30.00", "30.01")], []), "overdrawn_charges")
    assert await reported({"provisioning": {prov_orm.vendor_operations: [vendor_op("r1", status="pending")]}},
                          "pending_vendor_calls")
    assert not half_done(await from_stores(store, gateway_store([charge_row("c1", "30.00", "30.00")],
                                                                [refund_row("k1", "r1", "c1", "30.00")]),
                                           gateway=[refund_effect("k1", "c1", "30.00")]))
