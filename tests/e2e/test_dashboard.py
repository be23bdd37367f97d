"""The support dashboard in a real browser (Debian's headless Chromium driven by Playwright), against the
whole stack: requests appear and reach their terminal state without a reload, the filters narrow the
list, and a request's page shows its timeline and what to do about its error.

Set CANCELFLOW_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the README's screenshot.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import async_playwright, expect

from cancelflow_tools.ops import sample_subscription

pytestmark = pytest.mark.e2e

# Debian's Chromium (apt-get install chromium); Playwright never downloads a browser of its own here.
CHROMIUM = os.environ.get("CANCELFLOW_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
async def page(stack) -> AsyncIterator:  # type: ignore[no-untyped-def]
    if not HAVE_CHROMIUM:
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CANCELFLOW_CHROMIUM)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1180, "height": 640})
            yield await context.new_page()
        finally:
            await browser.close()


async def sign_in(page, client) -> None:  # type: ignore[no-untyped-def]
    """As a support person does once per browser session: the sign-in page asks for the token."""
    await page.goto(f"{client.endpoints.status}/")
    await page.get_by_label("Operator token").fill(client.token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Cancellation requests")).to_be_visible()


def _row(page, request_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f'tr[data-request-id="{request_id}"]')


async def test_dashboard_follows_requests_live_and_explains_errors(page, client, ids, today):  # type: ignore[no-untyped-def]
    ok = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ui-ok-{ids['tag']}", today=today)
    bad = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ui-vf-{ids['tag']}", today=today)
    await client.load([ok, bad])
    await client.post_json(f"{client.endpoints.vendor}/_sandbox/rules", {
        "match": {"vendor_subscription_id": bad.facts.vendor_subscription_id},
        "respond": {"status": 422, "error": "Subscription is locked by a reseller hold"}, "times": 1})

    await sign_in(page, client)
    await expect(page.locator("#connection")).to_have_class("connection live")
    await page.evaluate("window.__notReloaded = true")

    # A cancellation sent now appears and reaches its terminal state on the open page.
    completed = await client.request_cancellation(account_id=ids["account"], subscription_id=ok.facts.subscription_id)
    failed = await client.request_cancellation(account_id=ids["account"], subscription_id=bad.facts.subscription_id)
    await expect(_row(page, completed)).to_be_visible(timeout=30_000)
    await expect(_row(page, completed).locator("td.state")).to_have_text("Completed", timeout=60_000)
    await expect(_row(page, failed).locator("td.state")).to_have_text("Failed", timeout=60_000)
    await expect(_row(page, failed).locator("td.error")).to_have_text("Vendor error: vendor_rejected")
    await expect(_row(page, completed).locator("td").nth(3)).to_have_text(ok.facts.subscription_id)
    assert await page.evaluate("window.__notReloaded") is True
    if target := os.environ.get("CANCELFLOW_DASHBOARD_SCREENSHOT"):
        await page.screenshot(path=target)

    # The "Failed" filter, used from the keyboard like any radio group.
    await page.get_by_label("Failed", exact=True).focus()
    await page.keyboard.press("Space")
    await expect(page.locator("#rows tr").first).to_be_visible()
    await expect(_row(page, failed)).to_be_visible()
    await expect(_row(page, completed)).to_have_count(0)
    states = await page.locator("#rows tr").evaluate_all("rows => rows.map(r => r.dataset.state)")
    assert set(states) == {"failed"}

    # The failed request's page: its timeline with times, the vendor error and what to do about it.
    await _row(page, failed).get_by_role("link").click()
    await expect(page).to_have_url(f"{client.endpoints.status}/ui/requests/{failed}")
    await expect(page.get_by_role("heading", name="Timeline")).to_be_visible()
    timeline = page.locator("#timeline li")
    await expect(timeline.first).to_contain_text("requested by")
    await expect(page.locator("#timeline")).to_contain_text(
        "Subscription failed to cancel due to Provisioning Error. Please try to cancel the subscription again.")
    assert await timeline.count() >= 3
    assert await page.locator("#timeline time[datetime]").count() == await timeline.count()
    await expect(page.locator("#error-panel")).to_contain_text("Vendor error")
    await expect(page.locator("#error-panel")).to_contain_text("Retrying is safe")
    await expect(page.locator("#errors")).to_contain_text("retry is safe")
    # The email owed for the outcome shows up on the open page once it is delivered.
    await expect(page.locator("#emails")).to_contain_text("to the customer", timeout=60_000)


# --- operators (CONTRACT.md section 11) ------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs"


async def _shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    """Screenshots of the operators' dashboard for docs/ (kept current by these tests)."""
    if os.environ.get("CANCELFLOW_OPERATOR_SCREENSHOTS"):
        await page.screenshot(path=str(DOCS / name), full_page=True)


