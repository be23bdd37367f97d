"""The multiple-charge flow (target `charges`): the dispute service owns the case from the intake on.

    CancellationReceived(charges) -> validate (rejected: not_owner | unknown_charge)
        -> detect duplicates (pure rules, dispute.domain) -> ChargesVerificationRequested
    ChargesVerified (payment-gateway asked the gateway) -> confirm each duplicate
        -> DuplicateRefundRequested (keys cf-dispute-<request>-<charge>)
    DuplicateRefundsIssued (payment-gateway, through the refund guard) -> conclude:
        everything listed refunded -> RefundIssued (completed, the customer gets the list)
        anything else -> Failed(payment, manual_review) with the reason per charge (support gets the case)

Every step is an audit record in this service's database (time, actor, data), and, as a
DisputeStepRecorded event, a line of the request's status history. A case moves forward only from the
state each answer expects, so redelivered or repeated events change nothing.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, insert, select

from cancelflow.events import (
    CancellationReceived,
    ChargeCaptured,
    ChargesVerificationRequested,
    ChargesVerified,
    DisputedCharge,
    DisputeStepRecorded,
    DuplicateRefundLine,
    DuplicateRefundRequested,
    DuplicateRefundsIssued,
    Failed,
    RefundIssued,
    RefundLine,
    Source,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.facts import FACTS_WAIT_S, FactsProgress
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.sql import Query
from dispute import domain, orm
from dispute.domain import Charge, Reason
from dispute.repository import DisputeRepository

log = get_logger(__name__)

ACTOR = "dispute"
GATEWAY_ACTOR = "payment_gateway"

KNOWN_CHARGE = Query(select(orm.charges.c.charge_id).where(orm.charges.c.charge_id == bindparam("charge_id")))
ADD_CHARGE = Query(insert(orm.charges))


class Audit:
    """Records a step in the database and, unless it is already told by another saga event, in the
    request's status history (DisputeStepRecorded)."""

    def __init__(self, repo: DisputeRepository, uow: UnitOfWork, request_id: Any) -> None:
        self.repo, self.uow, self.request_id = repo, uow, request_id

    async def record(self, step: str, message: str, *, actor: str = ACTOR, charge_id: str | None = None,
                     data: dict[str, Any] | None = None, publish: bool = True) -> None:
        data = data or {}
        await self.repo.add_audit(request_id=str(self.request_id), step=step, actor=actor, charge_id=charge_id,
                                  message=message, data=data)
        if publish:
            self.uow.emit(DisputeStepRecorded(request_id=self.request_id, step=step, actor=actor,
                                              charge_id=charge_id, message=message, data=data))


def _line_charge(line: dict[str, Any]) -> Charge:
    captured = line["captured_at"]
    if captured.tzinfo is None:
        captured = captured.replace(tzinfo=UTC)
    return Charge(charge_id=line["charge_id"], account_id="", subscription_id=line["subscription_id"],
                  gateway_charge_id=line["gateway_charge_id"], amount=Decimal(str(line["amount"])).quantize(
                      Decimal("0.01")), currency=line["currency"], captured_at=captured)


def _money(amount: Any, currency: str | None) -> str:
    return f"{Decimal(str(amount)):.2f} {currency}"


# A case whose charges are not known yet, waiting for the upstream facts (`settle_waiting`).
AWAITING_FACTS = "awaiting_facts"


