"""Email rendering: exact subjects, the facts each kind must state, escaping, required context keys."""

from __future__ import annotations

import html as htmllib
import re
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notification.render import (
    KINDS,
    _classic,
    _direct,
    _QuickFold,
    _sent_as_is,
    _written_as_is,
    audience,
    build_message,
    message_bytes,
    message_id_for,
    render,
)

SEED_VENDOR = ("Subscription failed to cancel due to Provisioning Error. "
               "Please try to cancel the subscription again.")
SEED_PLATFORM = ("The subscription cancellation process has encountered an error on our Platform. "
                 "Please contact your administrator")

FULL = {
    "request_id": "4c1f0e7a-req",
    "customer_name": "Jane Doe",
    "customer_email": "jane@example.com",
    "product_name": "Acme CRM",
    "subscription_id": "sub-42",
    "account_id": "acc-7",
    "mode": "immediate",
    "effective_date": "2026-11-21",
    "access_end_date": "2026-11-21",
    "refund": {"amount": "24.98", "currency": "USD", "status": "issued", "charge_id": "ch_1",
               "idempotency_key": "refund-4c1f0e7a-ch_1", "gateway_error": "card_expired"},
    "error_source": "vendor",
    "error_code": "VENDOR_409",
    "error_message": "Subscription is locked by another operation",
    "vendor": "acme",
    "vendor_subscription_id": "V-9001",
    "reason": "Charge ch_9 is not a duplicate of an earlier charge",
    "decided_by": "op-17",
    "note": "The contract requires 30 days notice",
    "charges": [
        {"charge_id": "ch_2", "amount": "49.95", "currency": "USD", "kind": "refund"},
        {"charge_id": "ch_3", "amount": "49.95", "currency": "USD", "kind": "reversal"},
    ],
    "history": [{"at": "2026-11-21T10:00:00Z", "message": "Provisioning status is set to In Progress"}],
    "transactions": [{"transaction_id": "tx-1", "type": "refund", "amount": "24.98"}],
    "state": "in_progress",
    "stage": "vendor",
    "updated_at": "2026-11-21T10:00:00Z",
    "stuck_for": "45 minutes",
}

SUBJECTS = {
    "completed": "Subscription Cancellation Request Completed",
    "failed_vendor": "Subscription Cancellation Failed",
    "failed_platform": "Subscription Cancellation Failed",
    "manual_review": "Your Cancellation Request Is Under Review",
    "declined": "Subscription Cancellation Request Declined",
    "charges_refunded": "Duplicate Charges Refunded",
    "support_platform_failure": "[cancelflow] Platform failure after vendor cancellation: sub-42",
    "support_manual_review": "[cancelflow] Manual review needed: 4c1f0e7a-req",
    "support_stuck": "[cancelflow] Request stuck: 4c1f0e7a-req",
}