async def test_sign_in_is_asked_once_per_browser_session(page, client):  # type: ignore[no-untyped-def]
    await page.goto(f"{client.endpoints.status}/")
    await expect(page.get_by_role("heading", name="Sign in to the support dashboard")).to_be_visible()
    await page.get_by_label("Operator token").fill("not-the-token-at-all")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    await _shot(page, "operators-sign-in.png")
    await sign_in(page, client)
    await expect(page.locator("#who")).to_contain_text("Signed in as admin (operator)")
    await expect(page.locator("#connection")).to_have_class("connection live")  # the live feed is signed in too
    await page.goto(f"{client.endpoints.status}/?again")  # another page load: not asked again
    await expect(page.get_by_role("heading", name="Cancellation requests")).to_be_visible()


async def test_an_operator_approves_from_the_request_page(page, client, ids, today):  # type: ignore[no-untyped-def]
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ui-ap-{ids['tag']}", today=today)
    await client.load([sample])
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id,
                                            requires_approval=True)
    await sign_in(page, client)
    await page.goto(f"{client.endpoints.status}/ui/requests/{rid}")
    await expect(page.locator("#state")).to_have_text("Pending approval", timeout=60_000)
    buttons = page.locator("#action-buttons button")
    await expect(buttons).to_have_text(["Approve", "Decline"])
    await page.get_by_label("Note").fill("customer confirmed by phone")
    await _shot(page, "operators-approve.png")
    await page.get_by_role("button", name="Approve").click()
    await expect(page.locator("#action-outcome")).to_have_text("Approve: accepted.")
    await expect(page.locator("#state")).to_have_text("Completed", timeout=60_000)
    await expect(page.locator("#timeline")).to_contain_text("Approved by admin: customer confirmed by phone")
    await expect(page.locator("#actions-section")).to_be_hidden()  # a completed request offers nothing


async def test_an_operator_retries_after_a_platform_failure(page, client, ids, today):  # type: ignore[no-untyped-def]
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ui-rt-{ids['tag']}", today=today)
    await client.load([sample])
    await client.post_json(f"{client.endpoints.billing}/_faults",
                           {"subscription_id": sample.facts.subscription_id, "stage": "commit"})
    rid = await client.request_cancellation(account_id=ids["account"], subscription_id=sample.facts.subscription_id)
    await sign_in(page, client)
    await page.goto(f"{client.endpoints.status}/ui/requests/{rid}")
    await expect(page.locator("#state")).to_have_text("Failed", timeout=60_000)
    await expect(page.locator("#action-buttons button")).to_have_text(["Retry as a new request"])
    await page.get_by_label("Note").fill("platform fixed")
    await page.get_by_role("button", name="Retry as a new request").click()
    await expect(page.locator("#action-outcome")).to_contain_text("accepted. New request")
    await expect(page.locator("#resolution")).to_contain_text("Resolved: retry by admin", timeout=30_000)
    await expect(page.locator("#state")).to_have_text("Failed")  # terminal stays terminal
    await _shot(page, "operators-retry.png")
    await page.locator("#action-outcome a").click()
    await expect(page.locator("#state")).to_have_text("Completed", timeout=60_000)
    await expect(page.locator("#links")).to_contain_text(f"Repeats request {rid[:8]}")


async def test_an_operator_cancels_on_a_customers_behalf(page, client, ids, today):  # type: ignore[no-untyped-def]
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ui-ob-{ids['tag']}", today=today)
    await client.load([sample])
    await sign_in(page, client)
    form = page.locator("#on-behalf")
    await form.get_by_label("Account").fill(ids["account"])
    await form.get_by_label("Subscription").fill(sample.facts.subscription_id)
    await form.get_by_label("Mode").select_option("past_dated")
    await form.get_by_label("Effective date").fill(today.isoformat())
    await form.get_by_label("Reason (required)").fill("customer called: moving to another product")
    await form.get_by_label("Opt out of any future emails to the customer").check()
    await page.get_by_role("button", name="Request the cancellation").click()
    await expect(page.locator("#on-behalf-outcome")).to_contain_text("Cancellation requested")
    new_id = (await page.locator("#on-behalf-outcome a").get_attribute("href")).rsplit("/", 1)[1]
    await expect(page.locator("#audit-rows tr").first).to_contain_text("cancel")
    await expect(_row(page, new_id).locator("td.state")).to_have_text("Completed", timeout=60_000)
    await _shot(page, "operators-on-behalf.png")
    status = await client.status(new_id)
    assert status["mode"] == "past_dated"
    assert "requested by operator admin via bss" in status["history"][0]["message"]

    # The runbook's last check: the subscription, from the services that own it, has no billing left.
    await page.goto(f"{client.endpoints.status}/ui/requests/{new_id}")
    await page.get_by_role("link", name=f"Subscription {sample.facts.subscription_id}: billing, provisioning, refunds").click()
    await expect(page.locator("#sub-details")).to_contain_text("canceled")
    await expect(page.locator("#no-scheduled")).to_have_text("No future billing is scheduled.")
    await expect(page.locator("#billings tr td:nth-child(3)")).to_have_text(["canceled"])
    await expect(page.locator("#refunds")).to_contain_text("succeeded")
    await expect(page.locator("#operations")).to_contain_text("succeeded")
    await _shot(page, "operators-subscription.png")
