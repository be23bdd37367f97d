"""Which emails a request's outcome owes, recorded in the same transaction as the event's inbox.

Handlers only *record* owed emails; `sender.py` delivers them. An owed email is one row of `emails`,
unique by its Message-ID (derived from request and kind, `render.message_id_for`), so a redelivered
event owes nothing new and an SMTP outage delays mail without losing it. A row starts as:

- `pending`: rendered (`raw`), waiting for the sender;
- `awaiting_contact`: a customer email whose address notification does not know yet (the outcome
  arrived before the subscription's `SubscriptionActivated`, which travels on another topic). Its
  render context is kept; `subscription_activated` renders it and makes it `pending`;
- `suppressed`: a customer email of an account that opted out with an *earlier* request
  (CONTRACT.md section 5: the outcome email of the opting-out request is still sent; nothing after
  it). Support alerts are never suppressed.

Notification also keeps a short timeline of each request (`facts["history"]`, from the saga events it
sees) so that support alerts say what already happened, in particular for a stuck request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import bindparam, insert, or_, select, update

from cancelflow import durations, timeline
from cancelflow.events import (
    CancellationReceived,
    Failed,
    PlatformCommitted,
    RefundIssued,
    RequestDeclined,
    RequestStuck,
    SagaEvent,
    Source,
    SubscriptionActivated,
    VendorCancellationRequested,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import HandlerContext
from cancelflow.sql import Query
from notification import orm, render

log = get_logger(__name__)

# Which emails each failure source owes (customer first, then support).
FAILURE_EMAILS: dict[Source, tuple[str, ...]] = {
    Source.vendor: ("failed_vendor",),
    Source.platform: ("failed_platform", "support_platform_failure"),
    Source.payment: ("manual_review", "support_manual_review"),
}
# A stuck request: support gets the case, the customer is told it is being reviewed.
STUCK_EMAILS: tuple[str, ...] = ("manual_review", "support_stuck")

TIMELINE_LIMIT = 40  # entries kept per request (the latest ones)

# The statements the handlers run, built once (cancelflow.sql).
contacts, requests, emails, opt_outs = orm.contacts, orm.requests, orm.emails, orm.opt_outs
CONTACT_KNOWN = Query(select(contacts.c.subscription_id)
                      .where(contacts.c.subscription_id == bindparam("subscription_id")))
ADD_CONTACT = Query(insert(contacts))
SET_CONTACT = Query(update(contacts).where(contacts.c.subscription_id == bindparam("match_subscription_id")))
CONTACT_OF_SUBSCRIPTION = Query(select(contacts).where(contacts.c.subscription_id == bindparam("subscription_id"))
                                .limit(1))
CONTACT_OF_ACCOUNT = Query(select(contacts).where(contacts.c.account_id == bindparam("account_id")).limit(1))
REQUEST = Query(select(requests).where(requests.c.request_id == bindparam("request_id")))
ADD_REQUEST = Query(insert(requests))
SET_REQUEST = Query(update(requests).where(requests.c.request_id == bindparam("match_request_id")))
AWAITING_CONTACT = Query(
    select(emails.c.id, emails.c.kind, emails.c.message_id, emails.c.context, requests.c.subscription_id)
    .select_from(emails.join(requests, emails.c.request_id == requests.c.request_id))
    .where(emails.c.status == "awaiting_contact")
    # Never another account's customer: the request's account must own this subscription.
    .where(requests.c.account_id == bindparam("account_id"))
    .where(or_(requests.c.subscription_id == bindparam("subscription_id"), requests.c.subscription_id.is_(None)))
    .order_by(emails.c.id))
RELEASE_EMAIL = Query(update(emails).where(emails.c.id == bindparam("match_id"))
                      .values(status="pending", context=None))
EMAIL_OWED = Query(select(emails.c.id).where(emails.c.message_id == bindparam("message_id")))
ADD_EMAIL = Query(insert(emails))
EMAILS_DUE = "emails"  # `UnitOfWork.wrote`: a commit that made an email due wakes the sender
OPTED_OUT_BY = Query(select(opt_outs.c.request_id).where(opt_outs.c.account_id == bindparam("account_id")))
ADD_OPT_OUT = Query(insert(opt_outs))


def _at(msg: Message) -> str:
    return _timestamp(msg.envelope.occurred_at)


def _timestamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _jsonable(context: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(context, default=str))


class NotificationHandlers:
    def __init__(self, *, sender_address: str, support_email: str) -> None:
        self.sender_address = sender_address
        self.support_email = support_email

    # --- facts we keep --------------------------------------------------------------------------

    async def subscription_activated(self, msg: Message[SubscriptionActivated], uow: HandlerContext) -> None:
        facts = msg.payload
        values = dict(account_id=facts.account_id, email=facts.customer.email, name=facts.customer.name,
                      product_name=facts.product_name)
        if await uow.db.first(CONTACT_KNOWN, subscription_id=facts.subscription_id):
            await uow.db.run(SET_CONTACT, match_subscription_id=facts.subscription_id, **values)
        else:
            await uow.db.run(ADD_CONTACT, subscription_id=facts.subscription_id, **values)
        await self._release_awaiting(uow, facts)

    async def _release_awaiting(self, uow: HandlerContext, facts: SubscriptionActivated) -> None:
        """Customer emails owed before the address was known: render them now and queue them."""
        rows = await uow.db.all(AWAITING_CONTACT, account_id=facts.account_id, subscription_id=facts.subscription_id)
        for row in rows:
            context = dict(row["context"] or {})
            context["customer_name"] = context.get("customer_name") or facts.customer.name
            context["customer_email"] = facts.customer.email
            if row["subscription_id"] == facts.subscription_id:
                context["product_name"] = context.get("product_name") or facts.product_name
            raw = render.message_bytes(row["kind"], context, render.render(row["kind"], context),
                                       sender=self.sender_address, to=facts.customer.email,
                                       message_id=row["message_id"])
            await uow.db.run(RELEASE_EMAIL, match_id=row["id"], raw=raw, next_attempt_at=utcnow())
            uow.wrote(EMAILS_DUE)
            log.info("customer contact arrived; owed email queued", kind=row["kind"])

    async def cancellation_received(self, msg: Message[CancellationReceived], uow: HandlerContext) -> None:
        e = msg.payload
        if await self._request(uow, str(e.request_id)) is not None:
            return
        await uow.db.run(
            ADD_REQUEST, request_id=str(e.request_id), account_id=e.account_id, subscription_id=e.subscription_id,
            target=e.target, mode=e.mode.value, opt_out_of_emails=e.opt_out_of_emails,
            facts={"charge_ids": e.charge_ids, "reason": e.reason,
                   "history": [{"at": _at(msg), "message": line} for line in timeline.lines(e)]})

    async def vendor_requested(self, msg: Message[VendorCancellationRequested], uow: HandlerContext) -> None:
        e = msg.payload
        await self._learn(uow, str(e.request_id), vendor=e.vendor, vendor_subscription_id=e.vendor_subscription_id,
                          effective_date=e.effective_date.isoformat(),
                          access_end_date=(e.snapshot.access_end_date.isoformat()
                                           if e.snapshot and e.snapshot.access_end_date else None),
                          new_quantity=e.new_quantity or None,
                          removed_quantity=(e.current_quantity - e.new_quantity) if e.new_quantity else None,
                          _note=msg)

    async def platform_committed(self, msg: Message[PlatformCommitted], uow: HandlerContext) -> None:
        e = msg.payload
        await self._learn(uow, str(e.request_id), effective_date=e.effective_date.isoformat(),
                          access_end_date=e.access_end_date.isoformat(), _note=msg)

    # --- the timeline only (what support alerts show) ---------------------------------------------

    async def timeline(self, msg: Message[SagaEvent], uow: HandlerContext) -> None:
        """A saga step that owes no email: its lines of the request's timeline."""
        await self._learn(uow, str(msg.payload.request_id), _note=msg)

    # --- outcomes -------------------------------------------------------------------------------

    async def refund_issued(self, msg: Message[RefundIssued], uow: HandlerContext) -> None:
        e = msg.payload
        request = await self._learn(uow, str(e.request_id), _note=msg)
        if request is not None and request["target"] == "charges":
            await self.charges_refunded(msg, uow, request)
            return
        refund = {"amount": f"{e.amount:.2f}", "currency": e.currency, "status": e.status}
        await self._owe(uow, str(e.request_id), request, ("completed",), refund=refund)

    async def request_declined(self, msg: Message[RequestDeclined], uow: HandlerContext) -> None:
        e = msg.payload
        request = await self._learn(uow, str(e.request_id), _note=msg)
        await self._owe(uow, str(e.request_id), request, ("declined",), decided_by=e.decided_by,
                        note=e.note or None)

    async def failed(self, msg: Message[Failed], uow: HandlerContext) -> None:
        e = msg.payload
        request = await self._learn(uow, str(e.request_id), _note=msg)
        if e.source is Source.payment and e.details.get("dispute"):
            await self.dispute_review(msg, uow, request)
            return
        kinds = FAILURE_EMAILS.get(e.source)
        if not kinds:
            return  # rejected requests get their answer from the status, not by email
        details = dict(e.details)
        refunds = details.get("refunds") or []
        refund = None
        if refunds:
            # The one a person must look at: a refused refund (auto-renew may have been what failed)
            first = next((r for r in refunds if r.get("outcome") != "succeeded"), refunds[0])
            refund = {"amount": first["amount"], "currency": first["currency"],
                      "status": "succeeded" if first.get("outcome") == "succeeded" else "failed",
                      "charge_id": first["charge_id"], "idempotency_key": first["idempotency_key"],
                      "gateway_error": first.get("error")}
        await self._owe(uow, str(e.request_id), request, kinds, error_source=e.source.value, error_code=e.code,
                        error_message=e.message, reason=e.message, refund=refund,
                        transactions=refunds or None, **{k: v for k, v in details.items()
                                                         if k in ("vendor", "vendor_subscription_id",
                                                                  "platform_error", "scheduled")})

    async def request_stuck(self, msg: Message[RequestStuck], uow: HandlerContext) -> None:
        """No progress for too long: support gets everything it needs, the customer that it is being
        reviewed. Once per request (the Message-IDs), however often the tracker says it again."""
        e = msg.payload
        request_id = str(e.request_id)
        extra = dict(stage=e.stage, updated_at=_timestamp(e.since), stuck_for=durations.text(e.stuck_for_seconds, words=True))
        request = await self._request(uow, request_id)
        if request is None:
            # Stuck before notification learnt of it (CancellationReceived): support still hears of it;
            # the customer cannot be told, as we do not know who they are.
            log.warning("stuck request we never saw; alerting support only", request_id=request_id)
            request = {"request_id": request_id, "account_id": None, "subscription_id": None, "mode": None,
                       "target": None, "opt_out_of_emails": False, "facts": {}}
            await self._owe_request(uow, request, ("support_stuck",), **extra)
            return
        await self._owe_request(uow, request, STUCK_EMAILS, **extra)

    # --- the multiple-charge flow (target charges) ------------------------------------------------

    async def charges_refunded(self, msg: Message[RefundIssued], uow: HandlerContext, request: dict[str, Any] | None) -> None:
        """Every listed duplicate was refunded: one email listing each refunded charge and amount."""
        e = msg.payload
        charges = [{"charge_id": line.charge_id, "amount": f"{line.amount:.2f}", "currency": line.currency,
                    "kind": line.kind or "refund", "status": "refunded"}
                   for line in e.lines if line.outcome == "succeeded"]
        refund = {"amount": f"{e.amount:.2f}", "currency": e.currency, "status": e.status}
        await self._owe(uow, str(e.request_id), request, ("charges_refunded",), charges=charges, refund=refund)

    async def dispute_review(self, msg: Message[Failed], uow: HandlerContext, request: dict[str, Any] | None) -> None:
        """Some listed charges are not provably duplicates: the customer is told it is under review (with
        what was refunded already), support gets the case with the reason and every transaction."""
        e = msg.payload
        details = e.details
        # The message is the per-charge reasons: shown once, as the reason.
        await self._owe(uow, str(e.request_id), request, FAILURE_EMAILS[Source.payment],
                        error_source=e.source.value, error_code=e.code, reason=e.message,
                        charges=details.get("charges") or None, transactions=details.get("transactions") or None)

    # --- helpers --------------------------------------------------------------------------------

    async def _request(self, uow: HandlerContext, request_id: str) -> dict[str, Any] | None:
        return await uow.db.first(REQUEST, request_id=request_id)

    async def _learn(self, uow: HandlerContext, request_id: str, *, _note: Message[SagaEvent] | None = None,
                     **facts: Any) -> dict[str, Any] | None:
        """Merge what a step taught us into the request's facts; `_note` adds its event's timeline lines
        (cancelflow.timeline: what the tracker's status history says).

        Returns the request as it now stands (None if unknown), so that an outcome handler does not
        read it again: the facts are JSON values (strings, numbers, lists), the same as a re-read."""
        row = await self._request(uow, request_id)
        if row is None:
            return None
        merged = {**row["facts"], **{k: v for k, v in facts.items() if v is not None}}
        if _note is not None and (told := timeline.lines(_note.payload)):
            at = _at(_note)
            history = [*merged.get("history", []), *({"at": at, "message": line} for line in told)]
            merged["history"] = history[-TIMELINE_LIMIT:]
        await uow.db.run(SET_REQUEST, match_request_id=request_id, facts=merged)
        return {**row, "facts": merged}

    async def _contact(self, uow: HandlerContext, request: dict[str, Any]) -> dict[str, Any] | None:
        if request["account_id"] is None:
            return None
        if request["subscription_id"]:
            row = await uow.db.first(CONTACT_OF_SUBSCRIPTION, subscription_id=request["subscription_id"])
        else:
            row = await uow.db.first(CONTACT_OF_ACCOUNT, account_id=request["account_id"])
        # Never mail a customer of another account (a not_owner request must not reach them).
        return row if row and row["account_id"] == request["account_id"] else None

    async def _owe(self, uow: HandlerContext, request_id: str, request: dict[str, Any] | None,
                   kinds: tuple[str, ...], **extra: Any) -> None:
        """`request` is the row the handler's `_learn` left (None: notification never saw the request)."""
        if request is None:
            log.warning("outcome for a request we never saw; no email", request_id=request_id)
            return
        await self._owe_request(uow, request, kinds, **extra)

    async def _owe_request(self, uow: HandlerContext, request: dict[str, Any], kinds: tuple[str, ...],
                           **extra: Any) -> None:
        request_id = request["request_id"]
        contact = await self._contact(uow, request)
        context = {
            "request_id": request_id, "account_id": request["account_id"],
            "subscription_id": request["subscription_id"] or "", "mode": request["mode"],
            "customer_name": contact["name"] if contact else None,
            "customer_email": contact["email"] if contact else None,
            "product_name": contact["product_name"] if contact else None,
            "support_email": self.support_email,
            **request["facts"], **{k: v for k, v in extra.items() if v is not None},
        }
        # The request whose outcome turned the account's customer emails off, if any (read once: the
        # emails recorded below do not change it). Only an *earlier* request's opt-out suppresses: the
        # opting-out request's own outcome emails (all of them: e.g. "being reviewed" for a stuck
        # request, then "completed") still go.
        opted_out_by = (await uow.db.scalar(OPTED_OUT_BY, account_id=request["account_id"])
                        if request["account_id"] is not None else None)
        opted_out = opted_out_by is not None and opted_out_by != request_id
        for kind in kinds:
            await self._record(uow, request, kind, context, contact, opted_out)
        if request["opt_out_of_emails"] and request["account_id"] is not None and opted_out_by is None:
            # This request's outcome email is still sent; nothing after it (CONTRACT.md section 5).
            await uow.db.run(ADD_OPT_OUT, account_id=request["account_id"], request_id=request_id, at=utcnow())

    async def _record(self, uow: HandlerContext, request: dict[str, Any], kind: str, context: dict[str, Any],
                      contact: dict[str, Any] | None, opted_out: bool) -> None:
        message_id = render.message_id_for(request["request_id"], kind)
        if await uow.db.first(EMAIL_OWED, message_id=message_id):
            return  # owed once already
        audience = render.audience(kind)
        raw = None
        kept_context = None
        if audience == "support":
            status, to = "pending", self.support_email
        elif opted_out:
            status, to = "suppressed", None
        elif contact is None:
            # Not dropped: rendered and queued when the customer's contact arrives (subscription_activated).
            status, to = "awaiting_contact", None
            kept_context = _jsonable(context)
            log.warning("customer contact not known yet; email kept until it arrives", kind=kind)
        else:
            status, to = "pending", contact["email"]
        rendered = render.render(kind, context)
        subject = rendered[0]
        if status == "pending":
            raw = render.message_bytes(kind, context, rendered, sender=self.sender_address,
                                       to=to, message_id=message_id)  # type: ignore[arg-type]
        now = utcnow()
        await uow.db.run(
            ADD_EMAIL, request_id=request["request_id"], kind=kind, audience=audience, subject=subject,
            message_id=message_id, status=status, raw=raw, context=kept_context, attempts=0,
            next_attempt_at=now, created_at=now)
        if status == "pending":
            uow.wrote(EMAILS_DUE)