# What each email must say (checked in the text and in the visible text of the HTML).
FACTS = {
    "completed": ["Hello Jane Doe", "Acme CRM", "sub-42", "Effective date", "2026-11-21", "Service access ends",
                  "24.98 USD", "4c1f0e7a-req"],
    "failed_vendor": ["Hello Jane Doe", "Subscription is locked by another operation", SEED_VENDOR,
                      "Nothing has changed", "safe to submit the cancellation again", "4c1f0e7a-req"],
    "failed_platform": ["Hello Jane Doe", SEED_PLATFORM, "support team has already been alerted",
                        "4c1f0e7a-req"],
    "manual_review": ["Hello Jane Doe", "passed to our support team for review",
                      "Charge ch_9 is not a duplicate of an earlier charge", "4c1f0e7a-req"],
    "declined": ["Hello Jane Doe", "declined", "op-17", "The contract requires 30 days notice", "4c1f0e7a-req"],
    "charges_refunded": ["Hello Jane Doe", "ch_2", "ch_3", "49.95 USD", "Refund", "Reversal",
                         "Total refunded", "99.90 USD", "4c1f0e7a-req"],
    "support_platform_failure": ["4c1f0e7a-req", "acc-7", "sub-42", "acme", "V-9001", "CANCELED",
                                 "Subscription is locked by another operation", "2026-11-21",
                                 "Steps to finish by hand", "Synchronized",
                                 "Status is set to canceled with effective date 2026-11-21"],
    "support_manual_review": ["4c1f0e7a-req", "acc-7", "sub-42", "Charge ch_9 is not a duplicate",
                              "vendor", "VENDOR_409", "Subscription is locked by another operation",
                              "24.98 USD", "ch_1", "refund-4c1f0e7a-ch_1", "card_expired", "tx-1",
                              "Provisioning status is set to In Progress"],
    "support_stuck": ["4c1f0e7a-req", "acc-7", "sub-42", "Jane Doe", "jane@example.com", "Acme CRM", "V-9001",
                      "in_progress", "vendor", "45 minutes", "No progress since", "2026-11-21T10:00:00Z",
                      "the customer has been told that the request is being reviewed",
                      "Provisioning status is set to In Progress"],
}


def visible(html: str) -> str:
    """What a reader of the HTML sees, as one line of text."""
    return " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", html)).split())


def flat(text: str) -> str:
    return " ".join(text.split())


def test_a_vendor_failure_at_the_end_of_term_says_auto_renew_stays_off():
    """The end-of-term run stopped auto-renew when it was scheduled, and a vendor failure does not turn it
    back on: the email must not say that nothing changed. A partial one kept auto-renew: it may."""
    for partial, expected, absent in ((False, "automatic renewal stays off", "Nothing has changed"),
                                      (True, "Nothing has changed", "automatic renewal stays off")):
        context = {**FULL, "mode": "end_of_term", "partial": partial, "removed_quantity": 2 if partial else None}
        _, text, html = render("failed_vendor", context)
        assert expected in flat(text) and expected in visible(html)
        assert absent not in flat(text) and absent not in visible(html)


def test_the_platform_failure_alert_carries_the_error_recorded():
    _, text, html = render("support_platform_failure", {**FULL, "platform_error": "IntegrityError('quantity')"})
    assert "IntegrityError('quantity')" in flat(text) and "IntegrityError('quantity')" in visible(html)


def test_auto_renew_the_gateway_would_not_stop_is_told_as_such():
    """The refund went out; auto-renew is what a person must stop: the email must not say the refund failed."""
    context = {**FULL, "error_source": "payment", "error_code": "auto_renew_stop_failed",
               "reason": "The gateway refused to stop auto-renew: 409 schedule_locked: locked",
               "refund": {**FULL["refund"], "status": "succeeded"}}
    _, text, html = render("manual_review", context)
    for said in (flat(text), visible(html)):
        assert "automatic renewal could not be stopped automatically" in said
        assert "24.98 USD has been refunded" in said
        assert "could not be issued" not in said and "Refund under review" not in said
    _, text, _ = render("manual_review", {**context, "refund": None, "scheduled": True})
    assert "Your cancellation is scheduled for the end of the current period, but its automatic renewal" in flat(text)


