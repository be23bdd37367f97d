"""The embedded stack's mail server: accepts every message over SMTP and stores it as an `.eml` file.

Used when `SMTP_HOST` is unset (CONTRACT.md section 9): nothing leaves the machine, and the CLI and the
tests read what was "sent" back with `read_mailbox`. One file per received message, under
`<data_dir>/mail/`, named `<UTC timestamp>-<sequence>-<safe Message-ID>.eml` so that a plain sort of the
names is the order of arrival.

Run it on its own with:

    python -m cancelflow_tools.smtp_sink --host 127.0.0.1 --port 1025 --dir var/mail
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from cancelflow.logging import get_logger
from cancelflow.mail import header_block

log = get_logger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1025
# The name the server gives itself in its greeting; fixed so aiosmtpd does not do a DNS lookup
# (socket.getfqdn) for every connection.
SERVER_HOSTNAME = "cancelflow-smtp-sink"

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]+")
_MAX_ID_CHARS = 80
# Per-process sequence: two messages in the same nanosecond still get distinct, ordered names.
_sequence = itertools.count()


def mail_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Where the sink of a stack whose data dir is `data_dir` keeps its mail."""
    return Path(data_dir) / "mail"


def safe_message_id(message_id: str | None) -> str:
    """A Message-ID reduced to characters that are safe in a file name on every OS."""
    cleaned = _UNSAFE.sub("_", (message_id or "").strip().strip("<>")).strip("._")
    return cleaned[:_MAX_ID_CHARS] or "no-message-id"


