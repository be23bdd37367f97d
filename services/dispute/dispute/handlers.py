"""The multiple-charge flow (target `charges`): the dispute service owns the case from the intake on.

    CancellationReceived(charges) -> validate (rejected: not_owner | unknown_charge)
        -> detect duplicates (pure rules, dispute.domain) -> ChargesVerificationRequested
    ChargesVerified (payment-gateway asked the gateway) -> confirm each duplicate
        -> DuplicateRefundRequested (keys cf-dispute-<request>-<charge>)
    DuplicateRefundsIssued (payment-gateway, through the refund guard) -> conclude:
        everything listed refunded -> RefundIssued (completed, the customer gets the list)
        anything else -> Failed(payment, manual_review) with the reason per charge (support gets the case)

Every step is an audit record in this service's database (time, actor, data), and, as a
DisputeStepRecorded event, a line of the request's status history. Each handler loads the case
(dispute.domain.Case), acts on it and saves it, then emits what it recorded. A case moves forward only
from the state each answer expects, so redelivered or repeated events change nothing.
"""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import bindparam, insert, select

from cancelflow.events import (
    CancellationReceived,
    ChargeCaptured,
    ChargesVerified,
    DuplicateRefundsIssued,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import HandlerContext
from cancelflow.messaging.facts import FACTS_WAIT_S, FactsProgress
from cancelflow.sql import Query
from dispute import orm
from dispute.domain import Case, Charge, State
from dispute.repository import DisputeRepository

log = get_logger(__name__)

KNOWN_CHARGE = Query(select(orm.charges.c.charge_id).where(orm.charges.c.charge_id == bindparam("charge_id")))
ADD_CHARGE = Query(insert(orm.charges))

# A case whose charges are not known yet, waiting for the upstream facts (`settle_waiting`).
AWAITING_FACTS = State.awaiting_facts


class DisputeHandlers:
    def __init__(self, *, window_hours: int = 72, facts: FactsProgress | None = None,
                 facts_wait_s: float = FACTS_WAIT_S) -> None:
        self.window_hours = window_hours
        self.facts = facts or FactsProgress()
        self.facts_wait_s = facts_wait_s

    # --- facts we keep -------------------------------------------------------------------------

    async def charge_captured(self, msg: Message[ChargeCaptured], uow: HandlerContext) -> None:
        charge = msg.payload
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

    async def cancellation_received(self, msg: Message[CancellationReceived], uow: HandlerContext) -> None:
        request = msg.payload
        if request.target != "charges":
            return
        repo = DisputeRepository(uow.db)
        request_id = str(request.request_id)
        if await repo.get(request_id) is not None:
            log.info("dispute seen before: no new effect", request_id=request_id)
            return
        case = Case.open(request_id=request_id, account_id=request.account_id, requested_by=request.requested_by,
                         reason=request.reason, charge_ids=request.charge_ids, window_hours=self.window_hours,
                         at=utcnow())
        known = await repo.charges(case.charge_ids)
        if set(case.charge_ids) - set(known) and not self.facts.read_up_to(msg.envelope.occurred_at):
            # Their facts may be behind us in a backlog (a restart): the case waits for them, within a
            # bound (`settle_waiting`), rather than being rejected as unknown now.
            case.wait_for_facts()
            log.info("charges unknown while their facts are not read up to the request: waiting",
                     request_id=request_id, charge_ids=sorted(set(case.charge_ids) - set(known)))
            uow.wrote(AWAITING_FACTS)  # wakes the waiter once committed
        else:
            await self._examine(repo, case, known)
        await self._save(uow, repo, case)

    async def settle_waiting(self, uow: HandlerContext, request_id: str) -> bool:
        """A case waiting for its charges' facts: examined when they have all arrived, or once the facts
        are read up to when it arrived, or after `facts_wait_s` (then rejected `unknown_charge`).
        False while it still waits (or waits no more)."""
        repo = DisputeRepository(uow.db)
        case = await repo.get(request_id)
        if case is None or case.state is not State.awaiting_facts:
            return False
        known = await repo.charges(case.charge_ids)
        if set(case.charge_ids) - set(known) and not self.facts.handled_up_to(case.opened_at) and (
                utcnow() - case.opened_at).total_seconds() < self.facts_wait_s:
            return False
        case.resume()
        await self._examine(repo, case, known)
        await self._save(uow, repo, case)
        return True

    async def _examine(self, repo: DisputeRepository, case: Case, known: dict[str, Charge]) -> None:
        case.examine(known, await repo.account_charges(case.account_id), self.window_hours)

    # --- the gateway's view ---------------------------------------------------------------------

    async def charges_verified(self, msg: Message[ChargesVerified], uow: HandlerContext) -> None:
        event = msg.payload
        repo = DisputeRepository(uow.db)
        case = await repo.get(str(event.request_id))
        if case is None or case.state is not State.verifying:
            return  # a repeated answer, or one for a case we do not own
        case.verified(event.charges)
        await self._save(uow, repo, case)

    # --- the refunds' outcome -------------------------------------------------------------------

    async def duplicate_refunds_issued(self, msg: Message[DuplicateRefundsIssued], uow: HandlerContext) -> None:
        event = msg.payload
        repo = DisputeRepository(uow.db)
        case = await repo.get(str(event.request_id))
        if case is None or case.state is not State.refunding:
            return
        case.refunds_issued(event.lines)
        await self._save(uow, repo, case)

    @staticmethod
    async def _save(uow: HandlerContext, repo: DisputeRepository, case: Case) -> None:
        await repo.save(case)
        for event in case.events:
            uow.emit(event)