class DisputeHandlers:
    def __init__(self, *, window_hours: int = 72, facts: FactsProgress | None = None,
                 facts_wait_s: float = FACTS_WAIT_S) -> None:
        self.window_hours = window_hours
        self.facts = facts or FactsProgress()
        self.facts_wait_s = facts_wait_s

    # --- facts we keep -------------------------------------------------------------------------

    async def charge_captured(self, msg: Message, uow: UnitOfWork) -> None:
        charge: ChargeCaptured = msg.payload  # type: ignore[assignment]
        if await uow.db.first(KNOWN_CHARGE, charge_id=charge.charge_id) is not None:
            return
        await uow.db.run(
            ADD_CHARGE,
            charge_id=charge.charge_id, account_id=charge.account_id, subscription_id=charge.subscription_id,
            gateway_charge_id=charge.gateway_charge_id, amount=charge.amount, currency=charge.currency,
            # UTC always: SQLite keeps the wall clock only, and the window compares captures.
            captured_at=charge.captured_at.astimezone(UTC), period_start=charge.period_start,
            period_end=charge.period_end)
        for request_id in await DisputeRepository(uow.db).awaiting_facts(charge.account_id):
            await self.settle_waiting(uow, request_id)

    # --- a new case: validation and detection ---------------------------------------------------

    async def cancellation_received(self, msg: Message, uow: UnitOfWork) -> None:
        request: CancellationReceived = msg.payload  # type: ignore[assignment]
        if request.target != "charges":
            return
        repo = DisputeRepository(uow.db)
        request_id = str(request.request_id)
        if await repo.case(request_id) is not None:
            log.info("dispute seen before: no new effect", request_id=request_id)
            return
        charge_ids = domain.unique(request.charge_ids)
        requester = domain.requester(request.requested_by)
        await repo.add_case(request_id=request_id, account_id=request.account_id, state="validating",
                            requested_by=requester, reason=request.reason or None, charge_ids=charge_ids,
                            window_hours=self.window_hours)
        audit = Audit(repo, uow, request.request_id)
        # Already in the status history through CancellationReceived: kept here for the audit only.
        await audit.record("received", f"Dispute of charges {', '.join(charge_ids)} received", actor=requester,
                           data={"account_id": request.account_id, "charge_ids": charge_ids,
                                 "reason": request.reason}, publish=False)

        known = await repo.charges(charge_ids)
        if set(charge_ids) - set(known) and not self.facts.read_up_to(msg.envelope.occurred_at):
            # Their facts may be behind us in a backlog (a restart): the case waits for them, within a
            # bound (`settle_waiting`), rather than being rejected as unknown now.
            await repo.set_case(request_id, state=AWAITING_FACTS)
            log.info("charges unknown while their facts are not read up to the request: waiting",
                     request_id=request_id, charge_ids=sorted(set(charge_ids) - set(known)))
            uow.wrote(AWAITING_FACTS)  # wakes the waiter once committed
            return
        await self._examine(uow, repo, audit, request_id, request.account_id, charge_ids, known)

    async def settle_waiting(self, uow: UnitOfWork, request_id: str) -> bool:
        """A case waiting for its charges' facts: examined when they have all arrived, or once the facts
        are read up to when it arrived, or after `facts_wait_s` (then rejected `unknown_charge`).
        False while it still waits (or waits no more)."""
        repo = DisputeRepository(uow.db)
        case = await repo.case(request_id)
        if case is None or case["state"] != AWAITING_FACTS:
            return False
        charge_ids = list(case["charge_ids"])
        known = await repo.charges(charge_ids)
        arrived = case["created_at"] if case["created_at"].tzinfo else case["created_at"].replace(tzinfo=UTC)
        if set(charge_ids) - set(known) and not self.facts.handled_up_to(arrived) and (
                utcnow() - arrived).total_seconds() < self.facts_wait_s:
            return False
        await repo.set_case(request_id, state="validating")
        await self._examine(uow, repo, Audit(repo, uow, request_id), request_id, case["account_id"], charge_ids,
                            known)
        return True

    async def _examine(self, uow: UnitOfWork, repo: DisputeRepository, audit: Audit, request_id: str,
                       account_id: str, charge_ids: list[str], known: dict[str, Charge]) -> None:
        """Validate the listed charges, then detect the duplicates and ask the gateway about them."""
        rejection = domain.validate(account_id, charge_ids, known)
        if rejection is not None:
            await self._reject(uow, repo, audit, request_id, charge_ids, known, rejection)
            return
        listed = [known[c] for c in charge_ids]
        await audit.record("validated", f"Validated: {len(listed)} listed charge(s) of account "
                                        f"{account_id}, all known",
                           data={"outcome": "accepted", "charge_ids": charge_ids})

        window = timedelta(hours=self.window_hours)
        findings = domain.detect(listed, await repo.account_charges(account_id), window)
        for position, finding in enumerate(findings):
            charge = finding.charge
            await repo.add_line(
                request_id=request_id, charge_id=charge.charge_id, position=position,
                subscription_id=charge.subscription_id, gateway_charge_id=charge.gateway_charge_id,
                amount=charge.amount, currency=charge.currency, captured_at=charge.captured_at,
                duplicate="yes" if finding.duplicate else "no", reason=finding.reason.value, detail=finding.detail,
                related_charge_id=finding.related.charge_id if finding.related else None,
                outcome="verifying" if finding.duplicate else "manual_review")
            verdict = ":" if finding.duplicate else " is not a duplicate:"
            await audit.record(
                "detected", f"Charge {charge.charge_id} ({_money(charge.amount, charge.currency)}){verdict} "
                            f"{finding.detail}",
                charge_id=charge.charge_id,
                data={"duplicate": finding.duplicate, "reason": finding.reason.value,
                      "related_charge_id": finding.related.charge_id if finding.related else None,
                      "window_hours": self.window_hours, "transaction": charge.transaction()})

        candidates = [f.charge for f in findings if f.duplicate]
        if not candidates:
            case = await repo.case(request_id)
            assert case is not None
            await self._conclude(uow, repo, audit, request_id, case)
            return
        await repo.set_case(request_id, state="verifying")
        uow.emit(ChargesVerificationRequested(
            request_id=request_id, account_id=account_id,
            charges=[DisputedCharge(charge_id=c.charge_id, gateway_charge_id=c.gateway_charge_id, amount=c.amount,
                                    currency=c.currency) for c in candidates]))

    async def _reject(self, uow: UnitOfWork, repo: DisputeRepository, audit: Audit, request_id: str,
                      charge_ids: list[str], known: dict[str, Charge], rejection: domain.Rejection) -> None:
        for position, charge_id in enumerate(charge_ids):
            bad = charge_id in rejection.charge_ids
            own = known.get(charge_id) if not bad else None
            await repo.add_line(
                request_id=request_id, charge_id=charge_id, position=position,
                subscription_id=own.subscription_id if own else None,
                gateway_charge_id=own.gateway_charge_id if own else None,
                amount=own.amount if own else None, currency=own.currency if own else None,
                captured_at=own.captured_at if own else None, duplicate="no",
                reason=rejection.code.value if bad else "not_examined",
                detail=rejection.message if bad else "not examined: the request was rejected",
                outcome="rejected")
        await repo.set_case(request_id, state="rejected", error_code=rejection.code.value)
        # The status history gets this from the Failed event itself.
        await audit.record("validated", f"Rejected ({rejection.code.value}): {rejection.message}",
                           data={"outcome": "rejected", "code": rejection.code.value,
                                 "charge_ids": list(rejection.charge_ids)}, publish=False)
        uow.emit(Failed(request_id=request_id, source=Source.validation, code=rejection.code.value,
                        message=rejection.message, retryable=False))

    # --- the gateway's view ---------------------------------------------------------------------

    async def charges_verified(self, msg: Message, uow: UnitOfWork) -> None:
        event: ChargesVerified = msg.payload  # type: ignore[assignment]
        repo = DisputeRepository(uow.db)
        request_id = str(event.request_id)
        case = await repo.case(request_id)
        if case is None or case["state"] != "verifying":
            return  # a repeated answer, or one for a case we do not own
        audit = Audit(repo, uow, event.request_id)
        lines = {line["charge_id"]: line for line in await repo.lines(request_id)}
        confirmed: list[dict[str, Any]] = []
        for seen in event.charges:
            line = lines.get(seen.charge_id)
            if line is None or line["outcome"] != "verifying":
                continue
            verdict = domain.confirm(_line_charge(line), seen)
            data = {"confirmed": verdict.ok, **seen.model_dump(mode="json")}
            if verdict.ok:
                await repo.set_line(request_id, seen.charge_id, gateway_state=seen.state)
                confirmed.append(line)
                message = f"Gateway confirmed charge {seen.charge_id}: {verdict.detail}"
            else:
                assert verdict.reason is not None
                await repo.set_line(request_id, seen.charge_id, gateway_state=seen.state, outcome="manual_review",
                                    reason=verdict.reason.value, detail=verdict.detail)
                data["reason"] = verdict.reason.value
                message = f"Gateway check of charge {seen.charge_id}: {verdict.detail}; not refunded automatically"
            await audit.record("gateway_verified", message, actor=GATEWAY_ACTOR, charge_id=seen.charge_id, data=data)
        answered = {seen.charge_id for seen in event.charges}
        for charge_id, line in lines.items():
            if line["outcome"] == "verifying" and charge_id not in answered:
                # Not in the answer (should not happen): a person looks at it.
                await repo.set_line(request_id, charge_id, outcome="manual_review",
                                    reason=Reason.unknown_at_gateway.value,
                                    detail="the gateway's answer did not cover this charge")
        if not confirmed:
            await self._conclude(uow, repo, audit, request_id, case)
            return
        refund_lines = []
        for line in confirmed:
            key = domain.refund_key(request_id, line["charge_id"])
            await repo.set_line(request_id, line["charge_id"], outcome="refund_requested", idempotency_key=key)
            await audit.record("refund_requested",
                               f"Refund of {_money(line['amount'], line['currency'])} requested for charge "
                               f"{line['charge_id']} (idempotency key {key})",
                               charge_id=line["charge_id"],
                               data={"amount": f"{Decimal(str(line['amount'])):.2f}", "currency": line["currency"],
                                     "gateway_charge_id": line["gateway_charge_id"], "idempotency_key": key,
                                     "duplicate_of": line["related_charge_id"]})
            refund_lines.append(DuplicateRefundLine(
                charge_id=line["charge_id"], gateway_charge_id=line["gateway_charge_id"],
                amount=Decimal(str(line["amount"])), currency=line["currency"], idempotency_key=key,
                duplicate_of=line["related_charge_id"]))
        await repo.set_case(request_id, state="refunding")
        uow.emit(DuplicateRefundRequested(request_id=event.request_id, account_id=case["account_id"],
                                          lines=refund_lines))

    # --- the refunds' outcome -------------------------------------------------------------------

    async def duplicate_refunds_issued(self, msg: Message, uow: UnitOfWork) -> None:
        event: DuplicateRefundsIssued = msg.payload  # type: ignore[assignment]
        repo = DisputeRepository(uow.db)
        request_id = str(event.request_id)
        case = await repo.case(request_id)
        if case is None or case["state"] != "refunding":
            return
        audit = Audit(repo, uow, event.request_id)
        lines = {line["charge_id"]: line for line in await repo.lines(request_id)}
        for result in event.lines:
            line = lines.get(result.charge_id)
            if line is None or line["outcome"] != "refund_requested":
                continue
            data = result.model_dump(mode="json")
            if result.outcome == "succeeded":
                await repo.set_line(request_id, result.charge_id, outcome="refunded", refund_kind=result.kind,
                                    refund_id=result.refund_id)
                await audit.record("refund_issued",
                                   f"Gateway returned {_money(result.amount, result.currency)} of charge "
                                   f"{result.charge_id} as a {result.kind or 'refund'}"
                                   + (f" ({result.refund_id})" if result.refund_id else ""),
                                   actor=GATEWAY_ACTOR, charge_id=result.charge_id, data=data)
            else:
                reason = domain.refund_failure_reason(result.error)
                detail = (f"already refunded (by another request): {result.error}"
                          if reason is Reason.already_refunded else f"the gateway refused the refund: {result.error}")
                await repo.set_line(request_id, result.charge_id, outcome="manual_review", reason=reason.value,
                                    detail=detail, refund_error=result.error)
                await audit.record("refund_failed", f"Refund of charge {result.charge_id} not issued: {detail}",
                                   actor=GATEWAY_ACTOR, charge_id=result.charge_id,
                                   data={**data, "reason": reason.value})
        await self._conclude(uow, repo, audit, request_id, case)

    # --- the outcome ----------------------------------------------------------------------------

    async def _conclude(self, uow: UnitOfWork, repo: DisputeRepository, audit: Audit, request_id: str,
                        case: dict[str, Any]) -> None:
        """`case` as the caller read it in this transaction: only its account and charge ids are used, which
        no step changes."""
        lines = await repo.lines(request_id)
        refunded = [line for line in lines if line["outcome"] == "refunded"]
        review = [line for line in lines if line["outcome"] != "refunded"]
        refund_lines = [_refund_line(line) for line in refunded]
        if not review:
            await repo.set_case(request_id, state="completed")
            total = sum((line.amount for line in refund_lines), Decimal("0"))
            await audit.record("completed", f"Every listed charge was refunded: {total:.2f} "
                                            f"{refund_lines[0].currency}",
                               data={"refunded": [line.model_dump(mode="json") for line in refund_lines]},
                               publish=False)  # the status history shows the RefundIssued
            uow.emit(RefundIssued(request_id=audit.request_id, amount=total, currency=refund_lines[0].currency,
                                  status="succeeded", lines=refund_lines))
            return
        await repo.set_case(request_id, state="manual_review")
        reasons = "; ".join(f"{line['charge_id']}: {line['detail']}" for line in review)
        message = (f"{len(review)} of {len(lines)} listed charge(s) could not be refunded automatically "
                   f"and need a review by support: {reasons}")
        if refunded:
            message += ". Refunded: " + ", ".join(
                f"{line.charge_id} ({line.amount:.2f} {line.currency})" for line in refund_lines)
        await audit.record("escalated", f"Escalated to support: {reasons}",
                           data={"review": [{"charge_id": line["charge_id"], "reason": line["reason"],
                                             "detail": line["detail"]} for line in review],
                                 "refunded": [line.charge_id for line in refund_lines]})
        uow.emit(Failed(
            request_id=audit.request_id, source=Source.payment, code="manual_review", message=message,
            retryable=False,
            details={
                "dispute": True, "account_id": case["account_id"], "charge_ids": case["charge_ids"],
                "refunded": [line.model_dump(mode="json") for line in refund_lines],
                "review": [{"charge_id": line["charge_id"], "reason": line["reason"], "detail": line["detail"]}
                           for line in review],
                "charges": [_charge_view(line) for line in lines],
                "transactions": [_transaction(line) for line in lines],
            }))


