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

from cancelflow.ops import sample_subscription

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


def _row(page, request_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f'tr[data-request-id="{request_id}"]')


async def test_dashboard_follows_requests_live_and_explains_errors(page, client, ids, today):  # type: ignore[no-untyped-def]
    ok = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ui-ok-{ids['tag']}", today=today)
    bad = sample_subscription(account_id=ids["account"], subscription_id=f"sub-ui-vf-{ids['tag']}", today=today)
    await client.load([ok, bad])
    await client.post_json(f"{client.endpoints.vendor}/_sandbox/rules", {
        "match": {"vendor_subscription_id": bad.facts.vendor_subscription_id},
        "respond": {"status": 422, "error": "Subscription is locked by a reseller hold"}, "times": 1})

    await page.goto(f"{client.endpoints.status}/")
    await expect(page.get_by_role("heading", name="Cancellation requests")).to_be_visible()
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
