"""The promises, checked after a run from everything the system left behind.

Evidence comes from the status and dead-letter topics, the vendor and gateway sandbox ledgers, the
SMTP server's mailbox and every service's database. `check` returns a report: for each invariant, how
many things were checked and every violation found. Chaos runs and fault tests end with it.

The money and vendor promises are judged from cancelflow's own records (payment-gateway's refunds and
charges, provisioning's vendor operations), and the sandbox ledgers are compared with those: the
sandboxes refuse a reused key, an over-refund and a second cancellation themselves, so their ledgers
alone would show "0 violations" whatever cancelflow did.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from email.message import EmailMessage
from typing import Any

from sqlalchemy import Boolean, Numeric, String, column, func, select, table, text
from sqlalchemy import inspect as sa_inspect

from cancelflow import db
from cancelflow.events import TERMINAL_STATES, State

# Which emails each outcome owes: (state, error source, target) -> kinds (CONTRACT.md section 5).
OWED: dict[tuple[str, str | None, str], tuple[str, ...]] = {
    ("completed", None, "subscription"): ("completed",),
    ("completed", None, "charges"): ("charges_refunded",),
    ("failed", "vendor", "subscription"): ("failed_vendor",),
    ("failed", "platform", "subscription"): ("failed_platform", "support_platform_failure"),
    ("manual_review", "payment", "subscription"): ("manual_review", "support_manual_review"),
    ("manual_review", "payment", "charges"): ("manual_review", "support_manual_review"),
    ("declined", None, "subscription"): ("declined",),
}

LEGAL: dict[State | None, frozenset[State]] = {
    None: frozenset({State.received, State.rejected}),
    State.received: frozenset({State.pending_approval, State.in_progress, State.scheduled, State.rejected,
                               State.declined, State.manual_review}),
    State.pending_approval: frozenset({State.in_progress, State.scheduled, State.declined, State.rejected}),
    State.scheduled: frozenset({State.in_progress, State.failed, State.manual_review}),
    State.in_progress: frozenset({State.completed, State.failed, State.manual_review}),
}


@dataclass
class Evidence:
    statuses: list[dict[str, Any]]  # every status record's payload, in topic order per request
    dead_letters: list[dict[str, Any]]  # every DLQ record's payload
    vendor_ledger: dict[str, Any]
    gateway_ledger: dict[str, Any]
    mails: list[EmailMessage]
    database_urls: dict[str, str] = field(default_factory=dict)  # service -> URL
    databases: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled by read_databases
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # filled by read_records


@dataclass
class Expectations:
    accepted: set[str]  # request ids sent as valid: each must end in exactly one terminal state
    injected_bad_keys: set[str] = field(default_factory=set)  # record keys of records injected as bad
    smtp_up: bool = True  # SMTP is back: every owed email must have arrived


@dataclass
class Report:
    checked: Counter[str] = field(default_factory=Counter)
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def fail(self, invariant: str, what: str) -> None:
        self.violations[invariant].append(what)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def rows(self) -> list[tuple[str, int, int, str]]:
        names = sorted(set(self.checked) | set(self.violations))
        return [(n, self.checked[n], len(self.violations.get(n, [])), (self.violations.get(n) or [""])[0])
                for n in names]


def check(evidence: Evidence, expected: Expectations) -> Report:
    report = Report()
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for status in evidence.statuses:
        by_request[status["request_id"]].append(status)
    _terminal_once(report, by_request, expected)
    _legal_transitions(report, by_request)
    _vendor_once(report, evidence.vendor_ledger)
    _refunds(report, evidence.gateway_ledger)
    _emails(report, evidence.mails, by_request, expected)
    _dead_letters(report, evidence.dead_letters, expected)
    _databases(report, evidence.databases, expected)
    _refunds_follow_the_formula(report, evidence.databases)
    _refund_per_request_and_charge(report, evidence.records)
    _refunds_within_charges(report, evidence.records)
    _gateway_matches_refunds(report, evidence.records, evidence.gateway_ledger)
    _vendor_operation_per_request(report, evidence.records, evidence.vendor_ledger)
    return report


def _terminal_once(report: Report, by_request: dict[str, list[dict[str, Any]]], expected: Expectations) -> None:
    for request_id in sorted(expected.accepted):
        report.checked["every accepted request ends in one terminal state"] += 1
        records = by_request.get(request_id)
        if not records:
            report.fail("every accepted request ends in one terminal state", f"{request_id}: no status at all")
            continue
        terminals = {r["state"] for r in records if State(r["state"]) in TERMINAL_STATES}
        if not terminals:
            report.fail("every accepted request ends in one terminal state",
                        f"{request_id}: stuck in {records[-1]['state']} (stage {records[-1]['stage']})")
        elif len(terminals) > 1:
            report.fail("every accepted request ends in one terminal state",
                        f"{request_id}: several terminal states {sorted(terminals)}")


def _legal_transitions(report: Report, by_request: dict[str, list[dict[str, Any]]]) -> None:
    name = "only legal state transitions, versions one by one"
    for request_id, records in by_request.items():
        before: State | None = None
        version = 0
        seen: dict[int, dict[str, Any]] = {}
        for record in records:
            report.checked[name] += 1
            if record["version"] in seen:
                if seen[record["version"]] != record:  # a republished record is fine, a rewrite is not
                    report.fail(name, f"{request_id}: two different records with version {record['version']}")
                continue
            if record["version"] != version + 1:
                report.fail(name, f"{request_id}: version {record['version']} after {version}")
            seen[record["version"]] = record
            version = record["version"]
            after = State(record["state"])
            if after != before and after not in LEGAL.get(before, frozenset()):
                report.fail(name, f"{request_id}: {before and before.value} -> {after.value}")
            before = after


def _vendor_once(report: Report, ledger: dict[str, Any]) -> None:
    name = "at most one vendor effect per request"
    effects = Counter(e.get("request_id") for e in ledger.get("effects", [])
                      if e.get("type") in ("cancellation", "quantity_change"))
    for request_id, count in effects.items():
        report.checked[name] += 1
        if count > 1:
            report.fail(name, f"{request_id}: {count} vendor effects")


def _refunds(report: Report, ledger: dict[str, Any]) -> None:
    refunds = [e for e in ledger.get("effects", []) if e.get("type") in ("refund", "reversal")]
    per_key = Counter(e["idempotency_key"] for e in refunds)
    for key, count in per_key.items():
        report.checked["at most one refund per key"] += 1
        if count > 1:
            report.fail("at most one refund per key", f"{key}: refunded {count} times")
    captured = {e["gateway_charge_id"]: Decimal(e["amount"]) for e in ledger.get("effects", [])
                if e.get("type") == "charge_captured"}
    refunded: Counter[str] = Counter()
    for e in refunds:
        refunded[e["gateway_charge_id"]] += Decimal(e["amount"])
    for charge, amount in refunded.items():
        report.checked["never more refunded than captured"] += 1
        if charge in captured and amount > captured[charge]:
            report.fail("never more refunded than captured", f"{charge}: {amount} refunded of {captured[charge]}")


def _emails(report: Report, mails: Iterable[EmailMessage], by_request: dict[str, list[dict[str, Any]]],
            expected: Expectations) -> None:
    distinct: dict[tuple[str, str], set[str]] = defaultdict(set)
    for mail in mails:
        distinct[(str(mail["X-Cancelflow-Request-Id"]), str(mail["X-Cancelflow-Kind"]))].add(str(mail["Message-ID"]))
    for (request_id, kind), ids in distinct.items():
        report.checked["at most one email per outcome"] += 1
        if len(ids) > 1:
            report.fail("at most one email per outcome", f"{request_id}/{kind}: {len(ids)} different emails")
    if not expected.smtp_up:
        return
    for request_id in sorted(expected.accepted):
        records = by_request.get(request_id) or []
        if not records or State(records[-1]["state"]) not in TERMINAL_STATES:
            continue
        for kind in owed_kinds(records[-1]):
            report.checked["every owed email delivered once SMTP is back"] += 1
            if not distinct.get((request_id, kind)):
                report.fail("every owed email delivered once SMTP is back", f"{request_id}: no {kind} email")


def owed_kinds(status: dict[str, Any]) -> tuple[str, ...]:
    """The emails a request's terminal status owes (customer first, then support)."""
    error = status.get("error") or {}
    if error.get("code") == "timeout":
        return ("manual_review", "support_stuck")
    resolution = status.get("resolution") or {}
    if resolution.get("by") == "system":  # set aside as stuck, then finished by itself: both are told
        outcome = OWED.get((resolution["action"], error.get("source"), status.get("target") or ""), ())
        return ("manual_review", "support_stuck", *outcome)
    return OWED.get((status["state"], error.get("source"), status.get("target") or ""), ())


