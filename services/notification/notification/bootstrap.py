"""Builds notification: the facts it keeps, the emails outcomes owe, and the sender."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import bindparam, select

from cancelflow import topics
from cancelflow.events import (
    ApprovalPending,
    AutoRenewStopped,
    CancellationReceived,
    CancellationScheduled,
    DisputeStepRecorded,
    EmailSent,
    Failed,
    PlatformCommitted,
    RefundIssued,
    RequestDeclined,
    RequestStuck,
    SagaEvent,
    Source,
    SubscriptionActivated,
    VendorCancellationFailed,
    VendorCancellationRequested,
    VendorProvisioned,
)
from cancelflow.messaging.dispatch import Route
from cancelflow.service import ServiceRuntime
from cancelflow.sql import Db, Query
from notification import orm, render
from notification.adapters.mailer import MailerPool
from notification.handlers import EMAILS_DUE, NotificationHandlers
from notification.sender import EmailSender
from notification.settings import Settings

CONTACT = Query(select(orm.contacts.c.account_id)
                .where(orm.contacts.c.subscription_id == bindparam("subscription_id")))
EMAILS_OF_REQUEST = Query(select(
    orm.emails.c.kind, orm.emails.c.audience, orm.emails.c.subject, orm.emails.c.status, orm.emails.c.attempts,
    orm.emails.c.message_id, orm.emails.c.sent_at, orm.emails.c.last_error,
).where(orm.emails.c.request_id == bindparam("request_id")).order_by(orm.emails.c.id))


def build() -> ServiceRuntime:
    settings = Settings()
    runtime = ServiceRuntime("notification", settings, orm.metadata, orm.messaging, failure_source=Source.notification)
    handlers = NotificationHandlers(sender_address=settings.mail_from, support_email=settings.support_email)
    mailer = MailerPool.from_settings(settings)
    sender = EmailSender(mailer, runtime.new_uow, max_backoff_s=settings.smtp_retry_max_s,
                         in_flight=settings.smtp_connections)
    runtime.on_start.append(render.load_templates)
    runtime.routes += routes(handlers)
    runtime.http.router.add_get("/contacts/{subscription_id}", _contact_known(runtime))
    runtime.add_view("/requests/{request_id}/emails", _emails_of)
    runtime.wake_on(EMAILS_DUE, sender.notify)
    runtime.tasks.append(sender.run)
    runtime.on_stop.append(mailer.close)
    return runtime


# Steps that owe no email: lines of the timeline support alerts show.
TIMELINE: list[type[SagaEvent]] = [ApprovalPending, CancellationScheduled, AutoRenewStopped, VendorProvisioned,
                                   VendorCancellationFailed, EmailSent, DisputeStepRecorded]


def routes(handlers: NotificationHandlers) -> list[Route]:
    """What notification consumes, and the handler of each event (the consume loop's and the tests')."""
    return [
        Route(topics.PLATFORM_SUBSCRIPTIONS, batch=True, facts=True)
        .on(SubscriptionActivated, handlers.subscription_activated),
        Route(topics.SAGA, batch=True)
        .on(CancellationReceived, handlers.cancellation_received)
        .on(VendorCancellationRequested, handlers.vendor_requested)
        .on(PlatformCommitted, handlers.platform_committed)
        .on(RefundIssued, handlers.refund_issued)
        .on(Failed, handlers.failed)
        .on(RequestDeclined, handlers.request_declined)
        .on(RequestStuck, handlers.request_stuck)
        .on_each(TIMELINE, handlers.timeline),
    ]


def _contact_known(runtime: ServiceRuntime):
    """Whether we can reach the subscription's customer; never the address itself (no PII over HTTP)."""

    async def known(request: web.Request) -> web.Response:
        async with runtime.sessions() as session:
            row = await Db(session).first(CONTACT, subscription_id=request.match_info["subscription_id"])
        return web.json_response({"known": row is not None}, status=200 if row else 404)

    return known


async def _emails_of(db: Db, request_id: str) -> dict[str, Any]:
    """The emails a request owes and their delivery status (kind, audience, subject; no addresses)."""
    return {"emails": await db.all(EMAILS_OF_REQUEST, request_id=request_id)}
