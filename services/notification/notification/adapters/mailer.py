"""Sending email: `SmtpMailer` (aiosmtplib) for real, `FakeMailer` for unit tests.

Every failure comes out as one exception type, `MailDeliveryError`, that tells the caller the only thing
it needs to decide: retry later (`retryable=True`: server unreachable, timed out, 4xx) or give up and
record the failure (`retryable=False`: 5xx, a message the server can never accept).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections import deque
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr
from typing import Protocol, runtime_checkable

import aiosmtplib
from aiosmtplib import (
    SMTPException,
    SMTPNotSupported,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from cancelflow.logging import get_logger
from cancelflow.mail import header_block
from cancelflow.metrics import EXTERNAL_CALL_SECONDS

log = get_logger(__name__)


class MailDeliveryError(Exception):
    """A message was not handed over to the SMTP server.

    `retryable`: sending the same message again later may work. `smtp_code`: the server's reply code,
    when the server answered at all.
    """

    def __init__(self, message: str, *, retryable: bool, smtp_code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.smtp_code = smtp_code

    def __repr__(self) -> str:
        return f"MailDeliveryError({str(self)!r}, retryable={self.retryable}, smtp_code={self.smtp_code})"


# What a mailer accepts: a message object, or a message already rendered to bytes (what the
# notification service stores), which is handed over as it is: no parsing and no re-rendering.
Mail = EmailMessage | bytes

_HEADERS_ONLY = BytesHeaderParser(policy=compat32)


def envelope(raw: bytes) -> tuple[str, list[str]]:
    """(MAIL FROM, RCPT TO) of a rendered message, from its From, To and Cc headers."""
    # Only the header block is parsed (the parser reads all it is given, bodies included).
    headers = _HEADERS_ONLY.parsebytes(header_block(raw) + b"\n\n")
    sender = parseaddr(str(headers.get("From", "")))[1]
    recipients = [address for _name, address in getaddresses(
        [str(v) for field in ("To", "Cc") for v in headers.get_all(field, [])]) if address]
    if not sender or not recipients:
        raise ValueError("the message has no From or no To address")
    return sender, recipients


@runtime_checkable
class AbstractMailer(Protocol):
    async def send(self, msg: Mail) -> None:
        """Hand `msg` to the mail server (From/To taken from its headers); raise MailDeliveryError."""
        ...

    async def close(self) -> None: ...


def _retryable_code(code: int) -> bool:
    # SMTP: 4xx transient ("try again later"), 5xx permanent. Anything else (aiosmtplib uses -1 for
    # a garbled reply) says nothing about the message itself, so trying again is the safe choice.
    return not 500 <= code <= 599


class SmtpMailer:
    """Sends over one SMTP connection, reused across sends and reopened when it was dropped.

    Sends are serialized (an SMTP session carries one transaction at a time); `timeout` bounds each
    send, connecting included. Use `async with SmtpMailer(...)` or call `close()` at shutdown.
    """

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        port: int = 1025,
        *,
        timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool | None = None,
        validate_certs: bool = True,
    ) -> None:
        self.hostname = hostname
        self.port = port
        self.timeout = timeout
        self._options = {
            "username": username, "password": password, "use_tls": use_tls, "start_tls": start_tls,
            "validate_certs": validate_certs,
        }
        self.connections_opened = 0  # observability: a number that keeps growing means no reuse
        self._smtp: aiosmtplib.SMTP | None = None
        self._smtp_loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: object, **kwargs: object) -> SmtpMailer:
        """From cancelflow settings: SMTP_HOST/SMTP_PORT, or the embedded sink when SMTP_HOST is unset."""
        hostname, port = settings.smtp_address  # type: ignore[attr-defined]
        return cls(hostname, port, **kwargs)  # type: ignore[arg-type]

    async def __aenter__(self) -> SmtpMailer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _where(self) -> str:
        return f"{self.hostname}:{self.port}"

    async def send(self, msg: Mail) -> None:
        started = time.perf_counter()
        outcome = "ok"
        try:
            await self._send_classified(msg)
        except MailDeliveryError as exc:
            outcome = "retryable" if exc.retryable else "permanent"
            raise
        finally:
            EXTERNAL_CALL_SECONDS.labels("smtp", "send", outcome).observe(time.perf_counter() - started)

    async def _send_classified(self, msg: Mail) -> None:
        """Send, turning every failure into a MailDeliveryError."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._send(msg)
            except asyncio.CancelledError:
                self._discard()  # cancelled mid-transaction: the session's state is unknown
                raise
            except TimeoutError as exc:  # ours or aiosmtplib's (SMTPTimeoutError is a TimeoutError)
                # The session may be mid-command; it cannot be trusted for the next message.
                self._discard()
                raise MailDeliveryError(f"SMTP {self._where}: timed out after {self.timeout}s",
                                        retryable=True) from exc
            except SMTPRecipientsRefused as exc:
                codes = [r.code for r in exc.recipients]
                raise MailDeliveryError(
                    f"SMTP {self._where}: all recipients refused: "
                    + "; ".join(f"{r.code} {r.message}" for r in exc.recipients),
                    retryable=any(_retryable_code(c) for c in codes), smtp_code=codes[0] if codes else None,
                ) from exc
            except SMTPResponseException as exc:
                if exc.code == 421:  # "service closing transmission channel": this session is over
                    self._discard()
                raise MailDeliveryError(f"SMTP {self._where}: server replied {exc.code} {exc.message}",
                                        retryable=_retryable_code(exc.code), smtp_code=exc.code) from exc
            except SMTPNotSupported as exc:  # e.g. non-ASCII address and no SMTPUTF8: same next time
                raise MailDeliveryError(f"SMTP {self._where}: {exc.message}", retryable=False) from exc
            except ValueError as exc:  # no From/To header, malformed address: the message is at fault
                raise MailDeliveryError(f"message cannot be sent: {exc}", retryable=False) from exc
            except (SMTPException, OSError) as exc:  # refused, reset, unreachable, disconnected
                self._discard()
                raise MailDeliveryError(f"SMTP {self._where}: {exc}", retryable=True) from exc

    async def _send(self, msg: Mail) -> None:
        smtp, fresh = await self._connection()
        try:
            refused, _ = await self._transaction(smtp, msg)
        except (SMTPServerDisconnected, ConnectionError):
            self._discard()
            if fresh:
                raise
            # A reused session can have been closed by the server while idle (idle timeout, restart)
            # without us noticing yet; the transaction did not complete, so one more try on a new
            # connection is the expected behaviour, not a duplicate.
            smtp, _ = await self._connection()
            refused, _ = await self._transaction(smtp, msg)
        if refused:
            # Accepted for some recipients: the message went out, so this is not a failed send.
            log.warning("mailer.some_recipients_refused", refused=len(refused),
                        codes=sorted({r.code for r in refused.values()}))

    @staticmethod
    async def _transaction(smtp: aiosmtplib.SMTP, msg: Mail) -> tuple[dict, str]:
        if isinstance(msg, bytes):
            sender, recipients = envelope(msg)
            return await smtp.sendmail(sender, recipients, msg)
        return await smtp.send_message(msg)

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The open session, or a new one; the flag says whether it was opened just now."""
        loop = asyncio.get_running_loop()
        if self._smtp is not None and (self._smtp_loop is not loop or not self._smtp.is_connected):
            self._discard()
        if self._smtp is not None:
            return self._smtp, False
        smtp = aiosmtplib.SMTP(hostname=self.hostname, port=self.port, timeout=self.timeout,
                               **self._options)  # type: ignore[arg-type]
        await smtp.connect()
        self._smtp, self._smtp_loop = smtp, loop
        self.connections_opened += 1
        return smtp, True

    def _discard(self) -> None:
        smtp, self._smtp, self._smtp_loop = self._smtp, None, None
        if smtp is not None:
            try:
                smtp.close()
            except RuntimeError:  # its event loop is already closed (a mailer outliving a test's loop)
                pass

    async def close(self) -> None:
        """Say QUIT politely if the session is alive, then close it. Never raises."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            if smtp.is_connected and self._smtp_loop is asyncio.get_running_loop():
                await smtp.quit(timeout=min(self.timeout, 2.0))
        except (SMTPException, OSError, TimeoutError):
            pass
        finally:
            self._discard()


