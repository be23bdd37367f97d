"""Email content: `render(kind, context)` gives (subject, text, html) from a Jinja2 template pair per kind;
`message_bytes(...)` wraps them into the multipart/alternative message, with the Message-ID (deduplication
at the receiver) and X-Cancelflow-* headers (emails told apart without parsing bodies).

A kind's required context keys raise a ValueError when missing; the others are optional. Templates run
under StrictUndefined (optional keys completed with None): a typo fails the tests, never prints nothing.
"""

from __future__ import annotations

import email
import email.policy
import functools
import re
import secrets
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.charset import QP, Charset
from email.header import Header
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from typing import Any, Literal

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

TEMPLATES_DIR = Path(__file__).parent / "templates"

KIND_HEADER = "X-Cancelflow-Kind"
REQUEST_ID_HEADER = "X-Cancelflow-Request-Id"


@dataclass(frozen=True)
class EmailKind:
    subject: str  # str.format template over the context; only required keys may appear in it
    required: tuple[str, ...]
    audience: Literal["customer", "support"]  # who the notification service addresses it to


KINDS: dict[str, EmailKind] = {
    "completed": EmailKind(
        "Subscription Cancellation Request Completed",  # exact wording: CONTRACT.md section 5
        # product_name is not required: an unknown product must not stop the outcome email.
        ("request_id", "subscription_id", "effective_date", "access_end_date"),
        "customer",
    ),
    "failed_vendor": EmailKind("Subscription Cancellation Failed", ("request_id", "subscription_id"),
                               "customer"),
    "failed_platform": EmailKind("Subscription Cancellation Failed", ("request_id", "subscription_id"),
                                 "customer"),
    "manual_review": EmailKind("Your Cancellation Request Is Under Review", ("request_id",), "customer"),
    "declined": EmailKind("Subscription Cancellation Request Declined", ("request_id",), "customer"),
    "charges_refunded": EmailKind("Duplicate Charges Refunded", ("request_id", "charges"), "customer"),
    "support_platform_failure": EmailKind(
        "[cancelflow] Platform failure after vendor cancellation: {subscription_id}",
        ("request_id", "account_id", "subscription_id"),
        "support",
    ),
    "support_manual_review": EmailKind("[cancelflow] Manual review needed: {request_id}",
                                       ("request_id", "account_id"), "support"),
    "support_stuck": EmailKind("[cancelflow] Request stuck: {request_id}", ("request_id",), "support"),
}

# Every key a template may read. Values are strings unless noted.
CONTEXT_KEYS: tuple[str, ...] = (
    "request_id", "account_id", "subscription_id", "customer_name", "customer_email", "product_name",
    "mode", "effective_date", "access_end_date",
    "refund",            # dict: amount, currency, status (+ charge_id, idempotency_key, gateway_error)
    "error_source", "error_code", "error_message",
    "vendor", "vendor_subscription_id", "platform_error",
    "scheduled",         # bool: an end-of-term cancellation that waits for its date
    "reason", "decided_by", "note",
    "charges",           # list of dicts: charge_id, amount, currency, kind (refund|reversal), ...
    "charge_ids",        # list of str: the charges a charges request named
    "transactions",      # list of dicts, shown as-is to support
    "new_quantity", "removed_quantity",  # int or str: partial cancellation
    "history",           # list of dicts: at, message
    "state", "stage", "updated_at", "stuck_for",  # support_stuck
    "support_email",     # where customers can write; mentioned when given
    "team_name",         # sign-off of customer emails
)

DEFAULT_TEAM_NAME = "The Billing Team"

_REFUND_KEYS = ("amount", "currency", "status", "charge_id", "idempotency_key", "gateway_error")
_CHARGE_KEYS = ("charge_id", "amount", "currency", "kind", "captured_at", "status", "reason")
_HISTORY_KEYS = ("at", "message")


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str | Sequence | Mapping) and len(value) == 0)


def _decimal(value: object) -> Decimal | None:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def format_money(amount: object, currency: object = None) -> str:
    """'24.98 USD': two decimals when the amount is a number, as given otherwise."""
    if amount is None:
        return ""
    number = _decimal(amount)
    text = str(number.quantize(Decimal("0.01"))) if number is not None and number.is_finite() else str(amount)
    return f"{text} {currency}" if currency else text