def _refund_line(line: dict[str, Any]) -> RefundLine:
    return RefundLine(charge_id=line["charge_id"], gateway_charge_id=line["gateway_charge_id"],
                      amount=Decimal(str(line["amount"])), currency=line["currency"],
                      idempotency_key=line["idempotency_key"], kind=line["refund_kind"], outcome="succeeded",
                      refund_id=line["refund_id"])


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _charge_view(line: dict[str, Any]) -> dict[str, Any]:
    """A listed charge as the emails show it: what it was and what became of it."""
    refunded = line["outcome"] == "refunded"
    return {"charge_id": line["charge_id"],
            "amount": f"{Decimal(str(line['amount'])):.2f}" if line["amount"] is not None else None,
            "currency": line["currency"], "captured_at": _iso(line["captured_at"]),
            "kind": line["refund_kind"] if refunded else None,
            "status": "refunded" if refunded else "under review",
            "reason": None if refunded else line["detail"]}


def _transaction(line: dict[str, Any]) -> dict[str, Any]:
    """Every detail support needs to act on a listed charge by hand."""
    values = {
        "charge_id": line["charge_id"], "gateway_charge_id": line["gateway_charge_id"],
        "subscription_id": line["subscription_id"],
        "amount": f"{Decimal(str(line['amount'])):.2f}" if line["amount"] is not None else None,
        "currency": line["currency"], "captured_at": _iso(line["captured_at"]),
        "duplicate": line["duplicate"], "related_charge": line["related_charge_id"],
        "gateway_state": line["gateway_state"], "outcome": line["outcome"], "reason": line["reason"],
        "idempotency_key": line["idempotency_key"], "refund_kind": line["refund_kind"],
        "refund_id": line["refund_id"], "refund_error": line["refund_error"],
    }
    return {k: v for k, v in values.items() if v is not None}