def test_every_kind_is_covered():
    assert set(SUBJECTS) == set(KINDS) == set(FACTS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_subject_and_facts(kind):
    subject, text, html = render(kind, FULL)
    assert subject == SUBJECTS[kind]
    for fact in FACTS[kind]:
        assert fact in flat(text), f"{kind} text lacks {fact!r}"
        assert fact in visible(html), f"{kind} HTML lacks {fact!r}"
    assert "None" not in text and "Undefined" not in text
    assert "None" not in visible(html)
    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert "<img" not in html  # no tracking pixels, no remote content


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_required_keys_alone_render_cleanly(kind):
    base = {"request_id": "r-1", "product_name": "Acme CRM", "subscription_id": "sub-1", "account_id": "acc-1",
            "effective_date": "2026-11-21", "access_end_date": "2026-12-01", "charges": FULL["charges"]}
    context = {key: base[key] for key in KINDS[kind].required}
    subject, text, html = render(kind, context)
    assert "r-1" in text and "r-1" in html
    for junk in ("None", "Undefined", "  ,", " ."):
        assert junk not in text, f"{kind}: {junk!r} in text"
    assert "None" not in visible(html)
    if KINDS[kind].audience == "customer":
        assert text.startswith("Hello,\n")  # no name known: still a proper greeting


@pytest.mark.parametrize(("kind", "key"), [(k, key) for k, spec in KINDS.items() for key in spec.required])
def test_missing_required_key_raises_naming_it(kind, key):
    context = dict(FULL)
    del context[key]
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        render(kind, context)
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        render(kind, {**FULL, key: None})


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown email kind"):
        render("nope", FULL)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_html_is_escaped_and_text_is_verbatim(kind):
    evil = "<script>alert('x')</script> & Co"
    context = {**FULL, **{key: evil for key in ("customer_name", "product_name", "reason", "note",
                                                 "error_message", "decided_by")}}
    _, text, html = render(kind, context)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert evil in flat(text)


def test_completed_without_refund_says_none_is_due():
    _, text, html = render("completed", {**FULL, "refund": None})
    assert "No refund is due" in text and "No refund is due" in visible(html)
    assert "24.98" not in text
    # A zero refund is no refund.
    _, text, _ = render("completed", {**FULL, "refund": {"amount": "0.00", "currency": "USD", "status": "none"}})
    assert "No refund is due" in text


def test_completed_end_of_term_states_when_access_ends():
    _, text, _ = render("completed", {**FULL, "refund": None, "effective_date": "2026-12-31",
                                      "access_end_date": "2027-01-01"})
    assert "You keep access to Acme CRM until 2027-01-01" in flat(text)


def test_completed_partial_says_licenses_reduced_not_canceled():
    _, text, html = render("completed", {**FULL, "new_quantity": 3, "removed_quantity": 2})
    for body in (flat(text), visible(html)):
        assert "3 licenses" in body and "2 licenses removed" in body
        assert "has been canceled" not in body
    _, text, _ = render("completed", {**FULL, "new_quantity": 1, "removed_quantity": 1})
    assert "1 license (1 license removed)" in flat(text)


def test_charges_totals_per_currency():
    charges = [{"charge_id": "a", "amount": "10", "currency": "EUR", "kind": "refund"},
               {"charge_id": "b", "amount": "5.5", "currency": "USD", "kind": "refund"},
               {"charge_id": "c", "amount": "2.25", "currency": "EUR", "kind": "refund"}]
    _, text, _ = render("charges_refunded", {"request_id": "r", "charges": charges})
    assert "12.25 EUR" in text and "5.50 USD" in text
    assert "Reversal" not in text and "reversal" not in text


def test_text_lines_are_wrapped():
    _, text, _ = render("support_manual_review", {**FULL, "reason": "word " * 60})
    assert max(len(line) for line in text.splitlines()) <= 76


def test_audience():
    assert audience("completed") == "customer"
    assert audience("support_stuck") == "support"


def test_build_message_structure_and_headers():
    msg = build_message("completed", FULL, sender="Billing <billing@example.com>",
                        to="Jane Doe <jane@example.com>", message_id="abc.123@cancelflow.local")
    assert msg["Message-ID"] == "<abc.123@cancelflow.local>"
    assert msg["Subject"] == SUBJECTS["completed"]
    assert msg["X-Cancelflow-Kind"] == "completed"
    assert msg["X-Cancelflow-Request-Id"] == "4c1f0e7a-req"
    assert msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    # Survives the wire: serialise and parse back.
    parsed = BytesParser(policy=policy.default).parsebytes(msg.as_bytes())
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert "Acme CRM" in parsed.get_body(("plain",)).get_content()
    assert "&lt;" not in parsed.get_body(("plain",)).get_content()
    assert "<h1>" in parsed.get_body(("html",)).get_content()
    assert parsed["To"] == "Jane Doe <jane@example.com>"


def test_build_message_non_ascii_and_several_recipients():
    msg = build_message("declined", {"request_id": "r", "customer_name": "Zoë Ångström"},
                        sender="billing@example.com", to=["a@example.com", "Zoë <z@example.com>"],
                        message_id="<m@x>")
    parsed = BytesParser(policy=policy.default).parsebytes(msg.as_bytes())
    assert "Hello Zoë Ångström," in parsed.get_body(("plain",)).get_content()
    assert [a.addr_spec for a in parsed["To"].addresses] == ["a@example.com", "z@example.com"]


@pytest.mark.parametrize(("variant", "encoding"), [
    ("ascii", "7bit"), ("non-ascii", "quoted-printable"), ("long line", "quoted-printable")])
def test_bodies_travel_as_is_when_they_can_and_read_back_exactly(variant, encoding):
    context = {**FULL, "customer_name": {"ascii": "Jane Doe", "non-ascii": "Zoë Ångström",
                                         "long line": "J" * 1200}[variant]}
    rendered = render("completed", context)
    raw = message_bytes("completed", context, rendered, sender="billing@example.com", to="jane@example.com",
                        message_id="<m@x>")
    assert raw.isascii() and max(len(line) for line in raw.split(b"\n")) <= 998
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    parts = list(parsed.iter_parts())
    assert [p["Content-Transfer-Encoding"] for p in parts] == [encoding] * 2
    assert [p.get_content() for p in parts] == [rendered[1], rendered[2]]
    assert parsed.get_boundary() not in rendered[1] + rendered[2]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["Subject", "To", "X-Cancelflow-Request-Id"]),
       st.text(st.characters(min_codepoint=9, max_codepoint=0x24F), max_size=100))
