"""`RecordingSMTPServer`: a real SMTP server for tests that keeps what it receives in memory.

It runs aiosmtpd in its own thread with its own event loop, so it keeps answering while the test's loop
is busy (or blocked), and it works the same from sync tests, async tests and tests that start the
services as separate processes. `stop()` drops the listener *and* every open session, and `start()`
binds the same port again: that is how a test simulates an SMTP outage and its recovery.

Waiting is event driven: each arrival wakes the waiters (threading.Condition for sync callers,
`loop.call_soon_threadsafe` on an asyncio.Event for async ones); nobody polls with sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

from aiosmtpd.smtp import SMTP, Envelope, Session

from cancelflow_tools.smtp_sink import SmtpListener, parse_message

# A usable default for fail_next(): 4xx means "try again later" in SMTP.
TEMPORARY_FAILURE = "451 4.3.0 Temporary local problem, try again later"
PERMANENT_FAILURE = "554 5.7.1 Message rejected"


@dataclass(frozen=True)
class ReceivedMail:
    """One accepted message, with its SMTP envelope (Bcc recipients only appear in `rcpt_tos`)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message: EmailMessage


class _RecordingHandler:
    def __init__(self, owner: RecordingSMTPServer) -> None:
        self._owner = owner

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        return self._owner._on_data(envelope)


class RecordingSMTPServer:
    """aiosmtpd on `host:port` (port 0: an ephemeral one, kept across restarts) recording every message.

    Usage:

        with RecordingSMTPServer() as smtp:            # or smtp = RecordingSMTPServer().start()
            mailer = SmtpMailer(smtp.host, smtp.port)
            ...
            msg = await smtp.wait_for(lambda m: m["X-Cancelflow-Kind"] == "completed")
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._cond = threading.Condition()  # guards everything below; sync waiters wait on it
        self._received: list[ReceivedMail] = []
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._failures: list[str] = []
        # Called on the server thread with the count received so far, each time a message arrives and
        # before the client gets its 250: a test can kill the sender at that very instant.
        self.on_message: Callable[[int], None] | None = None
        self._connections_before = 0  # sessions accepted by listeners of earlier start()s
        self._listener: SmtpListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("RecordingSMTPServer has no port before its first start()")
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> RecordingSMTPServer:
        """Listen (again) on the same host and port; returns self. No-op when running."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        listener = SmtpListener(_RecordingHandler(self), self.host, self._port)
        ready = threading.Event()
        outcome: list[BaseException | int] = []
        thread = threading.Thread(target=self._run, args=(loop, listener, ready, outcome),
                                  name=f"recording-smtp-{self.host}:{self._port}", daemon=True)
        thread.start()
        ready.wait()
        if isinstance(outcome[0], BaseException):
            thread.join()
            raise outcome[0]
        self._port = outcome[0]
        self._loop, self._listener, self._thread = loop, listener, thread
        return self

    def stop(self) -> None:
        """Close the listener and every open session, like a crashed or unreachable server."""
        thread, loop, listener = self._thread, self._loop, self._listener
        if thread is None or loop is None or listener is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._connections_before += listener.connections_accepted
        self._thread = self._loop = self._listener = None

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, listener: SmtpListener, ready: threading.Event,
             outcome: list[BaseException | int]) -> None:
        asyncio.set_event_loop(loop)
        try:
            try:
                outcome.append(loop.run_until_complete(listener.start()))
            except BaseException as exc:  # reported to start()'s caller, e.g. port already in use
                outcome.append(exc)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(listener.stop())
            # Sessions whose connection was just closed still have handler tasks: let them finish.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()

    def __enter__(self) -> RecordingSMTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- what was received -----------------------------------------------------------------------

    @property
    def received(self) -> list[ReceivedMail]:
        with self._cond:
            return list(self._received)

    @property
    def messages(self) -> list[EmailMessage]:
        with self._cond:
            return [mail.message for mail in self._received]

    @property
    def connections(self) -> int:
        """SMTP sessions (TCP connections) accepted since construction, across restarts."""
        current = self._listener.connections_accepted if self._listener else 0
        return self._connections_before + current

    def clear(self) -> None:
        with self._cond:
            self._received.clear()

    def fail_next(self, response: str = TEMPORARY_FAILURE, times: int = 1) -> None:
        """Answer the next `times` DATA commands with `response` (e.g. "451 ..." or "550 ...")."""
        with self._cond:
            self._failures.extend([response] * times)

    def _on_data(self, envelope: Envelope) -> str:
        # Runs on the server thread.
        with self._cond:
            if self._failures:
                return self._failures.pop(0)
            raw = envelope.original_content or b""
            self._received.append(ReceivedMail(envelope.mail_from or "", tuple(envelope.rcpt_tos), raw,
                                               parse_message(raw)))
            self._cond.notify_all()
            waiters = list(self._async_waiters)
            received = len(self._received)
        if self.on_message is not None:
            self.on_message(received)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that waiter's loop is closed; nobody is listening any more
                pass
        return "250 2.0.0 OK"

    # ---- waiting ---------------------------------------------------------------------------------

    # A timeout parameter (ASYNC109) on purpose: every wait in a test must be bounded, and a default
    # keeps call sites short; asyncio.timeout around each call would be easy to forget.
    async def wait_until(self, predicate: Callable[[list[EmailMessage]], bool],
                         timeout: float = 10.0) -> list[EmailMessage]:  # noqa: ASYNC109
        """Wait until `predicate(all messages so far)` holds; return those messages.

        Raises TimeoutError (with the subjects received so far) after `timeout` seconds.
        """
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._cond:
            self._async_waiters.add(waiter)  # before the first check, so no arrival can slip between
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    messages = self.messages
                    if predicate(messages):
                        return messages
                    await event.wait()
        except TimeoutError:
            raise TimeoutError(self._timeout_message(timeout)) from None
        finally:
            with self._cond:
                self._async_waiters.discard(waiter)

    async def wait_for(self, predicate: Callable[[EmailMessage], bool],
                       timeout: float = 10.0) -> EmailMessage:  # noqa: ASYNC109
        """Wait for a message matching `predicate` (already received or arriving); return the first."""
        messages = await self.wait_until(lambda ms: any(predicate(m) for m in ms), timeout)
        return next(m for m in messages if predicate(m))

    async def wait_for_count(self, count: int,
                             timeout: float = 10.0) -> list[EmailMessage]:  # noqa: ASYNC109
        """Wait until at least `count` messages were received; return all of them."""
        return await self.wait_until(lambda ms: len(ms) >= count, timeout)

    def wait_until_sync(self, predicate: Callable[[list[EmailMessage]], bool],
                        timeout: float = 10.0) -> list[EmailMessage]:
        """`wait_until` for synchronous tests (blocks the calling thread)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate([m.message for m in self._received]), timeout)
            if ok:
                return [m.message for m in self._received]
        raise TimeoutError(self._timeout_message(timeout))

    def _timeout_message(self, timeout: float) -> str:
        subjects = [str(m.get("Subject")) for m in self.messages]
        return f"no matching email within {timeout}s; received {len(subjects)}: {subjects}"
