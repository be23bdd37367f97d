"""SMTP end to end on real sockets: SmtpMailer -> RecordingSMTPServer / SmtpSink -> read_mailbox."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator

import aiosmtplib
import pytest

from cancelflow_tools.smtp_sink import SmtpSink, _message_id_of, read_mailbox, safe_message_id
from cancelflow_tools.testing.smtp import PERMANENT_FAILURE, TEMPORARY_FAILURE, RecordingSMTPServer
from notification.adapters.mailer import (
    AbstractMailer,
    FakeMailer,
    MailDeliveryError,
    MailerPool,
    SmtpMailer,
    envelope,
)
from notification.render import build_message, message_id_for

pytestmark = pytest.mark.timeout(60)


def make_message(request_id: str, kind: str = "completed", to: str = "Jane Doe <jane@example.com>"):
    context = {"request_id": request_id, "customer_name": "Jane Doe", "product_name": "Acme CRM",
               "subscription_id": "sub-1", "effective_date": "2026-11-21", "access_end_date": "2026-11-21"}
    return build_message(kind, context, sender="Billing <billing@example.com>", to=to,
                         message_id=message_id_for(request_id, kind))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def smtp() -> Iterator[RecordingSMTPServer]:
    server = RecordingSMTPServer().start()
    try:
        yield server
    finally:
        server.stop()


async def test_delivers_message_with_its_message_id(smtp):
    async with SmtpMailer(smtp.host, smtp.port, timeout=5) as mailer:
        await mailer.send(make_message("req-1"))
    received = await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == "req-1", timeout=5)
    assert received["Message-ID"] == "<completed.req-1@cancelflow.local>"
    assert received["Subject"] == "Subscription Cancellation Request Completed"
    assert "Acme CRM" in received.get_body(("plain",)).get_content()
    assert smtp.received[0].rcpt_tos == ("jane@example.com",)
    assert smtp.received[0].mail_from == "billing@example.com"


async def test_reuses_one_connection_for_several_sends(smtp):
    async with SmtpMailer(smtp.host, smtp.port, timeout=5) as mailer:
        for i in range(5):
            await mailer.send(make_message(f"req-{i}"))
        assert mailer.connections_opened == 1
    messages = await smtp.wait_for_count(5, timeout=5)
    assert [m["X-Cancelflow-Request-Id"] for m in messages] == [f"req-{i}" for i in range(5)]
    assert smtp.connections == 1


async def test_concurrent_sends_share_the_connection(smtp):
    async with SmtpMailer(smtp.host, smtp.port, timeout=5) as mailer:
        await asyncio.gather(*(mailer.send(make_message(f"req-{i}")) for i in range(10)))
    await smtp.wait_for_count(10, timeout=5)
    assert smtp.connections == 1


async def test_a_pool_sends_concurrently_over_its_few_reused_connections(smtp):
    pool = MailerPool([SmtpMailer(smtp.host, smtp.port, timeout=5) for _ in range(3)])
    try:
        await asyncio.gather(*(pool.send(make_message(f"req-{i}")) for i in range(30)))
        await asyncio.gather(*(pool.send(make_message(f"again-{i}")) for i in range(30)))
        assert pool.connections_opened == 3
    finally:
        await pool.close()
    messages = await smtp.wait_for_count(60, timeout=10)
    assert len({m["Message-ID"] for m in messages}) == 60
    assert smtp.connections == 3


async def test_outage_is_retryable_and_recovery_needs_no_restart(smtp):
    port = smtp.port
    async with SmtpMailer(smtp.host, port, timeout=5) as mailer:
        await mailer.send(make_message("before"))

        smtp.stop()  # drops the mailer's open session too
        with pytest.raises(MailDeliveryError) as failure:
            await mailer.send(make_message("during"))
        assert failure.value.retryable is True

        smtp.start()
        assert smtp.port == port
        await mailer.send(make_message("after"))
    ids = [m["X-Cancelflow-Request-Id"] for m in await smtp.wait_for_count(2, timeout=5)]
    assert ids == ["before", "after"]


async def test_server_closing_an_idle_session_is_transparent(smtp):
    """A server restart between two sends (idle session gone) costs a reconnect, not a failure."""
    async with SmtpMailer(smtp.host, smtp.port, timeout=5) as mailer:
        await mailer.send(make_message("one"))
        smtp.stop()
        smtp.start()
        await mailer.send(make_message("two"))
        assert mailer.connections_opened == 2
    await smtp.wait_for_count(2, timeout=5)


async def test_connection_refused_is_retryable():
    async with SmtpMailer("127.0.0.1", free_port(), timeout=5) as mailer:
        with pytest.raises(MailDeliveryError) as failure:
            await mailer.send(make_message("req"))
    assert failure.value.retryable is True
    assert failure.value.smtp_code is None


async def test_4xx_is_retryable_5xx_is_not(smtp):
    async with SmtpMailer(smtp.host, smtp.port, timeout=5) as mailer:
        smtp.fail_next(TEMPORARY_FAILURE)
        with pytest.raises(MailDeliveryError) as temporary:
            await mailer.send(make_message("t"))
        assert (temporary.value.retryable, temporary.value.smtp_code) == (True, 451)

        smtp.fail_next(PERMANENT_FAILURE)
        with pytest.raises(MailDeliveryError) as permanent:
            await mailer.send(make_message("p"))
        assert (permanent.value.retryable, permanent.value.smtp_code) == (False, 554)

        await mailer.send(make_message("ok"))  # the session survives a refused message
        assert mailer.connections_opened == 1
    assert [m["X-Cancelflow-Request-Id"] for m in smtp.messages] == ["ok"]


async def test_server_that_never_answers_times_out_as_retryable():
    client_gone = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never sends the greeting; returns when the client goes away
        writer.close()
        await writer.wait_closed()
        client_gone.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with SmtpMailer("127.0.0.1", port, timeout=0.3) as mailer:
            with pytest.raises(MailDeliveryError) as failure:
                await mailer.send(make_message("slow"))
        assert failure.value.retryable is True
        assert "timed out" in str(failure.value)
        await asyncio.wait_for(client_gone.wait(), timeout=5)  # the mailer dropped the stuck session
    finally:
        server.close()
        await server.wait_closed()


async def test_message_without_recipient_is_permanent(smtp):
    msg = make_message("x")
    del msg["To"]
    async with SmtpMailer(smtp.host, smtp.port, timeout=5) as mailer:
        with pytest.raises(MailDeliveryError) as failure:
            await mailer.send(msg)
    assert failure.value.retryable is False


async def test_wait_for_wakes_on_arrival_and_reports_timeouts(smtp):
    waiter = asyncio.create_task(smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == "late", timeout=5))
    async with SmtpMailer(smtp.host, smtp.port, timeout=5) as mailer:
        await mailer.send(make_message("early"))
        await mailer.send(make_message("late"))
    assert (await waiter)["X-Cancelflow-Request-Id"] == "late"

    with pytest.raises(TimeoutError, match="received 2"):
        await smtp.wait_for(lambda m: False, timeout=0.05)
    assert len(smtp.wait_until_sync(lambda ms: len(ms) == 2, timeout=1)) == 2


async def test_sink_stores_eml_files_that_read_mailbox_parses(tmp_path):
    mail = tmp_path / "mail"
    async with SmtpSink(mail, "127.0.0.1", 0) as sink:
        async with SmtpMailer("127.0.0.1", sink.port, timeout=5) as mailer:
            for i in range(3):
                await mailer.send(make_message(f"req-{i}", to="Zoë <zoe@example.com>"))
    files = sorted(p.name for p in mail.iterdir())
    assert len(files) == 3 and all(name.endswith(".eml") for name in files)  # no temp files left
    assert safe_message_id("<completed.req-0@cancelflow.local>") in files[0]

    messages = read_mailbox(mail)
    assert [m["X-Cancelflow-Request-Id"] for m in messages] == ["req-0", "req-1", "req-2"]
    first = messages[0]
    assert first["Message-ID"] == "<completed.req-0@cancelflow.local>"
    assert first["X-Original-To"] == "zoe@example.com"
    assert first["Return-Path"] == "<billing@example.com>"
    assert first["To"] == "Zoë <zoe@example.com>"
    assert "Hello Jane Doe,\n" in first.get_body(("plain",)).get_content()
    assert first.get_body(("html",)) is not None


def test_read_mailbox_of_missing_dir_is_empty(tmp_path):
    assert read_mailbox(tmp_path / "nothing-yet") == []


def test_safe_message_id():
    assert safe_message_id("<a/b\\c:d*e@x.y>") == "a_b_c_d_e@x.y"
    assert safe_message_id(None) == "no-message-id"
    assert safe_message_id("<../../etc>") == "etc"
    assert len(safe_message_id("<" + "x" * 500 + "@y>")) <= 80


async def test_the_sink_stores_lines_that_start_with_a_dot_as_sent(tmp_path):
    """SMTP doubles a leading dot on the wire (a lone dot ends the message); the sink must undo it, at
    the start of the message too."""
    body = b".first line starts with a dot\r\nmiddle\r\n.\r\n..two dots\r\nlast\r\n"
    raw = b"Message-ID: <dots@x>\r\nSubject: dots\r\n\r\n" + body
    mail = tmp_path / "mail"
    async with SmtpSink(mail, "127.0.0.1", 0) as sink:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=5)
        async with smtp:
            await smtp.sendmail("a@example.com", ["b@example.com"], raw)
            await smtp.sendmail("a@example.com", ["b@example.com"], b".")  # the whole message is one dot
    stored = [path.read_bytes() for path in sorted(mail.glob("*.eml"))]
    assert stored[0].endswith(raw)
    assert stored[1].endswith(b"X-Original-To: b@example.com\r\n.\r\n")


@pytest.mark.parametrize(("raw", "expected"), [
    (b"From: a\r\nMessage-ID: <one@x>\r\nSubject: s\r\n\r\nbody", "<one@x>"),
    (b"From: a\nmessage-id:\n  <folded@x>\nSubject: s\n\nbody", "<folded@x>"),  # any case, folded
    (b"From: a\r\nSubject: s\r\n\r\nMessage-ID: <in-the-body@x>\r\n", None),  # not a header
])
def test_the_sink_finds_the_message_id_among_the_headers_only(raw, expected):
    assert _message_id_of(raw) == expected


async def test_sink_runs_as_a_module_and_stops_on_sigterm(tmp_path):
    mail = tmp_path / "mail"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cancelflow_tools.smtp_sink", "--host", "127.0.0.1", "--port", "0", "--dir", str(mail),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        assert "listening on 127.0.0.1:" in line, line
        port = int(line.split("127.0.0.1:")[1].split(",")[0])
        async with SmtpMailer("127.0.0.1", port, timeout=5) as mailer:
            await mailer.send(make_message("cli"))
        assert [m["X-Cancelflow-Request-Id"] for m in read_mailbox(mail)] == ["cli"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0


async def test_fake_mailer_records_and_fails_on_demand():
    mailer = FakeMailer()
    assert isinstance(mailer, AbstractMailer)
    assert isinstance(SmtpMailer(), AbstractMailer)
    mailer.fail_next(times=1)
    with pytest.raises(MailDeliveryError) as failure:
        await mailer.send(make_message("a"))
    assert failure.value.retryable is True
    await mailer.send(make_message("a"))
    await mailer.send(make_message("b", kind="failed_vendor"))
    assert [m["X-Cancelflow-Request-Id"] for m in mailer.sent] == ["a", "b"]
    assert len(mailer.of_kind("failed_vendor")) == 1
    assert mailer.attempts == 3


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_the_envelope_comes_from_the_header_block_only(newline: bytes) -> None:
    raw = newline.join([
        b"From: Billing <billing@example.com>",
        b"To: Jane <jane@example.com>,",
        b"  ops@example.com",
        b"Cc: audit@example.com",
        b"Subject: x",
        b"",
        b"To: body@example.com",  # a line of the body that looks like a header
        b"",
        b"Cc: other@example.com",
    ])
    assert envelope(raw) == ("billing@example.com", ["jane@example.com", "ops@example.com", "audit@example.com"])
    with pytest.raises(ValueError, match="no From or no To"):
        envelope(b"From: billing@example.com" + newline + newline + b"To: body@example.com")
