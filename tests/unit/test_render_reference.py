"""The speed fork of notification's email writer against the `email` package's own way
(docs/performance.md, items 6, 19 and 28).

`message_bytes` writes the usual email directly and the rest with the classic MIME classes. Here the
same headers and bodies also go into an `EmailMessage` under the modern policy (`set_content`,
`add_alternative`, `as_bytes`), and both messages are parsed back: the headers, the parts, their
charsets, bodies and transfer encodings must be the same, for non-ASCII names and long lines too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, parseaddr
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from notification.render import KINDS, message_bytes, render

PARSER = BytesParser(policy=policy.default)
# The modern policy under what SMTP allows: bodies 7bit when ASCII in lines of up to 998 characters,
# quoted-printable or base64 otherwise; headers folded at 998 only (Python 3.11's folder writes a space
# before an encoded word it moves to the next line, and the parser keeps it: "cancellation:  sub-ø").
PLAIN = policy.default.clone(max_line_length=998, cte_type="7bit")
DATE = datetime(2026, 12, 6, 23, 59, tzinfo=UTC)
ADDRESS_HEADERS = ("From", "To", "Reply-To")


def one_line(value: str) -> str:
    return " ".join(value.split())  # what `render` makes of a subject and what message_bytes does to a request id


def reference(kind: str, request_id: str, rendered: tuple[str, str, str], *, sender: str, to: list[str],
              message_id: str, reply_to: str | None) -> bytes:
    """The same email, written the plain way."""
    subject, text, html = rendered
    msg = EmailMessage(policy=PLAIN)
    msg["Subject"] = subject
    msg["From"] = address(sender)
    msg["To"] = [address(r) for r in to]
    if reply_to:
        msg["Reply-To"] = address(reply_to)
    msg["Date"] = format_datetime(DATE)
    msg["Message-ID"] = message_id
    msg["X-Cancelflow-Kind"] = kind
    msg["X-Cancelflow-Request-Id"] = one_line(request_id)
    msg["Auto-Submitted"] = "auto-generated"
    msg.make_alternative()
    for body, subtype in ((text, "plain"), (html, "html")):
        part = EmailMessage(policy=PLAIN)
        part.set_content(body, subtype=subtype, charset="utf-8")
        msg.attach(part)
    return msg.as_bytes()


def address(value: str) -> Address:
    name, addr = parseaddr(value)
    return Address(display_name=name, addr_spec=addr)


def read(raw: bytes) -> dict[str, Any]:
    """What a mail client reads of a message."""
    msg = PARSER.parsebytes(raw)
    headers = {}
    for name in ("Subject", "Date", "Message-ID", "X-Cancelflow-Kind", "X-Cancelflow-Request-Id", "Auto-Submitted",
                 *ADDRESS_HEADERS):
        value = msg[name]
        headers[name] = (None if value is None else [(a.display_name, a.addr_spec) for a in value.addresses]
                         if name in ADDRESS_HEADERS else str(value))
    parts = [{"type": part.get_content_type(), "charset": part.get_content_charset(),
              # as is, or encoded (the library picks base64 where it is shorter, the writer quoted-printable)
              "as_is": part["Content-Transfer-Encoding"] == "7bit",
              "body": part.get_content()}
             for part in msg.iter_parts()]
    return {"type": msg.get_content_type(), "headers": headers, "parts": parts, "defects": len(msg.defects)}


def compare(kind: str, request_id: str, rendered: tuple[str, str, str], *, to: list[str],
            reply_to: str | None = None, sender: str = "Billing <billing@example.com>") -> dict[str, Any]:
    message_id = "<m.1@cancelflow.local>"
    raw = message_bytes(kind, {"request_id": request_id}, rendered, sender=sender, to=to, message_id=message_id,
                        reply_to=reply_to, date=DATE)
    assert raw.isascii() and max(len(line) for line in raw.split(b"\n")) <= 998
    ours = read(raw)
    assert ours["headers"]["Subject"] == rendered[0] and ours["headers"]["X-Cancelflow-Request-Id"] == one_line(request_id)
    assert [part["body"] for part in ours["parts"]] == list(rendered[1:])
    theirs = read(reference(kind, request_id, rendered, sender=sender, to=to, message_id=message_id,
                            reply_to=reply_to))
    assert trimmed(ours) == trimmed(theirs)
    return ours


def trimmed(read: dict[str, Any]) -> dict[str, Any]:
    """`set_content` ends a body with a newline (the bodies `render` makes end with one)."""
    return {**read, "parts": [{**part, "body": part["body"].removesuffix("\n")} for part in read["parts"]]}


CONTEXT = {"request_id": "4c1f0e7a-req", "customer_name": "Jane Doe", "product_name": "Acme CRM",
           "subscription_id": "sub-42", "account_id": "acc-7", "effective_date": "2026-11-21",
           "access_end_date": "2026-11-21", "refund": {"amount": "24.98", "currency": "USD", "status": "issued"},
           "charges": [{"charge_id": "ch_2", "amount": "49.95", "currency": "USD", "kind": "refund"}],
           "reason": "Charge ch_9 is not a duplicate of an earlier charge", "stage": "vendor"}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("variant", ["usual", "non-ascii names", "long lines"])
def test_every_kind_reads_as_the_email_package_writes_it(kind: str, variant: str) -> None:
    context = dict(CONTEXT)
    to = ["Jane Doe <jane@example.com>"]
    if variant == "non-ascii names":
        context |= {"customer_name": "Zoë Ångström", "product_name": "Café ✓ Ünïcode", "subscription_id": "sub-ø"}
        to = ["Zoë Ångström <zoe@example.com>", "Ægir <a@example.com>"]
    elif variant == "long lines":
        context |= {"customer_name": "J" * 1200, "reason": "word " * 300, "subscription_id": "s" * 120}
    read = compare(kind, str(context["request_id"]), render(kind, context), to=to,
                   reply_to="Support <support@example.com>")
    assert [part["as_is"] for part in read["parts"]] == [variant == "usual"] * 2 or variant != "usual"


ascii = st.characters(min_codepoint=32, max_codepoint=126)
names = st.text(ascii.filter(str.isalnum) | st.sampled_from(" .-'"), max_size=30) | st.text(
    st.characters(codec="utf-8", categories=["L", "N", "Zs"]) | st.sampled_from(".-'"), max_size=30)
header_text = st.text(ascii, max_size=60) | st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]),
                                                     max_size=120)
# Bodies break lines with "\n" only: `set_content` splits lines at every other line break too.
bodies = st.text(ascii | st.just("\n"), max_size=300) | st.text(st.characters(
    codec="utf-8", exclude_categories=["Cs"], exclude_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    max_size=300) | st.lists(
    st.sampled_from(["Hello Jane,", "", "  Refund:   12.50 USD", "From here", ".", "x" * 998, "x" * 999,
                     "é" * 500, "--==cancelflow-", "tab\there", "=3D soft=", " trailing space "]),
    max_size=8).map("\n".join)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(subject=header_text.map(one_line), request_id=header_text, text=bodies, html=bodies,
       to=st.lists(names.map(str.strip), min_size=1, max_size=3), reply_to=st.none() | names.map(str.strip))
def test_generated_emails_read_as_the_email_package_writes_them(subject: str, request_id: str, text: str,
                                                                 html: str, to: list[str], reply_to: str | None) -> None:
    read = compare("completed", request_id, (subject, text, html),
                   to=[f"{name} <r{i}@example.com>" for i, name in enumerate(to)],
                   reply_to=None if reply_to is None else f"{reply_to} <support@example.com>")
    event(f"bodies as is: {[part['as_is'] for part in read['parts']]}")
