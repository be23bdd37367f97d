"""Operators configured by CANCELFLOW_OPERATORS on a running stack (CONTRACT.md section 11): a viewer
reads but cannot act (403, and the dashboard offers no action), an operator acts, `cancelflow up`
makes no operator of its own, and no token ever reaches a log file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from cancelflow_tools.ops import StackClient, sample_subscription
from cancelflow_tools.testing.stack import StackProcess
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, HAVE_CHROMIUM

pytestmark = [pytest.mark.e2e, pytest.mark.broker_agnostic]

ALICE = "alice-operator-token-4f9c2e7b"
VERA = "vera-viewer-token-81d3a6c0"


@pytest.fixture(scope="module")
def roles_stack(tmp_path_factory) -> Iterator[StackProcess]:  # type: ignore[no-untyped-def]
    process = StackProcess(tmp_path_factory.mktemp("stack-roles"), extra_env={
        "CANCELFLOW_OPERATORS": f"alice:operator:{ALICE},vera:viewer:{VERA}"})
    process.start()
    yield process
    assert process.stop() == 0


async def test_a_viewer_reads_an_operator_acts_and_no_token_is_logged(roles_stack, ids, today) -> None:  # type: ignore[no-untyped-def]
    stack = roles_stack
    assert not (stack.data_dir / "operator-token").exists()  # operators were given: none is made
    status = stack.endpoints.status
    sample = sample_subscription(account_id=ids["account"], subscription_id=f"sub-roles-{ids['tag']}", today=today)
    waiting = sample_subscription(account_id=ids["account"], subscription_id=f"sub-wait-{ids['tag']}", today=today)
    body = {"account_id": ids["account"], "subscription_id": sample.facts.subscription_id, "reason": "asked"}
    async with StackClient(stack.endpoints, stack.settings, token=VERA) as vera, \
            StackClient(stack.endpoints, stack.settings, token=ALICE) as alice:
        await alice.load([sample, waiting])
        pending = await alice.request_cancellation(account_id=ids["account"],
                                                   subscription_id=waiting.facts.subscription_id,
                                                   requires_approval=True)
        assert (await vera.get_json(f"{status}/requests"))[0] == 200
        assert (await vera.act("/cancellations", body))[0] == 403
        code, answer = await alice.act("/cancellations", body)
        assert code == 202
        async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{status}/audit") as response:
            assert response.status == 401
        _, audit = await alice.get_json(f"{status}/audit")
        assert [(a["operator"], a["status"]) for a in audit["items"]][-2:] == [("alice", 202), ("vera", 403)]

        if not HAVE_CHROMIUM:
            pytest.fail(f"no Chromium at {CHROMIUM}")
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await (await browser.new_context()).new_page()
                await page.goto(f"{status}/#token={VERA}")  # the link form: signed in, the token leaves the URL
                await expect(page.locator("#who")).to_contain_text("Signed in as vera (viewer)")
                assert "token" not in page.url
                await expect(page.locator("#on-behalf-section")).to_be_hidden()
                await page.goto(f"{status}/ui/requests/{pending}")  # an operator would see Approve / Decline
                await expect(page.locator("#state")).to_have_text("Pending approval", timeout=60_000)
                await expect(page.locator("#actions-section")).to_be_hidden()
                assert (await vera.act(f"/requests/{pending}/approve", {}))[0] == 403
                await page.goto(f"{status}/ui/requests/{answer['request_id']}")
                await expect(page.locator("#state")).to_have_text("Completed", timeout=60_000)
            finally:
                await browser.close()

    _no_token_in_logs(stack)


def _no_token_in_logs(stack: StackProcess) -> None:
    for log in [stack.log, *Path(stack.data_dir / "logs").glob("*.log")]:
        text = log.read_text(errors="replace")
        assert ALICE not in text and VERA not in text, f"a token in {log}"