def _dead_letters(report: Report, dead: list[dict[str, Any]], expected: Expectations) -> None:
    keys = Counter(d.get("original_key") for d in dead)
    for record in dead:
        report.checked["only injected bad records dead-lettered, each with a reason"] += 1
        if record.get("original_key") not in expected.injected_bad_keys:
            report.fail("only injected bad records dead-lettered, each with a reason",
                        f"{record.get('topic')}@{record.get('offset')}: {record.get('reason')} ({record.get('detail')})")
        elif not record.get("reason") or not record.get("detail"):
            report.fail("only injected bad records dead-lettered, each with a reason",
                        f"{record.get('original_key')}: no readable reason")
    for key in sorted(expected.injected_bad_keys):
        report.checked["every injected bad record dead-lettered"] += 1
        if not keys.get(key):
            report.fail("every injected bad record dead-lettered", f"{key}: not in the DLQ")


def _databases(report: Report, databases: dict[str, dict[str, Any]], expected: Expectations) -> None:
    for service, facts in sorted(databases.items()):
        report.checked["nothing left unpublished or half done"] += 1
        if facts.get("outbox", 0):
            report.fail("nothing left unpublished or half done", f"{service}: {facts['outbox']} outbox rows")
        for what in ("locked_subscriptions", "pending_refunds", "overdrawn_charges", "pending_vendor_calls"):
            if facts.get(what):
                report.fail("nothing left unpublished or half done", f"{service}: {facts[what]} {what}")
        if expected.smtp_up and facts.get("pending_emails"):
            report.fail("nothing left unpublished or half done", f"{service}: {facts['pending_emails']} emails pending")


