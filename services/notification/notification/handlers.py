"""Which emails a request's outcome owes, recorded in the same transaction as the event's inbox.

Handlers only *record* owed emails (status `pending`, with the rendered message and a Message-ID
derived from request and kind); `sender.py` delivers them. So a redelivered event owes nothing new,
and an SMTP outage delays mail without losing it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update

from cancelflow.events import (
    CancellationReceived,
    Failed,
    PlatformCommitted,
    RefundIssued,
    RequestDeclined,
    Source,
    SubscriptionActivated,
    VendorCancellationRequested,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.uow import UnitOfWork
from notification import orm, render

log = get_logger(__name__)

# Which emails each failure source owes (customer first, then support).
FAILURE_EMAILS: dict[Source, tuple[str, ...]] = {
    Source.vendor: ("failed_vendor",),
    Source.platform: ("failed_platform", "support_platform_failure"),
    Source.payment: ("manual_review", "support_manual_review"),
}


class NotificationHandlers:
    def __init__(self, *, sender_address: str, support_email: str) -> None:
        self.sender_address = sender_address
        self.support_email = support_email

    # --- facts we keep --------------------------------------------------------------------------

    async def subscription_activated(self, msg: Message, uow: UnitOfWork) -> None:
        facts: SubscriptionActivated = msg.payload  # type: ignore[assignment]
        values = dict(account_id=facts.account_id, email=facts.customer.email, name=facts.customer.name,
                      product_name=facts.product_name)
        table = orm.contacts
        found = (await uow.session.execute(select(table.c.subscription_id).where(
            table.c.subscription_id == facts.subscription_id))).first()
        if found:
            await uow.session.execute(update(table).where(
                table.c.subscription_id == facts.subscription_id).values(**values))
        else:
            await uow.session.execute(insert(table).values(subscription_id=facts.subscription_id, **values))

    async def cancellation_received(self, msg: Message, uow: UnitOfWork) -> None:
        e: CancellationReceived = msg.payload  # type: ignore[assignment]
        if await self._request(uow, str(e.request_id)) is not None:
            return
        await uow.session.execute(insert(orm.requests).values(
            request_id=str(e.request_id), account_id=e.account_id, subscription_id=e.subscription_id,
            target=e.target, mode=e.mode.value, opt_out_of_emails=e.opt_out_of_emails,
            facts={"charge_ids": e.charge_ids, "reason": e.reason}))

    async def vendor_requested(self, msg: Message, uow: UnitOfWork) -> None:
        e: VendorCancellationRequested = msg.payload  # type: ignore[assignment]
        await self._learn(uow, str(e.request_id), vendor=e.vendor, vendor_subscription_id=e.vendor_subscription_id,
                          effective_date=e.effective_date.isoformat(),
                          new_quantity=e.new_quantity or None,
                          removed_quantity=(e.current_quantity - e.new_quantity) if e.new_quantity else None)

    async def platform_committed(self, msg: Message, uow: UnitOfWork) -> None:
        e: PlatformCommitted = msg.payload  # type: ignore[assignment]
        await self._learn(uow, str(e.request_id), effective_date=e.effective_date.isoformat(),
                          access_end_date=e.access_end_date.isoformat())

    # --- outcomes -------------------------------------------------------------------------------

    async def refund_issued(self, msg: Message, uow: UnitOfWork) -> None:
        e: RefundIssued = msg.payload  # type: ignore[assignment]
        if await self._is_charges_request(uow, str(e.request_id)):
            await self.charges_refunded(msg, uow)
            return
        refund = {"amount": f"{e.amount:.2f}", "currency": e.currency, "status": e.status}
        await self._owe(uow, str(e.request_id), ("completed",), refund=refund)

    async def request_declined(self, msg: Message, uow: UnitOfWork) -> None:
        e: RequestDeclined = msg.payload  # type: ignore[assignment]
        await self._owe(uow, str(e.request_id), ("declined",), decided_by=e.decided_by, note=e.note or None)

    async def failed(self, msg: Message, uow: UnitOfWork) -> None:
        e: Failed = msg.payload  # type: ignore[assignment]
        if e.source is Source.payment and e.details.get("dispute"):
            await self.dispute_review(msg, uow)
            return
        kinds = FAILURE_EMAILS.get(e.source)
        if not kinds:
            return  # rejected requests get their answer from the status, not by email
        details = dict(e.details)
        refunds = details.get("refunds") or []
        refund = None
        if refunds:
            first = refunds[0]
            refund = {"amount": first["amount"], "currency": first["currency"], "status": "failed",
                      "charge_id": first["charge_id"], "idempotency_key": first["idempotency_key"],
                      "gateway_error": first.get("error")}
        await self._owe(uow, str(e.request_id), kinds, error_source=e.source.value, error_code=e.code,
                        error_message=e.message, reason=e.message, refund=refund,
                        transactions=refunds or None, **{k: v for k, v in details.items()
                                                         if k in ("vendor", "vendor_subscription_id")})

    # --- the multiple-charge flow (target charges) ------------------------------------------------

    async def charges_refunded(self, msg: Message, uow: UnitOfWork) -> None:
        """Every listed duplicate was refunded: one email listing each refunded charge and amount."""
        e: RefundIssued = msg.payload  # type: ignore[assignment]
        charges = [{"charge_id": line.charge_id, "amount": f"{line.amount:.2f}", "currency": line.currency,
                    "kind": line.kind or "refund", "status": "refunded"}
                   for line in e.lines if line.outcome == "succeeded"]
        refund = {"amount": f"{e.amount:.2f}", "currency": e.currency, "status": e.status}
        await self._owe(uow, str(e.request_id), ("charges_refunded",), charges=charges, refund=refund)

    async def dispute_review(self, msg: Message, uow: UnitOfWork) -> None:
        """Some listed charges are not provably duplicates: the customer is told it is under review (with
        what was refunded already), support gets the case with the reason and every transaction."""
        e: Failed = msg.payload  # type: ignore[assignment]
        details = e.details
        # The message is the per-charge reasons: shown once, as the reason.
        await self._owe(uow, str(e.request_id), FAILURE_EMAILS[Source.payment], error_source=e.source.value,
                        error_code=e.code, reason=e.message,
                        charges=details.get("charges") or None, transactions=details.get("transactions") or None)

    async def _is_charges_request(self, uow: UnitOfWork, request_id: str) -> bool:
        request = await self._request(uow, request_id)
        return request is not None and request["target"] == "charges"

    # --- helpers --------------------------------------------------------------------------------

    async def _request(self, uow: UnitOfWork, request_id: str) -> dict[str, Any] | None:
        row = (await uow.session.execute(select(orm.requests).where(
            orm.requests.c.request_id == request_id))).mappings().first()
        return dict(row) if row else None

    async def _learn(self, uow: UnitOfWork, request_id: str, **facts: Any) -> None:
        row = await self._request(uow, request_id)
        if row is None:
            return
        merged = {**row["facts"], **{k: v for k, v in facts.items() if v is not None}}
        await uow.session.execute(update(orm.requests).where(orm.requests.c.request_id == request_id)
                                  .values(facts=merged))

    async def _contact(self, uow: UnitOfWork, request: dict[str, Any]) -> dict[str, Any] | None:
        table = orm.contacts
        query = (select(table).where(table.c.subscription_id == request["subscription_id"])
                 if request["subscription_id"] else select(table).where(table.c.account_id == request["account_id"]))
        row = (await uow.session.execute(query.limit(1))).mappings().first()
        # Never mail a customer of another account (a not_owner request must not reach them).
        return dict(row) if row and row["account_id"] == request["account_id"] else None

    async def _owe(self, uow: UnitOfWork, request_id: str, kinds: tuple[str, ...], **extra: Any) -> None:
        request = await self._request(uow, request_id)
        if request is None:
            log.warning("outcome for a request we never saw; no email", request_id=request_id)
            return
        contact = await self._contact(uow, request)
        context = {
            "request_id": request_id, "account_id": request["account_id"],
            "subscription_id": request["subscription_id"] or "", "mode": request["mode"],
            "customer_name": contact["name"] if contact else None,
            "product_name": contact["product_name"] if contact else None,
            "support_email": self.support_email,
            **request["facts"], **{k: v for k, v in extra.items() if v is not None},
        }
        opted_out = await self._opted_out(uow, request["account_id"])
        for kind in kinds:
            await self._record(uow, request, kind, context, contact, opted_out)
        if request["opt_out_of_emails"] and not opted_out:
            # This outcome email is still sent; nothing after it (CONTRACT.md section 5).
            await uow.session.execute(insert(orm.opt_outs).values(
                account_id=request["account_id"], request_id=request_id, at=utcnow()))

    async def _opted_out(self, uow: UnitOfWork, account_id: str) -> bool:
        return (await uow.session.execute(select(orm.opt_outs.c.account_id).where(
            orm.opt_outs.c.account_id == account_id))).first() is not None

    async def _record(self, uow: UnitOfWork, request: dict[str, Any], kind: str, context: dict[str, Any],
                      contact: dict[str, Any] | None, opted_out: bool) -> None:
        message_id = render.message_id_for(request["request_id"], kind)
        table = orm.emails
        if (await uow.session.execute(select(table.c.id).where(table.c.message_id == message_id))).first():
            return  # owed once already
        audience = render.audience(kind)
        to = self.support_email if audience == "support" else (contact["email"] if contact else None)
        status = "pending"
        raw = None
        if audience == "customer" and (to is None or opted_out):
            status = "suppressed"
        subject, _, _ = render.render(kind, context)
        if status == "pending":
            raw = render.build_message(kind, context, sender=self.sender_address, to=to,  # type: ignore[arg-type]
                                       message_id=message_id).as_bytes()
        now = utcnow()
        await uow.session.execute(insert(table).values(
            request_id=request["request_id"], kind=kind, audience=audience, subject=subject,
            message_id=message_id, status=status, raw=raw, attempts=0, next_attempt_at=now, created_at=now))