class MailerPool:
    """A few `SmtpMailer` connections: the sends of a round go out concurrently, each over a reused
    connection (SMTP_CONNECTIONS)."""

    def __init__(self, mailers: list[SmtpMailer]) -> None:
        self._mailers = mailers
        self._idle: asyncio.Queue[SmtpMailer] = asyncio.Queue()
        for mailer in mailers:
            self._idle.put_nowait(mailer)

    @classmethod
    def from_settings(cls, settings: object, **kwargs: object) -> MailerPool:
        count = int(settings.smtp_connections)  # type: ignore[attr-defined]
        return cls([SmtpMailer.from_settings(settings, **kwargs) for _ in range(count)])

    @property
    def connections_opened(self) -> int:
        return sum(m.connections_opened for m in self._mailers)

    async def send(self, msg: Mail) -> None:
        mailer = await self._idle.get()
        try:
            await mailer.send(msg)
        finally:
            self._idle.put_nowait(mailer)

    async def close(self) -> None:
        for mailer in self._mailers:
            await mailer.close()


class FakeMailer:
    """In-memory mailer for unit tests: records what was sent, fails on demand."""

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self.attempts = 0
        self.closed = False
        self._failures: deque[MailDeliveryError] = deque()

    def fail_next(self, error: MailDeliveryError | None = None, times: int = 1) -> None:
        """Make the next `times` sends raise `error` (default: a retryable outage)."""
        error = error or MailDeliveryError("fake SMTP outage", retryable=True)
        self._failures.extend([error] * times)

    async def send(self, msg: Mail) -> None:
        self.attempts += 1
        if self._failures:
            raise self._failures.popleft()
        if isinstance(msg, bytes):  # tests read headers and parts, as a receiving mail client would
            msg = email.message_from_bytes(msg, policy=email.policy.default)
        self.sent.append(msg)

    async def close(self) -> None:
        self.closed = True

    def of_kind(self, kind: str) -> list[EmailMessage]:
        """Sent messages whose X-Cancelflow-Kind header is `kind`."""
        return [m for m in self.sent if m.get("X-Cancelflow-Kind") == kind]