def _refund_per_request_and_charge(report: Report, records: dict[str, list[dict[str, Any]]]) -> None:
    """payment-gateway's refunds: one per request and charge, whatever its idempotency key."""
    name = "one refund per request and charge"
    per_line = Counter((r["request_id"], r["charge_id"]) for r in records.get("refunds", []))
    for (request_id, charge_id), count in sorted(per_line.items()):
        report.checked[name] += 1
        if count > 1:
            report.fail(name, f"{request_id}: {count} refunds of {charge_id}")


def _refunds_within_charges(report: Report, records: dict[str, list[dict[str, Any]]]) -> None:
    """payment-gateway's charges: what its refunds hold (pending or succeeded) never exceeds the
    captured amount, and the guard's refunded_amount is exactly that."""
    name = "never more refunded than captured, the guard matching its refunds"
    held: Counter[str] = Counter()
    for r in records.get("refunds", []):
        if r["status"] in ("pending", "succeeded"):
            held[r["charge_id"]] += r["amount"]
    for charge in records.get("charges", []):
        report.checked[name] += 1
        charge_id, holds = charge["charge_id"], held.get(charge["charge_id"], Decimal(0))
        if holds > charge["amount"]:
            report.fail(name, f"{charge_id}: refunds hold {holds} of {charge['amount']} captured")
        elif charge["refunded_amount"] != holds:
            report.fail(name, f"{charge_id}: guard says {charge['refunded_amount']} refunded, refunds hold {holds}")


