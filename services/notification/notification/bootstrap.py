"""Builds notification: the facts it keeps, the emails outcomes owe, and the sender."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.service import ServiceRuntime
from cancelflow.settings import service_settings
from cancelflow.sql import Db, Query
from notification import orm, render
from notification.adapters.mailer import MailerPool
from notification.handlers import EMAILS_DUE, NotificationHandlers
from notification.sender import EmailSender

CONTACT = Query(select(orm.contacts.c.account_id)
                .where(orm.contacts.c.subscription_id == bindparam("subscription_id")))
EMAILS_OF_REQUEST = Query(select(
    orm.emails.c.kind, orm.emails.c.audience, orm.emails.c.subject, orm.emails.c.status, orm.emails.c.attempts,
    orm.emails.c.message_id, orm.emails.c.sent_at, orm.emails.c.last_error,
).where(orm.emails.c.request_id == bindparam("request_id")).order_by(orm.emails.c.id))


def build() -> ServiceRuntime:
    settings = service_settings("notification")
    runtime = ServiceRuntime("notification", settings, orm.metadata, orm.messaging)
    handlers = NotificationHandlers(sender_address=settings.mail_from, support_email=settings.support_email)
    mailer = MailerPool.from_settings(settings)
    sender = EmailSender(mailer, runtime.new_uow, max_backoff_s=settings.smtp_retry_max_s,
                         in_flight=settings.smtp_connections)
    runtime.on_start.append(render.load_templates)
    runtime.add_route(Route(topics.PLATFORM_SUBSCRIPTIONS, {"SubscriptionActivated": handlers.subscription_activated},
                            batch=True, facts=True))
    runtime.add_route(Route(topics.SAGA, {
        "CancellationReceived": handlers.cancellation_received,
        "VendorCancellationRequested": handlers.vendor_requested,
        "PlatformCommitted": handlers.platform_committed,
        "RefundIssued": handlers.refund_issued,
        "Failed": handlers.failed,
        "RequestDeclined": handlers.request_declined,
        "RequestStuck": handlers.request_stuck,
        # Steps that owe no email: lines of the timeline support alerts show.
        **dict.fromkeys(["ApprovalPending", "CancellationScheduled", "AutoRenewStopped", "VendorProvisioned",
                         "VendorCancellationFailed", "EmailSent", "DisputeStepRecorded"], handlers.timeline),
    }, batch=True))
    runtime.http.router.add_get("/contacts/{subscription_id}", _contact_known(runtime))
    runtime.add_view("/requests/{request_id}/emails", _emails_of)
    runtime.wake_on(EMAILS_DUE, sender.notify)
    runtime.tasks.append(sender.run)
    runtime.on_stop.append(mailer.close)
    return runtime


def _contact_known(runtime: ServiceRuntime):  # type: ignore[no-untyped-def]
    """Whether we can reach the subscription's customer; never the address itself (no PII over HTTP)."""

    async def known(request: web.Request) -> web.Response:
        async with runtime.sessions() as session:
            row = await Db(session).first(CONTACT, subscription_id=request.match_info["subscription_id"])
        return web.json_response({"known": row is not None}, status=200 if row else 404)

    return known


async def _emails_of(db: Db, request_id: str) -> dict[str, Any]:
    """The emails a request owes and their delivery status (kind, audience, subject; no addresses)."""
    return {"emails": await db.all(EMAILS_OF_REQUEST, request_id=request_id)}