def count_of(quantity: object, noun: str) -> str:
    """'1 license', '3 licenses'."""
    try:
        one = int(str(quantity)) == 1
    except ValueError:
        one = False
    return f"{quantity} {noun}" if one else f"{quantity} {noun}s"


def present(rows: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The (label, value) rows worth showing: value neither None nor empty."""
    return [(label, value) for label, value in rows if not _missing(value)]


def _pick(item: object, keys: tuple[str, ...]) -> dict[str, Any]:
    data = item if isinstance(item, Mapping) else {}
    return {key: data.get(key) for key in keys}


def _prepare(kind: str, context: Mapping[str, Any]) -> dict[str, Any]:
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown email kind {kind!r}; known: {', '.join(KINDS)}")
    for key in spec.required:
        if _missing(context.get(key)):
            raise ValueError(f"email kind {kind!r} needs context key {key!r}")

    ctx: dict[str, Any] = dict.fromkeys(CONTEXT_KEYS)
    ctx.update(context)
    ctx["team_name"] = ctx["team_name"] or DEFAULT_TEAM_NAME

    # Nested values get every key the templates read, so StrictUndefined never trips on optional data.
    refund = ctx["refund"]
    if isinstance(refund, Mapping):
        refund = _pick(refund, _REFUND_KEYS)
        refund["gateway_error"] = refund["gateway_error"] or (ctx["refund"].get("error"))
    else:
        refund = None
    ctx["refund"] = refund
    amount = _decimal(refund["amount"]) if refund else None
    ctx["refund_due"] = amount is not None and amount > 0

    ctx["charges"] = [_pick(c, _CHARGE_KEYS) for c in ctx["charges"] or ()]
    ctx["charge_totals"] = _totals(ctx["charges"])
    ctx["charge_kinds"] = sorted({str(c["kind"]).lower() for c in ctx["charges"] if c["kind"]})
    ctx["charge_ids"] = [str(c) for c in ctx["charge_ids"] or ()] or [
        str(c["charge_id"]) for c in ctx["charges"] if c["charge_id"]
    ]
    ctx["history"] = [_pick(h, _HISTORY_KEYS) for h in ctx["history"] or ()]
    ctx["transactions"] = [list(t.items()) for t in ctx["transactions"] or () if isinstance(t, Mapping)]
    ctx["partial"] = ctx["new_quantity"] is not None or ctx["removed_quantity"] is not None
    ctx["kind"] = kind
    return ctx


def _totals(charges: list[dict[str, Any]]) -> list[str]:
    """The sum of the charges per currency (one line each; mixed currencies are never added up)."""
    sums: dict[str, Decimal] = {}
    for charge in charges:
        amount = _decimal(charge["amount"])
        if amount is not None and amount.is_finite():
            currency = str(charge["currency"] or "")
            sums[currency] = sums.get(currency, Decimal(0)) + amount
    return [format_money(total, currency) for currency, total in sums.items()]


_env = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    # Escape every value in .html templates; the .txt ones are plain text and must stay verbatim.
    autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,  # the templates ship with the service: no stat of the file per email
)
_env.filters["money"] = format_money
_env.filters["count_of"] = count_of
_env.filters["present"] = present

_BLANK_RUNS = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
# What continuation lines of a wrapped line are indented by: list items hang under their text,
# "  Label:   value" rows and "  time  message" timelines under the value, anything else keeps its own indentation.
_HANGING = re.compile(r"^(\s*(?:\d+\.|-) |  [^ :][^:]*: +|  \S+  +|\s*)")
TEXT_WIDTH = 76


@functools.lru_cache(maxsize=1024)  # most long lines are template text, the same in every email
def _wrap(line: str) -> str:
    # Text templates write a paragraph on one line; it is wrapped here, whatever length the data has.
    if len(line) <= TEXT_WIDTH:
        return line
    indent = " " * len(_HANGING.match(line).group(1))  # type: ignore[union-attr]
    return textwrap.fill(line, TEXT_WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def _tidy_text(text: str) -> str:
    # Templates stay readable with generous blank lines; the email gets at most one between paragraphs.
    text = _TRAILING_SPACE.sub("\n", text)
    text = "\n".join(_wrap(line) for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip() + "\n"


def _one_line(text: str) -> str:
    # Subjects come partly from data; a header must never span lines (header injection).
    return " ".join(text.split())


async def load_templates() -> None:
    """Compile every template at start, not while the first emails of a burst wait (docs/performance.md,
    item 14)."""
    for name in _env.list_templates():
        _env.get_template(name)


def render(kind: str, context: Mapping[str, Any]) -> tuple[str, str, str]:
    """(subject, text body, HTML body) of an email of `kind` (see KINDS) for `context`."""
    ctx = _prepare(kind, context)
    subject = _one_line(KINDS[kind].subject.format_map({k: ctx[k] for k in KINDS[kind].required}))
    ctx["subject"] = subject
    text = _tidy_text(_env.get_template(f"{kind}.txt").render(ctx))
    html = _env.get_template(f"{kind}.html").render(ctx)
    return subject, text, html


def audience(kind: str) -> Literal["customer", "support"]:
    """Who an email of `kind` goes to: the customer, or SUPPORT_EMAIL."""
    if kind not in KINDS:
        raise ValueError(f"unknown email kind {kind!r}")
    return KINDS[kind].audience


def message_id_for(request_id: str, kind: str, domain: str = "cancelflow.local") -> str:
    """A Message-ID that is the same every time for one request's email of one kind.

    Sending it again after a redelivery produces a message a mail system can recognise as the same.
    """
    local = re.sub(r"[^A-Za-z0-9._-]", "_", f"{kind}.{request_id}")
    return f"<{local}@{domain}>"


def build_message(
    kind: str,
    context: Mapping[str, Any],
    *,
    sender: str,
    to: str | Sequence[str],
    message_id: str,
    reply_to: str | None = None,
    date: datetime | None = None,
) -> EmailMessage:
    """The complete email as a message object: `message_bytes`, read back (for tests and tools)."""
    raw = message_bytes(kind, context, render(kind, context), sender=sender, to=to, message_id=message_id,
                        reply_to=reply_to, date=date)
    return email.message_from_bytes(raw, policy=email.policy.default)


# Bodies in UTF-8, sent as they are when they are ASCII in lines SMTP accepts (7bit), quoted-printable
# otherwise: 7-bit safe on the wire and readable in a raw mailbox either way. (The standard library
# encodes quoted-printable in Python; most emails need none of it.)
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_UTF8_AS_IS = Charset("utf-8")
_UTF8_AS_IS.body_encoding = None
_BOUNDARY_PREFIX = "cancelflow-"
MAX_LINE = 998  # RFC 5322, without the CRLF


def _body_charset(body: str) -> Charset:
    as_is = body.isascii() and max(map(len, body.splitlines() or [""])) <= MAX_LINE
    return _UTF8_AS_IS if as_is else _UTF8_QP


def _written_as_is(name: str, value: str, max_line_length: int = 78) -> bool:
    """A header `_QuickFold` writes as it is: short enough to need no folding, ASCII, printable, no
    surrounding space."""
    return (len(name) + 2 + len(value) <= max_line_length and value.isascii() and value.isprintable()
            and value == value.strip())


class _QuickFold(Compat32):
    """compat32, except that a header short enough to need no folding, ASCII and on one line, is
    written as it is instead of through a `Header` object: the same bytes, cheaper (docs/performance.md,
    item 19)."""

    def _fold(self, name: str, value: Any, sanitize: bool) -> str:
        if isinstance(value, str) and _written_as_is(name, value, self.max_line_length or 78):
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)


_POLICY = _QuickFold()


def _header(value: str) -> str | Header:
    return value if value.isascii() else Header(value, "utf-8")


@functools.lru_cache(maxsize=1024)  # the sender is the same on every email, and recipients repeat
def _address(value: str) -> str:
    name, address = parseaddr(value)
    if not address:
        raise ValueError(f"invalid address {value!r}")
    return formataddr((name, address), charset="utf-8")


def _new_boundary(text: str, html: str) -> str:
    # A boundary that appears in neither body, chosen here: the standard library checks its own
    # with a regular expression compiled anew for every message.
    boundary = f"=={_BOUNDARY_PREFIX}{secrets.token_hex(12)}=="
    while boundary in text or boundary in html:
        boundary = f"=={_BOUNDARY_PREFIX}{secrets.token_hex(12)}=="
    return boundary


def message_bytes(
    kind: str,
    context: Mapping[str, Any],
    rendered: tuple[str, str, str],
    *,
    sender: str,
    to: str | Sequence[str],
    message_id: str,
    reply_to: str | None = None,
    date: datetime | None = None,
    boundary: str | None = None,
) -> bytes:
    """The complete email, ready for SMTP: multipart/alternative (text first, HTML preferred by capable
    clients), from what `render(kind, context)` gave. `boundary` is for tests (a fresh one otherwise).

    A speed fork of `EmailMessage`, which cost most of composing: the usual email (ASCII headers that need
    no folding, ASCII bodies in lines SMTP accepts) is written directly, byte for byte what the classic
    MIME classes (`_classic`) write for the rest. docs/performance.md, items 6, 19 and 28."""
    subject, text, html = rendered
    recipients = [to] if isinstance(to, str) else list(to)
    if not recipients:
        raise ValueError("an email needs at least one recipient")
    message_id = message_id.strip()
    if not message_id or any(ch.isspace() for ch in message_id):
        raise ValueError(f"invalid Message-ID {message_id!r}")
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"

    headers: list[tuple[str, str]] = [
        ("Subject", subject),
        ("From", _address(sender)),
        ("To", ", ".join(_address(r) for r in recipients)),
    ]
    if reply_to:
        headers.append(("Reply-To", _address(reply_to)))
    headers += [
        ("Date", format_datetime(date or datetime.now(UTC))),
        ("Message-ID", message_id),
        (KIND_HEADER, kind),
        (REQUEST_ID_HEADER, _one_line(str(context["request_id"]))),
        # RFC 3834: an automatic message; well-behaved auto-responders (vacation replies) stay quiet.
        ("Auto-Submitted", "auto-generated"),
    ]
    boundary = boundary or _new_boundary(text, html)
    if all(_written_as_is(name, value) for name, value in headers) and _sent_as_is(text) and _sent_as_is(html):
        return _direct(headers, text, html, boundary)
    return _classic(headers, text, html, boundary)


def _sent_as_is(body: str) -> bool:
    """A body the generator writes unchanged: 7bit (see `_body_charset`) with no CR to normalise."""
    return "\r" not in body and _body_charset(body) is _UTF8_AS_IS


_PART_HEAD = 'Content-Type: text/{}; charset="utf-8"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 7bit\n\n'
_TEXT_HEAD = _PART_HEAD.format("plain")
_HTML_HEAD = _PART_HEAD.format("html")


def _direct(headers: list[tuple[str, str]], text: str, html: str, boundary: str) -> bytes:
    return "".join((
        f'Content-Type: multipart/alternative;\n boundary="{boundary}"\nMIME-Version: 1.0\n',
        *(f"{name}: {value}\n" for name, value in headers),
        f"\n--{boundary}\n", _TEXT_HEAD, text, f"\n--{boundary}\n", _HTML_HEAD, html, f"\n--{boundary}--\n",
    )).encode("ascii")


def _classic(headers: list[tuple[str, str]], text: str, html: str, boundary: str) -> bytes:
    msg = MIMEMultipart("alternative")
    for name, value in headers:
        # Addresses come encoded already (formataddr); free text that is not ASCII goes as encoded words.
        msg[name] = _header(value) if name in ("Subject", REQUEST_ID_HEADER) else value
    msg.attach(MIMEText(text, "plain", _body_charset(text)))
    msg.attach(MIMEText(html, "html", _body_charset(html)))
    msg.set_boundary(boundary)
    return msg.as_bytes(policy=_POLICY)