def _gateway_matches_refunds(report: Report, records: dict[str, list[dict[str, Any]]],
                             ledger: dict[str, Any]) -> None:
    """The gateway sandbox's refunds are exactly payment-gateway's succeeded ones: same key, charge, amount."""
    if "refunds" not in records:
        return  # the store was not read
    name = "gateway refunds match payment-gateway's records"
    ours = {r["idempotency_key"]: r for r in records["refunds"]}
    effects: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in ledger.get("effects", []):
        if e.get("type") in ("refund", "reversal"):
            effects[e["idempotency_key"]].append(e)
    for key in sorted(set(ours) | set(effects)):
        report.checked[name] += 1
        record, applied = ours.get(key), effects.get(key, [])
        if record is None:
            report.fail(name, f"{key}: refunded at the gateway, unknown to payment-gateway")
        elif record["status"] == "succeeded" and len(applied) != 1:
            report.fail(name, f"{key}: succeeded, {len(applied)} refunds at the gateway")
        elif record["status"] != "succeeded" and applied:
            report.fail(name, f"{key}: {record['status']}, yet refunded at the gateway")
        elif applied and (Decimal(applied[0]["amount"]) != record["amount"]
                          or applied[0]["gateway_charge_id"] != record["gateway_charge_id"]):
            report.fail(name, f"{key}: {applied[0]['amount']} of {applied[0]['gateway_charge_id']} at the gateway, "
                              f"{record['amount']} of {record['gateway_charge_id']} recorded")


_VENDOR_EFFECT = {"cancel": "cancellation", "set_quantity": "quantity_change"}


def _vendor_operation_per_request(report: Report, records: dict[str, list[dict[str, Any]]],
                                  ledger: dict[str, Any]) -> None:
    """provisioning's vendor operations: one per request, and the vendor sandbox applied at most that one.
    Two succeeded cancellations of one vendor subscription, neither found already applied, are two
    effects whatever the vendor's ledger says."""
    if "vendor_operations" not in records:
        return  # the store was not read
    name = "one vendor operation per request"
    operations = records["vendor_operations"]
    per_request = Counter(op["request_id"] for op in operations)
    applied_cancels = Counter(op["vendor_subscription_id"] for op in operations
                              if op["operation"] == "cancel" and op["status"] == "succeeded"
                              and not op["already_applied"])
    effects: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in ledger.get("effects", []):
        if e.get("type") in _VENDOR_EFFECT.values():
            effects[e.get("request_id") or ""].append(e)
    ops = {op["request_id"]: op for op in operations}
    for request_id in sorted(set(ops) | set(effects)):
        report.checked[name] += 1
        op, applied = ops.get(request_id), effects.get(request_id, [])
        if per_request[request_id] > 1:
            report.fail(name, f"{request_id}: {per_request[request_id]} vendor operations recorded")
        elif op is None:
            report.fail(name, f"{request_id}: applied at the vendor, no operation recorded")
        elif applied and (op["status"] != "succeeded" or any(e["type"] != _VENDOR_EFFECT[op["operation"]]
                                                             for e in applied)):
            report.fail(name, f"{request_id}: {op['operation']} {op['status']}, the vendor applied "
                              f"{[e['type'] for e in applied]}")
        elif len(applied) > 1:
            report.fail(name, f"{request_id}: {len(applied)} vendor effects")
        elif op["operation"] == "cancel" and op["status"] == "succeeded" and not op["already_applied"] and not applied:
            report.fail(name, f"{request_id}: cancellation succeeded, the vendor applied none")
    for vendor_subscription_id, count in sorted(applied_cancels.items()):
        if count > 1:
            report.fail(name, f"{vendor_subscription_id}: canceled at the vendor by {count} requests")