def test_headers_are_written_as_the_standard_library_folds_them(name, value):
    from email.policy import compat32
    assert _QuickFold()._fold(name, value, True) == compat32._fold(name, value, True)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("reply_to", [None, "Support <support@example.com>"])
def test_every_usual_email_is_written_directly_as_the_mime_classes_write_it(kind, reply_to, monkeypatch):
    def compose() -> bytes:
        return message_bytes(kind, FULL, render(kind, FULL), sender="Billing <billing@example.com>",
                             to=["jane@example.com", "Jane Doe <jd@example.com>"], message_id="<m@x>",
                             reply_to=reply_to, date=datetime(2026, 12, 6, tzinfo=UTC),
                             boundary="==cancelflow-0123456789abcdef01234567==")

    with monkeypatch.context() as patched:
        patched.setattr("notification.render._classic", None)  # fails if the usual email goes that way
        direct = compose()
    monkeypatch.setattr("notification.render._sent_as_is", lambda body: False)
    assert direct == compose()


_HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=70) | st.text(
    st.characters(min_codepoint=9, max_codepoint=0x17F), max_size=80)
_BODY = st.text(st.characters(min_codepoint=9, max_codepoint=0x17F), max_size=400) | st.lists(
    st.sampled_from(["Hello Jane,", "", "  Refund:   12.50 USD", "From here", ".", "x" * 998, "x" * 999,
                     "--==cancelflow-", "\r", "tab\there"]), max_size=8).map("\n".join)


