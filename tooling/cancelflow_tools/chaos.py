"""`cancelflow chaos`: a steady stream of cancellations while processes die, the broker stalls and SMTP
goes away, then the invariant checker over everything the run left behind.

The same engine runs the short fault suite in CI (tests/e2e/test_faults.py) and long soak runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka.errors import MessageSizeTooLargeError
from rich.console import Console
from rich.table import Table
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from cancelflow import topics
from cancelflow.events import CancellationApproved, CancellationRequested, envelope_for
from cancelflow.messaging.codec import encode
from cancelflow_tools import invariants
from cancelflow_tools.ops import StackClient, StatusWatcher, sample_subscription
from cancelflow_tools.services import NAMES
from cancelflow_tools.testing.smtp import RecordingSMTPServer
from cancelflow_tools.testing.stack import StackProcess

SERVICES = NAMES  # what kill -9 may hit
# Every named crash point (shared/cancelflow/crashpoints.py): each fires once per run.
CRASH_POINTS = ("billing.after_commit", "provisioning.after_vendor_call", "payment_gateway.after_refund_call",
                "notification.after_smtp_send", "payment_gateway.after_commit", "provisioning.after_commit",
                "status_tracker.after_commit", "dispute.after_commit", "notification.after_commit")

# (scenario, weight): what each request meets on its way.
SCENARIOS = (
    ("success", 40), ("vendor_5xx_then_ok", 8), ("vendor_timeout_then_ok", 5), ("vendor_4xx", 8),
    ("platform_fault", 6), ("gateway_answer_lost", 6), ("gateway_5xx_then_ok", 6), ("gateway_4xx", 4),
    ("partial", 5), ("past_dated", 4), ("duplicate_request", 4), ("redelivered_event", 4),
    ("approval_before_request", 4),
)
POISONS = ("not_json", "unknown_type", "unknown_version", "missing_field", "two_mib", "wrong_types")


@dataclass
class ChaosConfig:
    duration_s: float = 60.0
    rate_per_s: float = 4.0
    kill_every_s: float = 0.0  # 0: no random kills
    smtp_outage_s: float = 0.0
    broker_pause_s: float = 0.0
    broker_kills: int = 0  # kill -9 of the broker (Kafka: the stack starts it again on its log)
    kill_targets: tuple[str, ...] = SERVICES  # which services kill -9 may hit
    rebalance_s: float = 0.0  # how long a second instance of a service stays in its group (0: none)
    replay: bool = True  # at the end, publish the request topic again from its earliest offset
    poison_every: int = 10  # one poison record per this many requests
    settle_timeout_s: float = 300.0
    seed: int = 7


@dataclass
class ChaosResult:
    report: invariants.Report
    requests: int
    outcomes: Counter[str]
    faults: Counter[str]
    scenarios: Counter[str]
    crash_points_fired: list[str]
    seconds: float
    killed_leaders: list[tuple[int, int]] = field(default_factory=list)  # (broker node, saga partitions it led)


@dataclass
class _Sent:
    request_id: str
    scenario: str


@dataclass
class ChaosRun:
    stack: StackProcess
    smtp: RecordingSMTPServer
    config: ChaosConfig
    console: Console = field(default_factory=Console)

    def __post_init__(self) -> None:
        self.random = random.Random(self.config.seed)
        self.sent: list[_Sent] = []
        self.bad_keys: set[str] = set()
        self.faults: Counter[str] = Counter()
        self.scenarios: Counter[str] = Counter()
        self.account = f"acct-chaos-{uuid.uuid4().hex[:6]}"
        self.killed_leaders: list[tuple[int, int]] = []  # (node, saga partitions it led) per broker kill

    async def run(self) -> ChaosResult:
        started = time.monotonic()
        async with StackClient(self.stack.endpoints, self.stack.settings) as client, \
                StatusWatcher(self.stack.endpoints.bootstrap, settings=self.stack.settings) as watcher:
            planned = await self.prepare(client)
            faults = asyncio.create_task(self._faults())
            try:
                await self._traffic(client, planned)
            finally:
                faults.cancel()
                await asyncio.gather(faults, return_exceptions=True)
                if not self.smtp.running:
                    self.smtp.start()
            if self.config.replay:
                await self._replay(client)
            await self._settle(watcher)
            evidence = await invariants.collect(client, self.smtp.messages, self.stack.database_urls())
        accepted = {s.request_id for s in self.sent}
        report = invariants.check(evidence, invariants.Expectations(accepted=accepted,
                                                                    injected_bad_keys=self.bad_keys))
        outcomes = Counter(watcher.latest[r]["state"] for r in accepted if r in watcher.latest)
        fired = sorted(p.stem.removesuffix(".fired") for p in (self.stack.data_dir / "crashpoints").glob("*.fired"))
        return ChaosResult(report, len(accepted), outcomes, self.faults, self.scenarios, fired,
                           time.monotonic() - started, self.killed_leaders)

    # --- traffic ---------------------------------------------------------------------------------

    async def prepare(self, client: StackClient) -> list[tuple[str, Any]]:
        """Every subscription the run will cancel, loaded before the faults start (facts first)."""
        count = max(1, int(self.config.duration_s * self.config.rate_per_s))
        planned = [self._sample(n) for n in range(count)]
        for start in range(0, count, 50):
            await client.load([sample for _, sample in planned[start:start + 50]], timeout=300)
        return planned

    async def _traffic(self, client: StackClient, planned: list[tuple[str, Any]]) -> None:
        """Requests at the configured rate, a poison record every `poison_every` of them."""
        started = time.monotonic()
        for n, (scenario, sample) in enumerate(planned, start=1):
            await asyncio.sleep(max(0.0, started + n / self.config.rate_per_s - time.monotonic()))
            await self._request(client, scenario, sample)
            if n % self.config.poison_every == 0:
                await self._poison(client, n)

    def _sample(self, n: int) -> tuple[str, Any]:
        scenario = self.random.choices([s for s, _ in SCENARIOS], [w for _, w in SCENARIOS])[0]
        return scenario, sample_subscription(
            account_id=self.account, subscription_id=f"chaos-{self.account[-6:]}-{n}",
            today=datetime.now(UTC).date(), quantity=4 if scenario == "partial" else 1)

    async def _request(self, client: StackClient, scenario: str, sample: Any) -> None:
        self.scenarios[scenario] += 1
        await self._arrange(client, scenario, sample)
        subscription_id = sample.facts.subscription_id
        kwargs: dict[str, Any] = {"account_id": self.account, "subscription_id": subscription_id}
        if scenario == "partial":
            kwargs["quantity"] = 1
        if scenario == "past_dated":
            kwargs |= {"mode": "past_dated", "effective_date": sample.facts.current_period_start}
        if scenario == "approval_before_request":
            # The operator's decision overtakes its request (another partition): it must wait for it.
            request_id = uuid.uuid4()
            await client.publisher.publish(CancellationApproved(request_id=request_id, decided_by="op-chaos"))
            kwargs |= {"requires_approval": True, "request_id": request_id}
        if scenario == "redelivered_event":
            # The very same record (same event_id) three times, as a producer retry or a replay gives it.
            request = CancellationRequested(
                request_id=uuid.uuid4(), account_id=self.account, target="subscription",
                subscription_id=subscription_id,
                requested_by={"user_id": "chaos", "role": "customer", "channel": "storefront"})
            value = encode(envelope_for(request, producer="storefront", correlation_id=str(request.request_id),
                                        causation_id=None))
            for _ in range(3):
                await client.publisher.send_raw(topics.REQUESTED, value, key=subscription_id)
            self.sent.append(_Sent(str(request.request_id), scenario))
            return
        request_id = await client.request_cancellation(**kwargs)
        if scenario == "duplicate_request":
            # The same request again (new event id, same request_id): no second effect.
            await client.request_cancellation(**kwargs, request_id=uuid.UUID(request_id))
        self.sent.append(_Sent(request_id, scenario))

    async def _arrange(self, client: StackClient, scenario: str, sample: Any) -> None:
        vendor = {"vendor_subscription_id": sample.facts.vendor_subscription_id}
        charge = {"gateway_charge_id": sample.charges[0].gateway_charge_id}
        rules = {
            "vendor_5xx_then_ok": (client.endpoints.vendor, vendor, {"status": 503, "error": "busy"}, 2),
            "vendor_timeout_then_ok": (client.endpoints.vendor, vendor, {"timeout": True}, 1),
            "vendor_4xx": (client.endpoints.vendor, vendor, {"status": 422, "error": "locked by reseller"}, 1),
            "gateway_answer_lost": (client.endpoints.gateway, charge, {"succeed_then_drop": True}, 1),
            "gateway_5xx_then_ok": (client.endpoints.gateway, charge, {"status": 502, "error": "bad gateway"}, 2),
            "gateway_4xx": (client.endpoints.gateway, charge, {"status": 402, "error": "card_account_closed"}, 1),
        }
        if scenario in rules:
            url, match, respond, times = rules[scenario]
            await self._post(client, f"{url}/_sandbox/rules", {"match": match, "respond": respond, "times": times})
        if scenario == "platform_fault":
            await self._post(client, f"{client.endpoints.billing}/_faults",
                             {"subscription_id": sample.facts.subscription_id, "stage": "commit"})

    @staticmethod
    async def _post(client: StackClient, url: str, body: dict[str, Any], *, within: float = 120.0) -> None:
        """A hook call that rides out our own faults: the service may be down for a restart right now."""
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(aiohttp.ClientError),
                                           stop=stop_after_delay(within), wait=wait_fixed(0.2), reraise=True):
            with attempt:
                await client.post_json(url, body)

    async def _poison(self, client: StackClient, n: int) -> None:
        kind = POISONS[(n // self.config.poison_every) % len(POISONS)]
        key = f"poison-{kind}-{n}-{self.account[-6:]}"
        valid = orjson.loads(encode(envelope_for(CancellationRequested(
            request_id=uuid.uuid4(), account_id=self.account, target="subscription", subscription_id=key,
            requested_by={"user_id": "chaos", "role": "customer", "channel": "storefront"}),
            producer="storefront", correlation_id=key, causation_id=None)))
        if kind == "not_json":
            value = b"\x00\xffnot json at all"
        elif kind == "unknown_type":
            value = orjson.dumps({**valid, "event_type": "CancellationTeleported"})
        elif kind == "unknown_version":
            value = orjson.dumps({**valid, "schema_version": 99})
        elif kind == "missing_field":
            value = orjson.dumps({**valid, "payload": {k: v for k, v in valid["payload"].items() if k != "target"}})
        elif kind == "wrong_types":
            value = orjson.dumps({**valid, "payload": {**valid["payload"], "requires_approval": {"no": 1}}})
        else:
            value = orjson.dumps({**valid, "padding": "x" * (2 * 1024 * 1024)})
        try:
            await client.publisher.send_raw(topics.REQUESTED, value, key=key)
        except MessageSizeTooLargeError:
            # Kafka refuses a record over the topic's max.message.bytes (1 MB by default) at the door:
            # nothing reaches the services, so nothing is owed to the DLQ.
            self.faults[f"poison record ({kind}) refused by the broker"] += 1
            return
        self.bad_keys.add(key)
        self.faults[f"poison record ({kind})"] += 1

    # --- faults ----------------------------------------------------------------------------------

    async def _faults(self) -> None:
        plan: list[tuple[float, str]] = []
        duration = self.config.duration_s
        if self.config.smtp_outage_s:
            plan.append((duration / 4, "smtp"))
        if self.config.broker_pause_s:
            plan.append((duration / 2, "broker"))
        if self.config.rebalance_s:
            plan.append((duration * 0.7, "rebalance"))
        for n in range(self.config.broker_kills):
            plan.append((duration * (n + 0.6) / self.config.broker_kills, "broker kill"))
        if self.config.kill_every_s:
            at = self.config.kill_every_s
            while at < duration:
                plan.append((at, "kill"))
                at += self.config.kill_every_s
        started = time.monotonic()
        for at, what in sorted(plan):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - started)))
            if what == "smtp":
                asyncio.create_task(self._smtp_outage())
            elif what == "broker":
                await self._broker_pause()
            elif what == "rebalance":
                asyncio.create_task(self._second_instance())
            elif what == "broker kill":
                await self._broker_kill()
            else:
                await self._kill_random()

    async def _smtp_outage(self) -> None:
        self.smtp.stop()
        self.faults["SMTP down"] += 1
        await asyncio.sleep(self.config.smtp_outage_s)
        self.smtp.start()

    async def _broker_pause(self) -> None:
        pid = self.stack.broker_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGSTOP)
        self.faults["broker paused (SIGSTOP)"] += 1
        try:
            await asyncio.sleep(self.config.broker_pause_s)
        finally:
            os.kill(pid, signal.SIGCONT)

    async def _broker_kill(self) -> None:
        """kill -9 of the broker node that leads most of the saga topic's partitions, with requests in
        flight; `cancelflow up` starts it again on its log."""
        from cancelflow_tools.stack.broker import partition_leaders

        pids = self.stack.broker_pids()
        leaders = Counter((await partition_leaders(self.stack.endpoints.bootstrap, topics.SAGA)).values())
        node = max(pids, key=lambda n: leaders[n], default=None)
        if node is None:
            return
        os.kill(pids[node], signal.SIGKILL)
        self.killed_leaders.append((node, leaders[node]))
        self.faults[f"kill -9 of the broker (node {node}, leader of {leaders[node]} saga partitions), "
                    "restarted on its log"] += 1

    async def _second_instance(self) -> None:
        """A second instance of a service joins its consumer group mid-run (a rebalance), then leaves."""
        service = self.random.choice(("billing", "provisioning", "payment_gateway", "notification"))
        process = await asyncio.to_thread(self.stack.start_extra_instance, service)
        self.faults[f"rebalance: a second {service} joined and left"] += 1
        try:
            await asyncio.sleep(self.config.rebalance_s)
        finally:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                # As an orchestrator would after its grace period: a stop can outlast it while the broker
                # is down (the consumer's last commit and the producer's flush wait for it).
                process.kill()
                await asyncio.to_thread(process.wait)
                self.faults[f"the second {service} killed after 30 s of stopping"] += 1

    async def _kill_random(self, wait_s: float = 15.0) -> None:
        """kill -9 of a random service among those up right now (one that is restarting has no pid);
        when every target is still restarting (a slow machine), the kill waits for one to be back."""
        deadline = time.monotonic() + wait_s
        while True:
            for service in self.random.sample(self.config.kill_targets, len(self.config.kill_targets)):
                pid = await asyncio.to_thread(self.stack.service_pid, service)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    self.faults[f"kill -9 {service}"] += 1
                    return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.2)

    # --- the end ---------------------------------------------------------------------------------

    async def _replay(self, client: StackClient) -> None:
        """Every record of the request topic delivered again, from the earliest offset: no new effects."""
        from cancelflow_tools.ops import read_all

        records = await read_all(self.stack.endpoints.bootstrap, topics.REQUESTED, self.stack.settings)
        for record in records:
            await client.publisher.send_raw(topics.REQUESTED, record.value, key=record.key.decode() if record.key
                                            else None, wait=False,
                                            headers=list(record.headers or ()))
        await client.publisher.flush()
        self.faults[f"replay of {topics.REQUESTED} from the earliest offset ({len(records)} records)"] += 1

    async def _settle(self, watcher: StatusWatcher) -> None:
        """Wait until every accepted request is terminal and its owed emails are in its history."""
        deadline = time.monotonic() + self.config.settle_timeout_s
        for sent in self.sent:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                last = await watcher.terminal(sent.request_id, timeout=remaining)
                owed = len(invariants.owed_kinds(last))
                await watcher.terminal(sent.request_id, emails=owed, timeout=max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                continue  # the checker names what is stuck


def render(result: ChaosResult, console: Console) -> None:
    faults = Table(title="faults injected")
    faults.add_column("fault")
    faults.add_column("count", justify="right")
    for name, count in sorted(result.faults.items()):
        faults.add_row(name, str(count))
    for point in result.crash_points_fired:
        faults.add_row(f"crash point {point}", "1")
    console.print(faults)
    traffic = Table(title=f"{result.requests} requests in {result.seconds:.0f} s")
    traffic.add_column("scenario")
    traffic.add_column("sent", justify="right")
    for name, count in sorted(result.scenarios.items()):
        traffic.add_row(name, str(count))
    for state, count in sorted(result.outcomes.items()):
        traffic.add_row(f"[dim]ended {state}[/]", str(count))
    console.print(traffic)
    checks = Table(title="invariants")
    for column in ("invariant", "checked", "violations", "first violation"):
        checks.add_column(column, overflow="fold")
    for name, checked, violations, first in result.report.rows():
        style = "red" if violations else "green"
        checks.add_row(name, str(checked), f"[{style}]{violations}[/]", first)
    console.print(checks)


def chaos_env(smtp_port: int, *, on_kafka: bool | None = None) -> dict[str, str]:
    """The stack's settings for a chaos run: every crash point armed, short budgets and sessions (a killed
    service rejoins its consumer group in seconds; on Kafka, whose shortest session is 6 s, static
    membership does that), SMTP pointed at the run's own recording server. `on_kafka`: by default, as
    CANCELFLOW_BROKER says."""
    if on_kafka is None:
        on_kafka = os.environ.get("CANCELFLOW_BROKER") == "kafka"
    return {
        "CANCELFLOW_CRASH_POINTS": ",".join(CRASH_POINTS), "KAFKA_SESSION_TIMEOUT_MS": "6000" if on_kafka else "3000",
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port), "SMTP_RETRY_MAX_SECONDS": "2",
        "VENDOR_TIMEOUT_SECONDS": "1", "VENDOR_ATTEMPTS": "3", "GATEWAY_TIMEOUT_SECONDS": "1",
        "GATEWAY_ATTEMPTS": "3",
    }


def data_dir_for(base: Path) -> Path:
    return base / f"chaos-{datetime.now(UTC):%Y%m%dT%H%M%S}"
