"""Delivers owed emails: claim, send, then mark sent and emit EmailSent, one message at a time.

Each delivery is three steps, the first and last each a transaction around the SMTP handover:

1. claim: `pending` -> `sending` (with `attempted_at`), conditional on the row still being `pending`,
   committed *before* the send (the intent is on record); a whole round of due emails is claimed in
   one transaction;
2. send the stored message, whose Message-ID is derived from (request, kind) and never changes;
3. mark: `sending` -> `sent` and `EmailSent` into the outbox, conditional on the row still being
   `sending`, so EmailSent is emitted once per email whatever happens. Each message is marked as soon
   as the server accepted it, and its connection takes the next message only once the mark committed.

A process killed between 2 and 3 leaves the row `sending`. SMTP offers no way to ask the server
whether it got the message, so on restart (`recover`) such a row is sent again, *with the same
Message-ID*: mail systems recognise a message they already have by its Message-ID (duplicate
suppression in MTAs, mailbox stores and clients; the test mailbox counts distinct Message-IDs). Since
a message is recorded before its connection carries another, a kill repeats at most one message per
SMTP connection (`in_flight`, SMTP_CONNECTIONS), never a whole round (CONTRACT.md section 5, emails);
the price is one small transaction per email instead of one per round (docs/performance.md). Rows
claimed but not yet handed over are simply sent after the restart. Within a running process a row
left `sending` by an error after the send is retried the same way once its claim is older than
`stale_after_s`.

SMTP outages: a retryable failure (server unreachable, timeout, 4xx) keeps the email `pending` with
`next_attempt_at` pushed back exponentially up to `max_backoff_s` (SMTP_RETRY_MAX_SECONDS); while the
server is unreachable the whole loop waits that long too, instead of knocking once per email. Nothing
is ever given up on except a message the server refuses for good (5xx): that email becomes `failed`,
and a `Failed(source=notification)` saga event puts it in the request's status history for support.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta

import structlog
from sqlalchemy import bindparam, func, or_, select, update

from cancelflow import metrics
from cancelflow.crashpoints import crash_point
from cancelflow.events import EmailSent, Failed, Source, utcnow
from cancelflow.logging import get_logger
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.periodic import repeat
from cancelflow.sql import Query
from notification import orm
from notification.adapters.mailer import AbstractMailer, MailDeliveryError

log = get_logger(__name__)
emails = orm.emails

BACKOFF_BASE_S = 0.5

# The statements of a delivery, built once (cancelflow.sql). Each write is conditional on the row's
# status, so a row someone else moved on is left alone (rowcount 0).
_SENDING = (emails.c.id == bindparam("match_id")) & (emails.c.status == "sending")
LEFT_SENDING = Query(select(emails.c.id, emails.c.kind, emails.c.request_id).where(emails.c.status == "sending"))
LEFT_SENDING_BEFORE = Query(select(emails.c.id, emails.c.kind, emails.c.request_id)
                            .where((emails.c.status == "sending") & (emails.c.attempted_at < bindparam("before"))))
RESEND = Query(update(emails).where(_SENDING).values(status="pending"))
WAITING_STATUSES = ("pending", "sending", "awaiting_contact")
WAITING = Query(select(emails.c.status, func.count().label("emails"))
                .where(or_(*(emails.c.status == status for status in WAITING_STATUSES))).group_by(emails.c.status))
DUE = Query(select(emails).where((emails.c.status == "pending") & (emails.c.next_attempt_at <= bindparam("due_by")))
            .order_by(emails.c.id).limit(bindparam("limit")).with_for_update(skip_locked=True))
CLAIM = Query(update(emails).where((emails.c.id == bindparam("match_id")) & (emails.c.status == "pending"))
              .values(status="sending", attempts=emails.c.attempts + 1))
MARK_SENT = Query(update(emails).where(_SENDING).values(status="sent", last_error=None))
MARK_NOT_SENT = Query(update(emails).where(_SENDING))


class EmailSender:
    def __init__(self, mailer: AbstractMailer, new_uow: Callable[[], UnitOfWork], *, idle_poll_s: float = 0.5,
                 max_backoff_s: float = 60.0, stale_after_s: float = 120.0, in_flight: int = 1) -> None:
        self.mailer = mailer
        # Messages handed to SMTP and not yet recorded, at most: one per connection of the mailer.
        self._in_flight = asyncio.Semaphore(in_flight)
        self.new_uow = new_uow
        self.idle_poll_s = idle_poll_s
        self.max_backoff_s = max_backoff_s
        self.stale_after_s = stale_after_s
        self._wakeup = asyncio.Event()
        self._outage_failures = 0  # consecutive "server unreachable" failures; 0 when it answers
        self._next_stale_check = 0.0
        self._recovered = False  # `recover` ran once, at startup

    def notify(self) -> None:
        self._wakeup.set()

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row: 1, 2, 4, ... up to max_backoff_s."""
        return min(self.max_backoff_s, BACKOFF_BASE_S * 2 ** min(max(failures, 1), 16))

    async def run(self) -> None:
        await repeat(self._round, every_s=self.idle_poll_s, wakeup=self._wakeup,
                     failed="email delivery round failed", then=self._pause_after)

    async def _round(self) -> bool:
        if not self._recovered:  # nothing is sent before the emails left `sending` are pending again
            await self.recover()
            self._recovered = True
        return await self.deliver_due()

    def _pause_after(self, sent_any: bool | None) -> float | None:
        if self._outage_failures:
            # The server is away: wait out the backoff (new emails do not cut it short).
            return self.backoff(self._outage_failures)
        return 0 if sent_any else None

    async def recover(self, *, older_than_s: float | None = None) -> int:
        """Emails left `sending` (by a process that died after or during the SMTP handover) become
        `pending` again: they are sent once more, with the same Message-ID. At startup every such row
        is ours (one sender per database); later only claims older than `older_than_s`."""
        before = None if older_than_s is None else utcnow() - timedelta(seconds=older_than_s)
        async with self.new_uow() as uow:
            if before is None:
                found = await uow.db.all(LEFT_SENDING)
            else:
                found = await uow.db.all(LEFT_SENDING_BEFORE, before=before)
            if not found:
                return 0
            now = utcnow()
            await uow.db.run_many(RESEND, [{"match_id": row["id"], "next_attempt_at": now} for row in found])
            await uow.commit(mark_processed=None)
        for row in found:
            metrics.EMAILS.labels(row["kind"], "resend").inc()
            log.warning("email may have been handed to SMTP before an interruption; sending it again with the "
                        "same Message-ID", kind=row["kind"], request_id=row["request_id"])
        return len(found)

    async def count_waiting(self) -> dict[str, int]:
        """Emails owed and not sent, by status, into `cancelflow_emails_waiting` (and returned)."""
        async with self.new_uow() as uow:
            counts = {row["status"]: row["emails"] for row in await uow.db.all(WAITING)}
        waiting = {status: int(counts.get(status, 0)) for status in WAITING_STATUSES}
        for status, count in waiting.items():
            metrics.EMAILS_WAITING.labels(status).set(count)
        return waiting

    async def deliver_due(self, limit: int = 100) -> bool:
        """One round: the pending emails whose time has come, oldest first, claimed in one transaction,
        handed to SMTP concurrently (`in_flight` at once, as many as the mailer has connections), each
        recorded as sent as soon as the server accepted it. True when one was sent."""
        if time.monotonic() >= self._next_stale_check:
            self._next_stale_check = time.monotonic() + self.stale_after_s / 4
            await self.recover(older_than_s=self.stale_after_s)
            await self.count_waiting()
        # While the server is unreachable a round is one probe, not a knock per email.
        claimed = await self._claim_due(1 if self._outage_failures else limit)
        if not claimed:
            return False
        outcomes = await asyncio.gather(*(self._deliver(row) for row in claimed), return_exceptions=True)
        if any(outcome is None for outcome in outcomes):
            self._outage_failures = 0
        outages_before, unreachable = self._outage_failures, False
        for row, error in zip(claimed, outcomes, strict=True):
            if isinstance(error, MailDeliveryError):
                with structlog.contextvars.bound_contextvars(request_id=row["request_id"],
                                                             correlation_id=row["request_id"]):
                    unreachable |= await self._failed(row, error) == "unreachable"
        if unreachable:  # one outage per round, however many emails it held up
            self._outage_failures = outages_before + 1
        for error in outcomes:  # a mark that could not commit: its row stays `sending` (stale_after_s)
            if isinstance(error, BaseException) and not isinstance(error, MailDeliveryError):
                raise error
        return any(outcome is None for outcome in outcomes)

    async def _claim_due(self, limit: int) -> list[dict]:
        """Record the intent before the sends: due `pending` rows become `sending`, in one transaction.
        Rows another sender holds are skipped (PostgreSQL); SQLite serializes the whole transaction."""
        async with self.new_uow() as uow:
            due = await uow.db.all(DUE, due_by=utcnow(), limit=limit)
            if due:
                now = utcnow()
                await uow.db.run_many(CLAIM, [{"match_id": row["id"], "attempted_at": now} for row in due])
                await uow.commit(mark_processed=None)
        return due

    async def _deliver(self, row: dict) -> MailDeliveryError | None:
        """Send one message and record it as sent before this connection carries another, so a kill
        repeats at most the messages in flight."""
        async with self._in_flight:
            try:
                await self.mailer.send(bytes(row["raw"]))
            except MailDeliveryError as exc:
                return exc
            crash_point("notification.after_smtp_send")
            await self._mark_sent(row)
        return None

    async def _mark_sent(self, row: dict) -> None:
        """`sending` -> `sent` and its `EmailSent`, if the row is still `sending` (so EmailSent is emitted
        once per email whatever happens)."""
        started = time.perf_counter()
        async with self.new_uow() as uow:
            if await uow.db.run(MARK_SENT, match_id=row["id"], sent_at=utcnow()) == 1:
                uow.emit(EmailSent(request_id=row["request_id"], kind=row["kind"], audience=row["audience"],
                                   subject=row["subject"], message_id=row["message_id"]),
                         correlation_id=row["request_id"])
            await uow.commit(mark_processed=None)
        metrics.EMAIL_RECORD_SECONDS.observe(time.perf_counter() - started)
        metrics.EMAILS.labels(row["kind"], "sent").inc()

    async def _failed(self, row: dict, exc: MailDeliveryError) -> str:
        attempts = row["attempts"] + 1
        unreachable = exc.retryable and exc.smtp_code is None  # no answer at all, not this message's fault
        if unreachable:
            # The loop waits (run()); the email is due again as soon as the wait is over.
            self._outage_failures += 1
            backoff = self.backoff(self._outage_failures)
            retry_at = utcnow()
        else:
            self._outage_failures = 0  # the server answered
            backoff = self.backoff(attempts)
            retry_at = utcnow() + timedelta(seconds=backoff)
        status = "pending" if exc.retryable else "failed"
        metrics.EMAILS.labels(row["kind"], "retry" if exc.retryable else "failed").inc()
        log.warning("email not delivered", kind=row["kind"], attempts=attempts, error=str(exc),
                    retry_in_s=backoff if exc.retryable else None)
        async with self.new_uow() as uow:
            await uow.db.run(MARK_NOT_SENT, match_id=row["id"], status=status, last_error=str(exc),
                             next_attempt_at=retry_at)
            if not exc.retryable:
                # Support sees it in the request's history; the customer's outcome is unchanged.
                uow.emit(Failed(request_id=row["request_id"], source=Source.notification, code="email_rejected",
                                message=f"{row['audience']} email \"{row['subject']}\" was refused by the mail "
                                        f"server: {exc}",
                                details={"kind": row["kind"], "message_id": row["message_id"],
                                         "smtp_code": exc.smtp_code}),
                         correlation_id=row["request_id"])
            await uow.commit(mark_processed=None)
        if unreachable:
            return "unreachable"
        return "retry" if exc.retryable else "failed"