def _file_name(message_id: str | None, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    # Fixed-width fields so that sorting the names sorts by arrival.
    stamp = now.strftime("%Y%m%dT%H%M%S") + f".{now.microsecond:06d}Z"
    return f"{stamp}-{next(_sequence):06d}-{safe_message_id(message_id)}.eml"


def _write_atomically(directory: Path, name: str, data: bytes) -> Path:
    """Write to a hidden temp file, then rename: a reader never sees half a message.

    No fsync: the sink stands in for a mail server on a development machine. A killed sink loses
    nothing (the kernel has the file); only a crash of the machine itself could. Profiled, the fsync
    and the thread it ran in were a third of the sink's CPU per message."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp creates 0600; mail is meant to be read by the CLI/tools
            fh.write(data)
            fh.flush()
        target = directory / name
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _with_envelope_headers(envelope: Envelope) -> bytes:
    """The message as received, with the SMTP envelope in front (Bcc recipients live only there)."""
    content = envelope.original_content or b""
    eol = b"\r\n" if b"\r\n" in content[:1000] else b"\n"
    recipients = ", ".join(envelope.rcpt_tos)
    trace = f"Return-Path: <{envelope.mail_from or ''}>".encode() + eol
    trace += f"X-Original-To: {recipients}".encode() + eol
    return trace + content


# The Message-ID header with its folded continuation lines, in the header block. Found with a regular
# expression: parsing the headers with the email package cost more than the rest of a delivery.
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def _message_id_of(raw: bytes) -> str | None:
    found = _MESSAGE_ID.search(header_block(raw))
    return b" ".join(found.group(1).split()).decode("utf-8", "replace") if found else None


def parse_message(raw: bytes) -> EmailMessage:
    """Parse raw RFC 5322 bytes into an `EmailMessage` (the modern API: get_body, get_content, ...).

    Wire line endings (CRLF) become "\n" first, so that bodies read back as ordinary Python text.
    """
    message = BytesParser(policy=policy.default).parsebytes(raw.replace(b"\r\n", b"\n"))
    assert isinstance(message, EmailMessage)  # guaranteed by policy.default
    return message


def read_mailbox(directory: str | os.PathLike[str]) -> list[EmailMessage]:
    """Every message the sink stored in `directory` (a mail dir, see `mail_dir`), oldest first.

    A directory that does not exist yet is an empty mailbox: no mail has been sent.
    """
    path = Path(directory)
    if not path.is_dir():
        return []
    return [parse_message(file.read_bytes()) for file in sorted(path.glob("*.eml"))]


class MaildirHandler:
    """aiosmtpd handler: store each message as an `.eml` file in `directory`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        data = _with_envelope_headers(envelope)
        name = _file_name(_message_id_of(data))
        try:
            _write_atomically(self.directory, name, data)  # tens of microseconds: no thread needed
        except OSError as exc:
            log.error("smtp_sink.store_failed", error=str(exc))
            # 4xx: the client keeps the message and retries later, nothing is lost.
            return "451 4.3.0 Could not store the message, try again later"
        # Debug: a line per message was a sixth of the sink's CPU in a benchmark run (py-spy).
        log.debug("smtp_sink.stored", file=name, recipients=len(envelope.rcpt_tos))
        return f"250 2.0.0 OK: stored as {name}"


class _TrackedSMTP(SMTP):
    """aiosmtpd's protocol, remembering its open connections so a stop can close them.

    Closing the listening socket alone would leave established sessions running (a client that reuses
    its connection would not notice that the server "went down").
    """

    def __init__(self, handler: Any, connections: set[_TrackedSMTP], on_connect: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._connections = connections
        self._on_connect = on_connect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connections.add(self)
        self._on_connect()

    def connection_lost(self, error: Exception | None) -> None:
        self._connections.discard(self)
        super().connection_lost(error)


class SmtpListener:
    """An aiosmtpd server for any handler, in the running event loop, that can be stopped cleanly."""

    def __init__(self, handler: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.handler = handler
        self.host = host
        self.port = port  # 0 picks a free port; the bound one replaces it after start()
        self.connections_accepted = 0
        self._connections: set[_TrackedSMTP] = set()
        self._server: asyncio.Server | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def _count_connection(self) -> None:
        self.connections_accepted += 1

    async def start(self) -> int:
        """Listen; return the bound port."""
        if self._server is not None:
            return self.port
        loop = asyncio.get_running_loop()

        def factory() -> _TrackedSMTP:
            return _TrackedSMTP(
                self.handler, self._connections, self._count_connection,
                hostname=SERVER_HOSTNAME, enable_SMTPUTF8=True, loop=loop,
            )

        # reuse_address: a restart can bind the same port while old connections sit in TIME_WAIT.
        self._server = await loop.create_server(factory, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop every open session (a message mid-transfer is not acknowledged)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for session in list(self._connections):
            if session.transport is not None:
                session.transport.close()
        self._connections.clear()
        await server.wait_closed()


class SmtpSink(SmtpListener):
    """The embedded stack's SMTP server, writing into `directory` (usually `mail_dir(data_dir)`)."""

    def __init__(self, directory: str | os.PathLike[str], host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT) -> None:
        super().__init__(MaildirHandler(directory), host, port)
        self.directory = Path(directory)

    async def start(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        return await super().start()

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(host: str, port: int, directory: str | os.PathLike[str]) -> None:
    """Run the sink until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: Ctrl-C arrives as KeyboardInterrupt
            pass
    async with SmtpSink(directory, host, port) as sink:
        # One line on stdout that a supervisor (or a person) can wait for.
        print(f"smtp sink listening on {host}:{sink.port}, storing mail in {sink.directory}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    # Defaults follow the stack's settings, so `python -m cancelflow_tools.smtp_sink` alone does the right thing.
    from cancelflow.logging import configure as configure_logging
    from cancelflow.settings import CommonSettings

    settings = CommonSettings()
    parser = argparse.ArgumentParser(prog="python -m cancelflow_tools.smtp_sink",
                                     description="SMTP server that stores every message as an .eml file.")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=settings.smtp_port)
    parser.add_argument("--dir", type=Path, default=mail_dir(settings.data_dir),
                        help="where to write the .eml files (default: $CANCELFLOW_DATA_DIR/mail)")
    args = parser.parse_args(argv)
    configure_logging("smtp_sink", level=settings.log_level, json=settings.log_json)
    try:
        asyncio.run(serve(args.host, args.port, args.dir))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
