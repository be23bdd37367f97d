"""The checker finds each kind of broken promise (and none in a clean run)."""

from __future__ import annotations

from email.message import EmailMessage

from cancelflow.invariants import Evidence, Expectations, check


def status(request_id: str, version: int, state: str, **extra: object) -> dict:
    return {"request_id": request_id, "version": version, "state": state, "stage": None, "target": "subscription",
            "error": None, **extra}


def mail(request_id: str, kind: str, message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["X-Cancelflow-Request-Id"] = request_id
    message["X-Cancelflow-Kind"] = kind
    message["Message-ID"] = message_id
    return message


def clean() -> Evidence:
    return Evidence(
        statuses=[status("r1", 1, "received"), status("r1", 2, "in_progress"), status("r1", 3, "completed"),
                  status("r1", 3, "completed"),  # the same record republished: fine
                  status("r1", 4, "completed")],
        dead_letters=[{"original_key": "bad-1", "reason": "not_json", "detail": "not JSON", "topic": "t", "offset": 1}],
        vendor_ledger={"effects": [{"type": "cancellation", "request_id": "r1"}]},
        gateway_ledger={"effects": [
            {"type": "charge_captured", "gateway_charge_id": "g1", "amount": "30.00"},
            {"type": "refund", "idempotency_key": "k1", "gateway_charge_id": "g1", "amount": "20.00"}]},
        mails=[mail("r1", "completed", "<a@x>"), mail("r1", "completed", "<a@x>")],  # a resend, same id
    )


def expected() -> Expectations:
    return Expectations(accepted={"r1"}, injected_bad_keys={"bad-1"})


def violated(evidence: Evidence, expectations: Expectations | None = None) -> set[str]:
    report = check(evidence, expectations or expected())
    return {name for name, found in report.violations.items() if found}


def test_a_clean_run_passes() -> None:
    report = check(clean(), expected())
    assert report.ok, dict(report.violations)
    assert report.checked["only legal state transitions, versions one by one"] == 5


def test_stuck_and_double_terminal_requests() -> None:
    evidence = clean()
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "in_progress")]
    assert "every accepted request ends in one terminal state" in violated(evidence)
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "rejected"), status("r1", 3, "completed")]
    assert "every accepted request ends in one terminal state" in violated(evidence)


def test_illegal_transitions_and_version_gaps() -> None:
    evidence = clean()
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "completed")]
    assert "only legal state transitions, versions one by one" in violated(evidence)
    evidence.statuses = [status("r1", 1, "received"), status("r1", 3, "rejected")]
    assert "only legal state transitions, versions one by one" in violated(evidence)
    evidence.statuses = [status("r1", 1, "received"), status("r1", 1, "rejected")]
    assert "only legal state transitions, versions one by one" in violated(evidence)


def test_double_vendor_effect_and_refunds() -> None:
    evidence = clean()
    evidence.vendor_ledger["effects"].append({"type": "cancellation", "request_id": "r1"})
    evidence.gateway_ledger["effects"] += [
        {"type": "refund", "idempotency_key": "k1", "gateway_charge_id": "g1", "amount": "5.00"},
        {"type": "reversal", "idempotency_key": "k2", "gateway_charge_id": "g1", "amount": "9.00"}]
    assert violated(evidence) >= {"at most one vendor effect per request", "at most one refund per key",
                                  "never more refunded than captured"}


def test_emails_doubled_or_missing() -> None:
    evidence = clean()
    evidence.mails.append(mail("r1", "completed", "<b@x>"))
    assert "at most one email per outcome" in violated(evidence)
    evidence.mails = []
    assert "every owed email delivered once SMTP is back" in violated(evidence)
    assert "every owed email delivered once SMTP is back" not in violated(
        evidence, Expectations(accepted={"r1"}, injected_bad_keys={"bad-1"}, smtp_up=False))


def test_a_stuck_request_finished_by_the_system_owes_the_stuck_emails_and_its_outcome() -> None:
    evidence = clean()
    timeout = {"source": "vendor", "code": "timeout", "message": "No progress"}
    resolved = {"by": "system", "at": "2026-11-21T10:00:00+00:00", "action": "completed", "note": ""}
    evidence.statuses = [status("r1", 1, "received"), status("r1", 2, "in_progress"),
                         status("r1", 3, "manual_review", error=timeout),
                         status("r1", 4, "manual_review", resolution=resolved)]
    evidence.mails = [mail("r1", "manual_review", "<m@x>"), mail("r1", "support_stuck", "<s@x>")]
    assert violated(evidence) == {"every owed email delivered once SMTP is back"}  # no "completed" email
    evidence.mails.append(mail("r1", "completed", "<a@x>"))
    assert violated(evidence) == set()


def test_dead_letters_must_be_the_injected_ones() -> None:
    evidence = clean()
    evidence.dead_letters.append({"original_key": "r-valid", "reason": "handler_error", "detail": "x",
                                  "topic": "t", "offset": 2})
    assert "only injected bad records dead-lettered, each with a reason" in violated(evidence)
    assert "every injected bad record dead-lettered" in violated(
        clean(), Expectations(accepted={"r1"}, injected_bad_keys={"bad-1", "bad-2"}))


def test_half_done_work_in_a_database() -> None:
    evidence = clean()
    evidence.databases = {"billing": {"outbox": 0, "locked_subscriptions": 1}, "payment_gateway": {"outbox": 3}}
    assert "nothing left unpublished or half done" in violated(evidence)
