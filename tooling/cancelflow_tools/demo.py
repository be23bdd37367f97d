"""`cancelflow demo`: the three scenarios of the seed release note, plus a past-dated cancellation,
on a running stack, and a table of what happened."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cancelflow_tools.ops import Endpoints, StackClient, StatusWatcher, emails_owed, sample_subscription


@dataclass
class Scenario:
    name: str
    subscription_id: str
    mode: str = "immediate"
    days_back: int | None = None  # past_dated: effective date = period start + this many days
    vendor_error: str | None = None
    platform_fault: bool = False
    request_id: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    emails: list[dict[str, Any]] = field(default_factory=list)


def scenarios(run: str) -> list[Scenario]:
    return [
        Scenario("1. success on vendor and platform", f"demo-{run}-1"),
        Scenario("2. vendor failure", f"demo-{run}-2",
                 vendor_error="Subscription is locked by the reseller's billing hold"),
        Scenario("3. vendor ok, platform failure", f"demo-{run}-3", platform_fault=True),
        Scenario("4. past-dated cancellation", f"demo-{run}-4", mode="past_dated", days_back=4),
    ]


async def run_demo(endpoints: Endpoints, console: Console, *, timeout: float = 90) -> list[Scenario]:
    run = uuid.uuid4().hex[:6]
    account = f"acct-demo-{run}"
    today = datetime.now(UTC).date()
    plan = scenarios(run)
    async with StackClient(endpoints, producer_name="bss") as stack, StatusWatcher(endpoints.bootstrap) as watcher:
        samples = [sample_subscription(account_id=account, subscription_id=s.subscription_id, today=today)
                   for s in plan]
        with console.status("loading sample subscriptions and charges ..."):
            await stack.load(samples)
        for scenario, sample in zip(plan, samples, strict=True):
            await _arrange(stack, scenario, sample)
            effective = (sample.facts.current_period_start + timedelta(days=scenario.days_back)
                         if scenario.days_back is not None else None)
            scenario.request_id = await stack.request_cancellation(
                account_id=account, subscription_id=scenario.subscription_id, mode=scenario.mode,
                effective_date=effective, user_id="demo-operator", role="operator", channel="bss",
                reason="cancelflow demo")
        with console.status("waiting for every request to reach its outcome and its emails ..."):
            for scenario in plan:
                terminal = await watcher.terminal(scenario.request_id, timeout=timeout)
                scenario.status = await watcher.terminal(scenario.request_id, emails=emails_owed(terminal),
                                                         timeout=timeout)
                scenario.emails = await stack.emails(scenario.request_id)
    render_outcomes(console, plan)
    return plan


async def _arrange(stack: StackClient, scenario: Scenario, sample: Any) -> None:
    if scenario.vendor_error:
        await stack.post_json(f"{stack.endpoints.vendor}/_sandbox/rules", {
            "match": {"vendor_subscription_id": sample.facts.vendor_subscription_id},
            "respond": {"status": 422, "error": scenario.vendor_error}, "times": 1})
    if scenario.platform_fault:
        await stack.post_json(f"{stack.endpoints.billing}/_faults",
                              {"subscription_id": scenario.subscription_id, "stage": "commit"})


def render_outcomes(console: Console, plan: list[Scenario]) -> None:
    summary = Table(title="cancelflow demo: outcomes", show_lines=True)
    for column in ("scenario", "state", "subscription / provisioning", "refund", "emails"):
        summary.add_column(column, overflow="fold")
    for s in plan:
        status = s.status
        error = status.get("error")
        refund = status.get("refund")
        summary.add_row(
            s.name,
            status["state"] + (f"\n{error['source']}: {error['code']}" if error else ""),
            f"{status.get('subscription_status')} / {status.get('provisioning_status')}",
            f"{refund['amount']} {refund['currency']} {refund['status']}" if refund else "-",
            str(sum(1 for m in s.emails if m["status"] == "sent")),
        )
    console.print(summary)
    for s in plan:
        console.rule(f"{s.name}  (request {s.request_id})")
        history = Table(show_header=True, box=None, pad_edge=False)
        history.add_column("time", no_wrap=True, style="dim")
        history.add_column("history")
        for entry in s.status["history"]:
            history.add_row(entry["at"][11:19], escape(entry["message"]))
        console.print(history)
        for mail in s.emails:
            console.print(f"  email to {mail['audience']}: [bold]{escape(mail['subject'])}[/] ({mail['status']})")


EXPECTED = [("completed", None), ("failed", "vendor"), ("failed", "platform"), ("completed", None)]


def expected_outcomes_met(plan: list[Scenario], console: Console) -> bool:
    ok = True
    for scenario, (state, source) in zip(plan, EXPECTED, strict=True):
        error = scenario.status.get("error") or {}
        if scenario.status.get("state") != state or error.get("source") != source:
            console.print(f"[red]{scenario.name}: expected {state}/{source}, got "
                          f"{scenario.status.get('state')}/{error.get('source')}[/]")
            ok = False
    if ok:
        console.print("[green]all four scenarios ended as the release note describes[/]")
    return ok
