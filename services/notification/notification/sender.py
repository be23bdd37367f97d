"""Delivers owed emails: send, then mark sent and emit EmailSent in one transaction.

A crash between the SMTP send and the mark resends the same message with the same Message-ID
(at-least-once on the wire, recognisable as one message); SMTP outages back off and retry forever.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from datetime import timedelta

import structlog
from sqlalchemy import select, update

from cancelflow import metrics
from cancelflow.crashpoints import crash_point
from cancelflow.events import EmailSent, utcnow
from cancelflow.logging import get_logger
from cancelflow.messaging.uow import UnitOfWork
from notification import orm
from notification.adapters.mailer import AbstractMailer, MailDeliveryError

log = get_logger(__name__)
emails = orm.emails


class EmailSender:
    def __init__(self, mailer: AbstractMailer, new_uow: Callable[[], UnitOfWork], *, idle_poll_s: float = 0.5,
                 max_backoff_s: float = 30.0) -> None:
        self.mailer = mailer
        self.new_uow = new_uow
        self.idle_poll_s = idle_poll_s
        self.max_backoff_s = max_backoff_s
        self._wakeup = asyncio.Event()

    def notify(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            try:
                sent_any = await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("email delivery round failed", error=repr(exc))
                sent_any = False
            if not sent_any:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.idle_poll_s)
                except TimeoutError:
                    pass

    async def deliver_due(self, limit: int = 100) -> bool:
        async with self.new_uow() as uow:
            due = (await uow.session.execute(select(emails).where(
                (emails.c.status == "pending") & (emails.c.next_attempt_at <= utcnow())
            ).order_by(emails.c.id).limit(limit))).mappings().all()
        delivered = False
        for row in due:
            if await self._deliver(dict(row)):
                delivered = True
            else:
                break  # the server is away: the rest waits for the backoff too
        return delivered

    async def _deliver(self, row: dict) -> bool:
        with structlog.contextvars.bound_contextvars(request_id=row["request_id"],
                                                     correlation_id=row["request_id"]):
            return await self._deliver_one(row)

    async def _deliver_one(self, row: dict) -> bool:
        message = email.message_from_bytes(row["raw"], policy=email.policy.default)
        try:
            await self.mailer.send(message)  # type: ignore[arg-type]
        except MailDeliveryError as exc:
            await self._failed(row, exc)
            return False
        crash_point("notification.after_smtp_send")
        async with self.new_uow() as uow:
            await uow.session.execute(update(emails).where(emails.c.id == row["id"]).values(
                status="sent", sent_at=utcnow(), attempts=emails.c.attempts + 1, last_error=None))
            uow.emit(EmailSent(request_id=row["request_id"], kind=row["kind"], audience=row["audience"],
                               subject=row["subject"], message_id=row["message_id"]),
                     correlation_id=row["request_id"])
            await uow.commit(mark_processed=None)
        metrics.EMAILS.labels(row["kind"], "sent").inc()
        return True

    async def _failed(self, row: dict, exc: MailDeliveryError) -> None:
        attempts = row["attempts"] + 1
        backoff = min(self.max_backoff_s, 0.5 * 2 ** min(attempts, 8))
        status = "pending" if exc.retryable else "failed"
        metrics.EMAILS.labels(row["kind"], "retry" if exc.retryable else "failed").inc()
        log.warning("email not delivered", kind=row["kind"], attempts=attempts, error=str(exc),
                    retry_in_s=backoff if exc.retryable else None)
        async with self.new_uow() as uow:
            await uow.session.execute(update(emails).where(emails.c.id == row["id"]).values(
                status=status, attempts=attempts, last_error=str(exc),
                next_attempt_at=utcnow() + timedelta(seconds=backoff)))
            await uow.commit(mark_processed=None)
