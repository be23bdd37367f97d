"""Emails end to end: an SMTP outage in the middle of several outcomes, a kill between the SMTP send
and its record, opt_out_of_emails, and a stuck request, on the whole stack with a recording SMTP server.

"Exactly once" is counted the way a mailbox counts: one distinct Message-ID per (request, kind). The
Message-ID is derived from (request, kind), so a resend after a crash is the same message, which mail
systems recognise; the status history (EmailSent) names each email once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from playwright.async_api import async_playwright, expect

from cancelflow.events import CancellationDeclined, RequestStuck
from cancelflow_tools.ops import StackClient, StatusWatcher, email_count, sample_subscription
from cancelflow_tools.testing.smtp import RecordingSMTPServer
from cancelflow_tools.testing.stack import StackProcess
from notification.render import message_id_for
from tests.e2e.conftest import SUPPORT, _pg_urls, awaiting_approval, loaded_subscription, vendor_answers
from tests.e2e.test_cancellation_flow import _finish, _mails
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM, sign_in

pytestmark = pytest.mark.e2e


def _mid(msg: Any) -> str:
    return str(msg["Message-ID"]).strip()  # a long Message-ID is folded onto its own header line


def _by_kind(smtp: RecordingSMTPServer, request_id: str) -> dict[str, list[Any]]:
    """kind -> every copy the server received for the request."""
    found: dict[str, list[Any]] = {}
    for msg in _mails(smtp, request_id):
        found.setdefault(msg["X-Cancelflow-Kind"], []).append(msg)
    return found


def _email_lines(status: dict[str, Any]) -> list[str]:
    return [h["message"] for h in status["history"] if h["message"].startswith("Email ")]


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.2)


async def _emails_are(client: StackClient, request_id: str, expected: dict[str, str]) -> bool:
    return {e["kind"]: e["status"] for e in await client.emails(request_id)} == expected


@contextlib.asynccontextmanager
async def _own_stack(tmp_path_factory, name: str, env: dict[str, str],  # type: ignore[no-untyped-def]
                     pg_server: Any = None) -> AsyncIterator[tuple[StackProcess, RecordingSMTPServer,
                                                                   StackClient, StatusWatcher]]:
    """A stack of the test's own (to kill, or with its own settings) mailing a mailbox of its own, on
    PostgreSQL stores when `pg_server` is given; its supervisor must end cleanly."""
    mailbox = RecordingSMTPServer().start()
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(mailbox.port), "SUPPORT_EMAIL": SUPPORT, **env}
    if pg_server is not None:
        env.update(_pg_urls(pg_server, f"{name.replace('-', '_')}{uuid.uuid4().hex[:8]}"))  # an SQL name
    stack = StackProcess(tmp_path_factory.mktemp(name), extra_env=env).start()
    try:
        async with StackClient(stack.endpoints, stack.settings) as client, \
                StatusWatcher(stack.endpoints.bootstrap) as watcher:
            yield stack, mailbox, client, watcher
    finally:
        mailbox.on_message = None
        code = stack.stop()
        mailbox.stop()
    assert code == 0, stack.log.read_text()[-3000:]


# --- killed between the SMTP send and its record ------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
async def test_kill_between_smtp_send_and_record_delivers_one_message(store, request, tmp_path_factory, today):
    """notification dies right after the SMTP server accepted the email and before it is recorded
    as sent. The supervisor restarts it; the email goes out again with the same Message-ID, so the
    mailbox holds one message, and EmailSent is in the status history once."""
    env = {"SMTP_RETRY_MAX_SECONDS": "1", "CANCELFLOW_CRASH_POINTS": "notification.after_smtp_send"}
    pg_server = request.getfixturevalue("pg_server") if store == "pg" else None
    async with _own_stack(tmp_path_factory, f"crash-{store}", env, pg_server) as (stack, mailbox, client, watcher):
        tag = uuid.uuid4().hex[:8]
        sample = await loaded_subscription(client, account_id=f"acct-{tag}", subscription_id=f"sub-crash-{tag}",
                                           today=today)
        rid = await client.request_cancellation(account_id=f"acct-{tag}",
                                                subscription_id=sample.facts.subscription_id)

        status = await watcher.terminal(rid, emails=1, timeout=120)
        assert status["state"] == "completed"
        assert (stack.data_dir / "crashpoints" / "notification.after_smtp_send.fired").exists()
        assert "exited with 137" in stack.log.read_text()  # the supervisor saw the kill and restarted it

        # Another request afterwards: its email and EmailSent show the restarted sender is done
        # with the first one (no second EmailSent, no third copy).
        after = await loaded_subscription(client, account_id=f"acct-{tag}", subscription_id=f"sub-crash2-{tag}",
                                          today=today)
        after_rid = await client.request_cancellation(account_id=f"acct-{tag}",
                                                      subscription_id=after.facts.subscription_id)
        await watcher.terminal(after_rid, emails=1, timeout=60)

        copies = _mails(mailbox, rid)
        # On the wire: the copy accepted before the kill and the resend after the restart ...
        assert len(copies) == 2, [m["X-Cancelflow-Kind"] for m in copies]
        # ... which are one message to the mailbox: one (request, kind), one Message-ID.
        assert Counter((m["X-Cancelflow-Kind"], _mid(m)) for m in copies) == {
            ("completed", message_id_for(rid, "completed")): 2}
        assert copies[0].get_body(("plain",)).get_content() == copies[1].get_body(("plain",)).get_content()
        assert len(_mails(mailbox, after_rid)) == 1
        assert len(_email_lines(watcher.latest[rid])) == 1
        [row] = await client.emails(rid)
        assert (row["status"], row["attempts"]) == ("sent", 2)


# --- killed in the middle of a round -------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
async def test_a_kill_mid_round_repeats_at_most_one_email_per_smtp_connection(store, request, tmp_path_factory,
                                                                              today):
    """30 outcomes wait for the mail server, then go out in one round over SMTP_CONNECTIONS connections;
    notification is killed (kill -9) the instant the server receives the 10th. After the restart every
    customer has their email, and at most SMTP_CONNECTIONS of them got it twice (the messages in flight),
    each with its original Message-ID. (Recording the round after it was all sent repeated all 10.)"""
    connections, kill_at = 4, 10
    env = {"SMTP_RETRY_MAX_SECONDS": "1", "SMTP_CONNECTIONS": str(connections)}
    pg_server = request.getfixturevalue("pg_server") if store == "pg" else None
    async with _own_stack(tmp_path_factory, f"round-{store}", env, pg_server) as (_, mailbox, client, watcher):
        tag = uuid.uuid4().hex[:8]
        samples = [sample_subscription(account_id=f"acct-{tag}", subscription_id=f"sub-round{n}-{tag}",
                                       today=today) for n in range(30)]
        await client.load(samples)
        mailbox.stop()  # the outcomes pile up, and go out together once the server is back
        rids = [await client.request_cancellation(account_id=f"acct-{tag}",
                                                  subscription_id=sample.facts.subscription_id)
                for sample in samples]
        for rid in rids:
            assert (await watcher.terminal(rid, timeout=120))["state"] == "completed"
        for rid in rids:
            await _until(lambda rid=rid: _emails_are(client, rid, {"completed": "pending"}),
                         f"the email of {rid} owed", timeout=60)

        _, health = await client.get_json(f"{client.endpoints.notification}/healthz")
        mailbox.on_message = lambda received: os.kill(health["pid"], signal.SIGKILL) if received == kill_at else None
        mailbox.start()
        await mailbox.wait_until(lambda _: all(_mails(mailbox, rid) for rid in rids), timeout=120)
        for rid in rids:  # each recorded as sent, once
            assert email_count(await watcher.terminal(rid, emails=1, timeout=60)) == 1
        _, restarted = await client.get_json(f"{client.endpoints.notification}/healthz")
        assert restarted["pid"] != health["pid"]  # it was killed, and the supervisor restarted it

        copies = {rid: _mails(mailbox, rid) for rid in rids}
        repeated = sum(len(mails) - 1 for mails in copies.values())
        assert 1 <= repeated <= connections, {rid[:8]: len(m) for rid, m in copies.items() if len(m) > 1}
        for rid, mails in copies.items():
            assert {_mid(m) for m in mails} == {message_id_for(rid, "completed")}
            assert {e["status"] for e in await client.emails(rid)} == {"sent"}


# --- SMTP outage ------------------------------------------------------------------------------------


async def test_smtp_outage_delays_every_owed_email_and_delivers_each_exactly_once(client, watcher, smtp, ids,
                                                                                   today):
    tag = ids["tag"]
    ok, vf, pf = (sample_subscription(account_id=ids["account"], subscription_id=f"sub-out-{name}-{tag}", today=today)
                  for name in ("ok", "vf", "pf"))
    await client.load([ok, vf, pf])
    await vendor_answers(client, vf, {"status": 422, "error": "Subscription is locked by a reseller hold"})
    await client.post_json(f"{client.endpoints.billing}/_faults",
                           {"subscription_id": pf.facts.subscription_id, "stage": "commit"})

    smtp.stop()
    try:
        rids = {name: await client.request_cancellation(account_id=ids["account"],
                                                        subscription_id=sample.facts.subscription_id)
                for name, sample in (("completed", ok), ("vendor", vf), ("platform", pf))}
        owed = {rids["completed"]: {"completed"}, rids["vendor"]: {"failed_vendor"},
                rids["platform"]: {"failed_platform", "support_platform_failure"}}
        states = {name: await watcher.terminal(rid, timeout=90) for name, rid in rids.items()}
        assert states["completed"]["state"] == "completed"
        assert (states["vendor"]["state"], states["vendor"]["error"]["source"]) == ("failed", "vendor")
        assert (states["platform"]["state"], states["platform"]["error"]["source"]) == ("failed", "platform")

        # Every owed email is on record and waiting; the sender keeps trying (with backoff) and fails.
        for rid, kinds in owed.items():
            await _until(lambda rid=rid, kinds=kinds: _emails_are(client, rid, dict.fromkeys(kinds, "pending")),
                         f"emails of {rid} recorded as pending")

        async def retried() -> bool:
            rows = [e for rid in owed for e in await client.emails(rid)]
            return max(e["attempts"] for e in rows) >= 3 and all(e["status"] == "pending" for e in rows)

        await _until(retried, "three failed delivery attempts", timeout=30)
        assert not [m for rid in owed for m in _mails(smtp, rid)]
        assert all(email_count(watcher.latest[rid]) == 0 for rid in owed)
    finally:
        smtp.start()

    await smtp.wait_until(lambda _: all(set(_by_kind(smtp, rid)) == kinds for rid, kinds in owed.items()),
                          timeout=60)
    finals = {rid: await watcher.terminal(rid, emails=len(kinds), timeout=60) for rid, kinds in owed.items()}
    # A request behind them, through the same sender, gives any second copy or EmailSent time to show.
    marker = await loaded_subscription(client, account_id=ids["account"], subscription_id=f"sub-out-mk-{tag}",
                                       today=today)
    marker_rid = await client.request_cancellation(account_id=ids["account"],
                                                   subscription_id=marker.facts.subscription_id)
    await _finish(watcher, marker_rid)

    for rid, kinds in owed.items():
        received = _by_kind(smtp, rid)
        assert set(received) == kinds
        for kind, copies in received.items():
            assert [_mid(m) for m in copies] == [message_id_for(rid, kind)], (rid, kind)
        lines = _email_lines(watcher.latest[rid])
        assert len(lines) == len(kinds) and len(set(lines)) == len(lines), lines
        assert watcher.latest[rid]["version"] == finals[rid]["version"]
        assert {e["status"] for e in await client.emails(rid)} == {"sent"}
    support = _by_kind(smtp, rids["platform"])["support_platform_failure"][0]
    assert support["To"] == SUPPORT
    assert pf.facts.vendor_subscription_id in " ".join(support.get_body(("plain",)).get_content().split())


# --- opt_out_of_emails ------------------------------------------------------------------------------


async def test_opt_out_sends_that_outcome_and_no_customer_email_after_it(client, watcher, smtp, ids, today):
    tag = ids["tag"]
    first, second, third = (sample_subscription(account_id=ids["account"], subscription_id=f"sub-oo{n}-{tag}",
                                                today=today) for n in (1, 2, 3))
    await client.load([first, second, third])

    opting = await client.request_cancellation(account_id=ids["account"], subscription_id=first.facts.subscription_id,
                                               opt_out_of_emails=True)
    assert (await _finish(watcher, opting))["state"] == "completed"
    assert [m["X-Cancelflow-Kind"] for m in _mails(smtp, opting)] == ["completed"]  # this outcome is still sent

    later = await client.request_cancellation(account_id=ids["account"], subscription_id=second.facts.subscription_id)
    assert (await watcher.terminal(later))["state"] == "completed"
    await _until(lambda: _emails_are(client, later, {"completed": "suppressed"}), "the later outcome suppressed")

    # Support alerts still go; the customer's half of a platform failure does not.
    await client.post_json(f"{client.endpoints.billing}/_faults",
                           {"subscription_id": third.facts.subscription_id, "stage": "commit"})
    failing = await client.request_cancellation(account_id=ids["account"],
                                                subscription_id=third.facts.subscription_id)
    status = await watcher.terminal(failing, emails=1)
    assert (status["state"], status["error"]["source"]) == ("failed", "platform")
    await smtp.wait_for(lambda m: m["X-Cancelflow-Request-Id"] == failing)
    assert await _emails_are(client, failing, {"failed_platform": "suppressed", "support_platform_failure": "sent"})
    assert [m["To"] for m in _mails(smtp, failing)] == [SUPPORT]
    assert _mails(smtp, later) == []
    assert email_count(watcher.latest[later]) == 0


# --- stuck requests ---------------------------------------------------------------------------------


async def test_stuck_request_alerts_support_and_tells_the_customer_once(client, watcher, smtp, ids, today):
    sample, rid, _ = await awaiting_approval(client, watcher, account_id=ids["account"],
                                           subscription_id=f"sub-stuck-{ids['tag']}", today=today)

    since = datetime.now(UTC) - timedelta(hours=2, minutes=5)
    for _ in range(2):  # said twice (a detector that repeats itself): emailed once
        await client.publisher.publish(RequestStuck(request_id=uuid.UUID(rid), stage="approval", since=since,
                                                    stuck_for_seconds=7500))
    await smtp.wait_until(lambda _: set(_by_kind(smtp, rid)) == {"manual_review", "support_stuck"})
    mails = {kind: copies[0] for kind, copies in _by_kind(smtp, rid).items()}
    alert = " ".join(mails["support_stuck"].get_body(("plain",)).get_content().split())
    assert mails["support_stuck"]["To"] == SUPPORT
    for fact in (rid, ids["account"], sample.facts.subscription_id, "approval", "2 hours 5 minutes",
                 since.strftime("%Y-%m-%d %H:%M:%S UTC"), "customer@example.com", "Timeline",
                 "Waiting for an operator to approve the cancellation"):
        assert fact in alert, fact
    assert mails["manual_review"]["To"] == "customer@example.com"
    assert "taking longer than it should" in " ".join(mails["manual_review"].get_body(("plain",)).get_content().split())

    # Its outcome still comes (a declined request: the customer is told).
    await client.publisher.publish(CancellationDeclined(request_id=uuid.UUID(rid), decided_by="op-jane", note="no"))
    status = await watcher.terminal(rid, emails=3)
    assert status["state"] == "declined"
    assert sorted(_by_kind(smtp, rid)) == ["declined", "manual_review", "support_stuck"]
    assert all(len(copies) == 1 for copies in _by_kind(smtp, rid).values())


async def test_a_stuck_request_that_completes_after_all_shows_it_resolved_by_the_system(tmp_path_factory, today):
    """The vendor hangs past STUCK_AFTER_SECONDS: the request is set aside (manual_review, support and
    the customer told). The vendor's next attempt cancels, the platform commits and the refund goes
    out: the status shows all of it, and that the system resolved the case, so nobody refunds by hand."""
    env = {"STUCK_AFTER_SECONDS": "2", "VENDOR_TIMEOUT_SECONDS": "6", "VENDOR_ATTEMPTS": "3"}
    async with _own_stack(tmp_path_factory, "stuck-then-done", env) as (_, mailbox, client, watcher):
        tag = uuid.uuid4().hex[:8]
        sample = await loaded_subscription(client, account_id=f"acct-{tag}", subscription_id=f"sub-late-{tag}",
                                           today=today)
        await vendor_answers(client, sample, {"timeout": True})
        rid = await client.request_cancellation(account_id=f"acct-{tag}",
                                                subscription_id=sample.facts.subscription_id)

        aside = await watcher.terminal(rid, timeout=60)
        assert (aside["state"], aside["error"]["code"], aside["refund"]) == ("manual_review", "timeout", None)
        done = await watcher.wait_for(rid, lambda s: s["resolution"] is not None and email_count(s) >= 3,
                                      timeout=90)

        gateway = await client.get_json(f"{client.endpoints.gateway}/_sandbox/ledger")
        [refund] = [e for e in gateway[1]["effects"] if e["type"] in ("refund", "reversal")
                    and e.get("gateway_charge_id") == sample.charges[0].gateway_charge_id]
        assert done["state"] == "manual_review"  # terminal, never left (CONTRACT.md section 6)
        assert done["refund"] == {"amount": f"{Decimal(str(refund['amount'])):.2f}", "currency": "USD",
                                  "status": "succeeded"}
        assert (done["subscription_status"], done["provisioning_status"]) == ("canceled", "Synchronized")
        assert (done["resolution"]["by"], done["resolution"]["action"]) == ("system", "completed")
        assert done["error"] is None
        assert any(h["message"].startswith("Resolved by the system: the cancellation completed")
                   for h in done["history"])
        versions = [r["version"] for r in watcher.history_of(rid)]
        assert versions == list(range(1, len(versions) + 1))
        document = await client.status(rid)  # what the dashboard's request page renders
        assert document is not None and document["resolution"]["action"] == "completed"
        await _dashboard_shows_it_resolved(client, rid, done["refund"]["amount"])

        mails = {kind: copies for kind, copies in _by_kind(mailbox, rid).items()}
        assert sorted(mails) == ["completed", "manual_review", "support_stuck"]
        assert all(len(copies) == 1 for copies in mails.values())
        alert = " ".join(mails["support_stuck"][0].get_body(("plain",)).get_content().split())
        assert "The request was not stopped" in alert and "may still complete" in alert


async def _dashboard_shows_it_resolved(client, rid: str, amount: str) -> None:  # type: ignore[no-untyped-def]
    if not HAVE_CHROMIUM:
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CANCELFLOW_CHROMIUM)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await sign_in(page, client)  # the dashboard needs an operator (CONTRACT.md section 11)
            await page.goto(f"{client.endpoints.status}/ui/requests/{rid}")
            await expect(page.locator("#resolution-panel")).to_contain_text("Completed: resolved by the system")
            await expect(page.locator("#resolution-panel")).to_contain_text("nothing to do by hand")
            await expect(page.locator("#refund")).to_have_text(f"Refund: {amount} USD (succeeded)")
            await expect(page.locator("#details")).to_contain_text("canceled")
            await expect(page.locator("#error-panel")).to_be_hidden()
            await page.goto(f"{client.endpoints.status}/")
            await expect(page.locator(f'tr[data-request-id="{rid}"] td.state')).to_have_text(
                "Manual review Completed: resolved by the system")
        finally:
            await browser.close()