@settings(max_examples=400, deadline=None)
@given(subject=_HEADER_VALUE, request_id=_HEADER_VALUE, text=_BODY, html=_BODY)
def test_the_direct_way_writes_what_the_mime_classes_write(subject, request_id, text, html):
    headers = [("Subject", subject), ("From", "billing@example.com"), ("To", "Jane <jane@example.com>"),
               ("Date", "Sun, 06 Dec 2026 00:00:00 +0000"), ("Message-ID", "<m@x>"),
               ("X-Cancelflow-Kind", "completed"), ("X-Cancelflow-Request-Id", request_id),
               ("Auto-Submitted", "auto-generated")]
    boundary = "==cancelflow-0123456789abcdef01234567=="
    classic = _classic(headers, text, html, boundary)
    if all(_written_as_is(n, v) for n, v in headers) and _sent_as_is(text) and _sent_as_is(html):
        assert _direct(headers, text, html, boundary) == classic
    parsed = BytesParser(policy=policy.default).parsebytes(classic)
    assert parsed.get_boundary() == boundary


def test_data_cannot_inject_headers():
    context = {**FULL, "subscription_id": "sub-1\r\nBcc: victim@example.com",
               "request_id": "r-1\nX-Evil: 1"}
    msg = build_message("support_platform_failure", context, sender="cf@example.com",
                        to="support@example.com", message_id="<m@x>")
    headers = msg.as_bytes().split(b"\n\n", 1)[0]
    assert b"\nBcc:" not in headers and b"\nX-Evil:" not in headers
    parsed = BytesParser(policy=policy.default).parsebytes(msg.as_bytes())
    assert parsed["Bcc"] is None and parsed["X-Evil"] is None
    assert parsed["X-Cancelflow-Request-Id"] == "r-1 X-Evil: 1"
    assert msg["Subject"] == "[cancelflow] Platform failure after vendor cancellation: sub-1 Bcc: victim@example.com"


def test_build_message_rejects_bad_arguments():
    with pytest.raises(ValueError):
        build_message("completed", FULL, sender="a@x", to=[], message_id="<m@x>")
    with pytest.raises(ValueError):
        build_message("completed", FULL, sender="a@x", to="b@x", message_id="two words@x")


def test_message_id_for_is_deterministic_and_distinct():
    assert message_id_for("r-1", "completed") == message_id_for("r-1", "completed")
    assert message_id_for("r-1", "completed") != message_id_for("r-1", "support_manual_review")
    assert re.fullmatch(r"<[^<>\s@]+@[^<>\s@]+>", message_id_for("r 1/x", "completed"))


def test_manual_review_after_refund_failure_says_the_cancellation_stands():
    context = {"request_id": "r", "subscription_id": "sub-1", "error_source": "payment",
               "refund": {"amount": "5", "currency": "EUR", "status": "failed"}, "reason": "card_expired"}
    _, text, html = render("manual_review", context)
    for body in (flat(text), visible(html)):
        assert "Your cancellation has been completed, but the refund of 5.00 EUR could not be issued" in body
    _, text, _ = render("manual_review", {"request_id": "r", "charge_ids": ["ch_1"], "reason": "not a duplicate"})
    assert "could not be completed automatically" in flat(text) and "ch_1" in text


def test_manual_review_of_a_stuck_request_says_it_is_taking_longer():
    context = {"request_id": "r", "subscription_id": "sub-1", "stage": "vendor", "stuck_for": "45 minutes"}
    _, text, html = render("manual_review", context)
    for body in (flat(text), visible(html)):
        assert "taking longer than it should" in body and "passed to our support team for review" in body
        assert "could not be issued" not in body


def test_support_stuck_for_a_request_nobody_knows_says_the_customer_was_not_told():
    _, text, html = render("support_stuck", {"request_id": "r", "stage": "validation", "stuck_for": "2 hours"})
    for body in (flat(text), visible(html)):
        assert "the customer has not been told" in body and "validation" in body and "2 hours" in body


def test_support_stuck_says_the_work_goes_on_and_to_check_before_acting_by_hand():
    _, text, html = render("support_stuck", {"request_id": "r", "account_id": "a", "stage": "vendor"})
    for body in (flat(text), visible(html)):
        assert "The request was not stopped" in body and "it may still complete (or fail) by itself" in body
        assert "Check its status right before acting by hand" in body