# Per service: what "half done" looks like in its own tables, as SQL counts.
_HALF_DONE: dict[str, dict[str, str]] = {
    "billing": {"locked_subscriptions": "SELECT count(*) FROM subscriptions WHERE provisioning_status = 'In Progress'"},
    "provisioning": {"pending_vendor_calls": "SELECT count(*) FROM vendor_operations WHERE status = 'pending'"},
    "payment_gateway": {
        "pending_refunds": "SELECT count(*) FROM refunds WHERE status = 'pending'",
        "overdrawn_charges": "SELECT count(*) FROM charges WHERE refunded_amount > amount",
    },
    "notification": {"pending_emails": "SELECT count(*) FROM emails WHERE status = 'pending'"},
}


async def read_databases(urls: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Counts of unpublished outbox rows and half-done work, from each service's own database."""
    found: dict[str, dict[str, Any]] = {}
    for service, url in urls.items():
        engine = db.make_engine(url)
        try:
            async with engine.connect() as conn:
                tables = await conn.run_sync(lambda sync: sa_inspect(sync).get_table_names())
                if "outbox" not in tables:
                    continue  # a service without a relational store of its own
                facts: dict[str, Any] = {
                    "outbox": (await conn.execute(select(func.count()).select_from(text("outbox")))).scalar_one()}
                for what, sql in _HALF_DONE.get(service, {}).items():
                    facts[what] = (await conn.execute(text(sql))).scalar_one()
                if service == "payment_gateway":
                    facts["refund_books"] = await _refund_books(conn)
            found[service] = facts
        finally:
            await engine.dispose()
    return found


# What the record checks read from cancelflow's own stores: service -> what -> query (amounts as Decimal).
_RECORDS = {
    "payment_gateway": {
        "charges": select(table("charges", column("charge_id", String), column("amount", Numeric(12, 2)),
                                column("refunded_amount", Numeric(12, 2)))),
        "refunds": select(table("refunds", column("idempotency_key", String), column("request_id", String),
                                column("charge_id", String), column("gateway_charge_id", String),
                                column("amount", Numeric(12, 2)), column("status", String))),
    },
    "provisioning": {
        "vendor_operations": select(table("vendor_operations", column("request_id", String),
                                          column("vendor_subscription_id", String), column("operation", String),
                                          column("status", String), column("already_applied", Boolean))),
    },
}


async def read_records(urls: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """payment-gateway's charges and refunds and provisioning's vendor operations, from their databases."""
    found: dict[str, list[dict[str, Any]]] = {}
    for service, queries in _RECORDS.items():
        if service not in urls:
            continue
        engine = db.make_engine(urls[service])
        try:
            async with engine.connect() as conn:
                for what, query in queries.items():
                    found[what] = [dict(row) for row in (await conn.execute(query)).mappings()]
        finally:
            await engine.dispose()
    return found


async def collect(client: Any, mails: list[EmailMessage], database_urls: dict[str, str]) -> Evidence:
    """Everything a run left behind, from a running stack (`client` is a `cancelflow_tools.ops.StackClient`)."""
    import orjson

    from cancelflow import topics
    from cancelflow_tools.ops import read_all

    bootstrap = client.endpoints.bootstrap
    statuses = [orjson.loads(r.value)["payload"] for r in await read_all(bootstrap, topics.STATUS, client.settings)]
    dead = [orjson.loads(r.value)["payload"] for r in await read_all(bootstrap, topics.DLQ, client.settings)]
    _, vendor = await client.get_json(f"{client.endpoints.vendor}/_sandbox/ledger")
    _, gateway = await client.get_json(f"{client.endpoints.gateway}/_sandbox/ledger")
    evidence = Evidence(statuses, dead, vendor, gateway, list(mails), database_urls)
    evidence.databases = await read_databases_when_drained(database_urls)
    evidence.records = await read_records(database_urls)
    return evidence


async def read_databases_when_drained(urls: dict[str, str], *, within_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The databases once every outbox has drained: a row committed just before the run ended (the last
    status record, say) is published and deleted a moment later. A row still there after `within_s`
    is a violation."""
    deadline = time.monotonic() + within_s
    while True:
        found = await read_databases(urls)
        if not any(facts.get("outbox") for facts in found.values()) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)  # the relays publish on their own schedule: look again


# --- refunds per charge and period versus the formula (CONTRACT.md section 5) ----------------------
# Judged from payment-gateway's own store, and written apart from payment_gateway.domain on purpose:
# a checker sharing the code it checks would share its mistakes.

FORMULA = "refunds per charge and period within the formula"
_CHARGES_SQL = "SELECT gateway_charge_id, amount, period_start, period_end, quantity FROM charges"
_REFUNDS_SQL = ("SELECT idempotency_key, gateway_charge_id, amount, status, licenses, licenses_paid, effective_date "
                "FROM refunds WHERE idempotency_key LIKE 'cf-refund-%' AND status <> 'failed'")


async def _refund_books(conn: Any) -> dict[str, list[dict[str, Any]]]:
    return {"charges": [dict(r) for r in (await conn.execute(text(_CHARGES_SQL))).mappings()],
            "refunds": [dict(r) for r in (await conn.execute(text(_REFUNDS_SQL))).mappings()]}


def _refunds_follow_the_formula(report: Report, databases: dict[str, dict[str, Any]]) -> None:
    books = (databases.get("payment_gateway") or {}).get("refund_books")
    if books is None:
        return
    for what in refund_formula_violations(books["charges"], books["refunds"], report):
        report.fail(FORMULA, what)


def refund_formula_violations(charges: list[dict[str, Any]], refunds: list[dict[str, Any]],
                              report: Report | None = None) -> list[str]:
    """Per gateway charge: the licenses its cancellation refunds removed never exceed the licenses it paid
    for, and together they refund no more than
    round_half_even(captured * sum(licenses * unused_days) / (licenses_paid * period_days), 2)."""
    found: list[str] = []
    by_charge: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for refund in refunds:
        if refund["licenses"] is not None:  # refunds from before the basis was recorded cannot be judged
            by_charge[refund["gateway_charge_id"]].append(refund)
    for gateway_charge_id, taken in sorted(by_charge.items()):
        if report is not None:
            report.checked[FORMULA] += 1
        records = [c for c in charges if c["gateway_charge_id"] == gateway_charge_id]
        if not records:
            found.append(f"{gateway_charge_id}: refunded, but no such charge")
            continue
        captured = min(_cents(c["amount"]) for c in records)
        start, end = _day(records[0]["period_start"]), _day(records[0]["period_end"])
        period_days = (end - start).days
        said = {c["quantity"] for c in records if c["quantity"]}
        counted = {r["licenses_paid"] for r in taken}
        if len(counted) > 1 or (said and counted != said):
            found.append(f"{gateway_charge_id}: refunds count {sorted(counted)} licenses paid, the charge says "
                         f"{sorted(said) or 'nothing'}")
        paid_for = min(said or counted)
        licenses = sum(r["licenses"] for r in taken)
        if licenses > paid_for:
            found.append(f"{gateway_charge_id}: {licenses} licenses refunded of {paid_for} paid for")
        license_days = sum(r["licenses"] * min(max((end - _day(r["effective_date"])).days, 0), period_days)
                           for r in taken)
        with localcontext() as exact:
            exact.prec = 60
            allowed = (captured * license_days / (paid_for * period_days) if period_days > 0 and paid_for > 0
                       else Decimal(0)).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
        refunded = sum((_cents(r["amount"]) for r in taken), Decimal("0.00"))
        if refunded > allowed:
            found.append(f"{gateway_charge_id}: {refunded} refunded for {licenses} of {paid_for} licenses, "
                         f"the formula allows {allowed}")
    return found


def _cents(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("0.01"))


def _day(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
