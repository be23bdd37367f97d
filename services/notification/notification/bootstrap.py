"""Builds notification: the facts it keeps, the emails outcomes owe, and the sender."""

from __future__ import annotations

from cancelflow import topics
from cancelflow.messaging.consumer import Route
from cancelflow.service import ServiceRuntime
from cancelflow.settings import service_settings
from notification import orm
from notification.adapters.mailer import SmtpMailer
from notification.handlers import NotificationHandlers
from notification.sender import EmailSender


def build() -> ServiceRuntime:
    settings = service_settings("notification")
    runtime = ServiceRuntime("notification", settings, orm.metadata, orm.messaging)
    handlers = NotificationHandlers(sender_address=settings.mail_from, support_email=settings.support_email)
    mailer = SmtpMailer.from_settings(settings)
    sender = EmailSender(mailer, runtime.new_uow)
    runtime.add_route(Route(topics.PLATFORM_SUBSCRIPTIONS, {"SubscriptionActivated": handlers.subscription_activated}))
    runtime.add_route(Route(topics.SAGA, {
        "CancellationReceived": handlers.cancellation_received,
        "VendorCancellationRequested": handlers.vendor_requested,
        "PlatformCommitted": handlers.platform_committed,
        "RefundIssued": handlers.refund_issued,
        "Failed": handlers.failed,
    }))
    runtime.after_commit.append(sender.notify)
    runtime.tasks.append(sender.run)
    runtime.on_stop.append(mailer.close)
    return runtime
