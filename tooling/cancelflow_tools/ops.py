"""Driving a running stack from the outside: where it listens, loading facts, sending requests and
following their status. The CLI, the demo, the benchmark and the end-to-end tests use this."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from cancelflow import topics
from cancelflow.events import (
    TERMINAL_STATES,
    CancellationRequested,
    ChargeCaptured,
    State,
    SubscriptionActivated,
)
from cancelflow.messaging.gaps import GapGuard
from cancelflow.messaging.kafka import client_security, partitions_of
from cancelflow.operator_token import token_for
from cancelflow.settings import CommonSettings
from cancelflow_tools.services import SERVICES
from cancelflow_tools.upstream import UpstreamPublisher


@dataclass(frozen=True)
class Endpoints:
    bootstrap: str
    status: str
    billing: str
    payment_gateway: str
    notification: str
    vendor: str
    gateway: str
    dispute: str = ""

    @classmethod
    def from_env(cls, settings: CommonSettings | None = None, env: dict[str, str] | None = None) -> Endpoints:
        import os

        settings = settings or CommonSettings()
        env = dict(os.environ if env is None else env)

        def port(service: str) -> int:
            prefix, default = SERVICES[service]
            return int(env.get(f"{prefix}_HTTP_PORT", default))

        return cls(
            bootstrap=settings.bootstrap_servers,
            status=f"http://127.0.0.1:{port('status_tracker')}",
            billing=f"http://127.0.0.1:{port('billing')}",
            payment_gateway=f"http://127.0.0.1:{port('payment_gateway')}",
            notification=f"http://127.0.0.1:{port('notification')}",
            vendor=settings.vendor_url,
            gateway=settings.gateway_url,
            dispute=f"http://127.0.0.1:{port('dispute')}",
        )


@dataclass(frozen=True)
class SampleSubscription:
    facts: SubscriptionActivated
    charges: list[ChargeCaptured]


def sample_subscription(*, account_id: str, subscription_id: str, today: date, price: str = "30.00",
                        quantity: int = 1, days_into_period: int = 10, period_days: int = 30,
                        status: str = "active", email: str = "customer@example.com",
                        name: str = "Alex Customer", product: str = "Total AV Internet Security",
                        vendor: str = "totalav") -> SampleSubscription:
    start = today - timedelta(days=days_into_period)
    end = start + timedelta(days=period_days)
    facts = SubscriptionActivated(
        subscription_id=subscription_id, account_id=account_id, customer={"email": email, "name": name},
        product_name=product, vendor=vendor, vendor_subscription_id=f"{vendor}-{subscription_id}",
        billing_period="monthly", unit_price=price, currency="USD", quantity=quantity, status=status,
        current_period_start=start, current_period_end=end, auto_renew=True)
    amount = Decimal(price) * quantity
    charge = ChargeCaptured(
        charge_id=f"ch-{subscription_id}", account_id=account_id, subscription_id=subscription_id,
        amount=str(amount), currency="USD",
        captured_at=datetime.combine(start, datetime.min.time(), tzinfo=UTC) + timedelta(hours=1),
        gateway_charge_id=f"gw-{subscription_id}", period_start=start, period_end=end)
    return SampleSubscription(facts, [] if status == "trial" else [charge])


def with_duplicate_charges(sample: SampleSubscription, count: int) -> SampleSubscription:
    """The sample with `count` more captures of its first charge, an hour apart (charge ids
    `ch-<subscription>-2`, `-3`, ...): what the multiple-charge flow refunds."""
    if count <= 0 or not sample.charges:
        return sample
    first = sample.charges[0]
    copies = [first.model_copy(update={"charge_id": f"{first.charge_id}-{n}",
                                       "gateway_charge_id": f"{first.gateway_charge_id}-{n}",
                                       "captured_at": first.captured_at + timedelta(hours=n - 1)})
              for n in range(2, count + 2)]
    return SampleSubscription(sample.facts, [first, *copies])


class StackClient:
    """HTTP and Kafka access to a running stack (`async with StackClient(endpoints) as stack`)."""

    def __init__(self, endpoints: Endpoints, settings: CommonSettings | None = None,
                 producer_name: str = "storefront", token: str | None = None) -> None:
        self.endpoints = endpoints
        self.settings = settings or CommonSettings(KAFKA_BOOTSTRAP_SERVERS=endpoints.bootstrap)
        self._publisher = UpstreamPublisher(self.settings, producer_name=producer_name)
        self._http: aiohttp.ClientSession | None = None
        self._token = token

    async def __aenter__(self) -> StackClient:
        await self._publisher.__aenter__()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), trust_env=False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._publisher.__aexit__(None, None, None)
        if self._http:
            await self._http.close()

    @property
    def publisher(self) -> UpstreamPublisher:
        return self._publisher

    @property
    def token(self) -> str | None:
        """The status service's operator token (CONTRACT.md section 11): given, CANCELFLOW_TOKEN, or the
        embedded stack's (read when needed: `cancelflow up` may make it after this client was built)."""
        return self._token if self._token is not None else token_for(self.settings)

    def _auth(self, url: str) -> dict[str, str]:
        if self.token and url.startswith(self.endpoints.status):
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    async def get_json(self, url: str) -> tuple[int, Any]:
        assert self._http is not None
        async with self._http.get(url, headers=self._auth(url)) as response:
            if response.content_type != "application/json":
                return response.status, await response.text()
            return response.status, await response.json()

    async def post_json(self, url: str, body: Any, *, expect: tuple[int, ...] = (200, 201)) -> Any:
        assert self._http is not None
        async with self._http.post(url, data=orjson.dumps(body),
                                   headers={"Content-Type": "application/json", **self._auth(url)}) as response:
            data = await response.json(content_type=None)
            if response.status not in expect:
                raise RuntimeError(f"POST {url} -> {response.status}: {data}")
            return data

    async def delete(self, url: str) -> None:
        assert self._http is not None
        async with self._http.delete(url) as response:
            await response.read()

    # --- facts -------------------------------------------------------------------------------

    async def load(self, samples: list[SampleSubscription], *, timeout: float = 60) -> None:
        """Capture the charges at the gateway, publish the facts, and wait until every service that
        keeps a copy has it (requests sent earlier would find nothing to cancel)."""
        for sample in samples:
            for charge in sample.charges:
                await self.post_json(f"{self.endpoints.gateway}/v1/charges", {
                    "amount": f"{charge.amount:.2f}", "currency": charge.currency, "account_id": charge.account_id,
                    "subscription_id": charge.subscription_id, "gateway_charge_id": charge.gateway_charge_id,
                    "captured_at": charge.captured_at.isoformat()})
            await self._publisher.publish(sample.facts, correlation_id=sample.facts.subscription_id, wait=False)
            for charge in sample.charges:
                await self._publisher.publish(charge, correlation_id=charge.charge_id, wait=False)
        await self._publisher.flush()
        urls = [f"{self.endpoints.billing}/subscriptions/{s.facts.subscription_id}" for s in samples]
        urls += [f"{self.endpoints.notification}/contacts/{s.facts.subscription_id}" for s in samples]
        urls += [f"{self.endpoints.payment_gateway}/charges/{c.charge_id}" for s in samples for c in s.charges]
        await self._until_all_found(urls, timeout)

    async def load_for_dispute(self, samples: list[SampleSubscription], *, timeout: float = 60) -> None:
        """`load`, then wait until the dispute service has its copy of every charge too."""
        await self.load(samples, timeout=timeout)
        await self._until_all_found(
            [f"{self.endpoints.dispute}/charges/{c.charge_id}" for s in samples for c in s.charges], timeout)

    async def dispute(self, request_id: str) -> dict[str, Any] | None:
        """The dispute case of a charges request: each listed charge's outcome and the audit trail."""
        code, body = await self.get_json(f"{self.endpoints.dispute}/disputes/{request_id}")
        return body if code == 200 else None

    async def _until_all_found(self, urls: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(urls)
        while pending:
            try:
                status, _ = await self.get_json(pending[0])
            except aiohttp.ClientError:
                status = 0  # the service is (re)starting: not ingested yet, as far as we can tell
            if status == 200:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"facts not ingested within {timeout}s: {pending[0]}")
            await asyncio.sleep(0.05)

    # --- requests ----------------------------------------------------------------------------

    async def request_cancellation(self, *, account_id: str, subscription_id: str | None = None,
                                   mode: str = "immediate", effective_date: date | None = None,
                                   quantity: int | None = None, charge_ids: list[str] | None = None,
                                   user_id: str = "cli", role: str = "customer", channel: str = "storefront",
                                   reason: str = "", requires_approval: bool = False,
                                   opt_out_of_emails: bool = False, request_id: uuid.UUID | None = None,
                                   wait: bool = True) -> str:
        request = CancellationRequested(
            request_id=request_id or uuid.uuid4(), account_id=account_id,
            requested_by={"user_id": user_id, "role": role, "channel": channel},
            target="charges" if charge_ids else "subscription", subscription_id=subscription_id, mode=mode,
            effective_date=effective_date, quantity=quantity, charge_ids=charge_ids or [], reason=reason,
            requires_approval=requires_approval, opt_out_of_emails=opt_out_of_emails)
        await self._publisher.publish(request, wait=wait)
        return str(request.request_id)

    async def act(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """An operator's action on the status service (CONTRACT.md section 11): (HTTP status, answer)."""
        assert self._http is not None
        url = f"{self.endpoints.status}{path}"
        async with self._http.post(url, data=orjson.dumps(body),
                                   headers={"Content-Type": "application/json", **self._auth(url)}) as response:
            return response.status, await response.json(content_type=None)

    async def status(self, request_id: str) -> dict[str, Any] | None:
        code, body = await self.get_json(f"{self.endpoints.status}/requests/{request_id}")
        return body if code == 200 else None

    async def emails(self, request_id: str) -> list[dict[str, Any]]:
        code, body = await self.get_json(f"{self.endpoints.notification}/requests/{request_id}/emails")
        return body["emails"] if code == 200 else []


class StatusWatcher:
    """Follows `cancellations.status` (what a support dashboard reads) and wakes waiters per record."""

    def __init__(self, bootstrap: str, *, from_beginning: bool = True,
                 settings: CommonSettings | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._on_record = on_record
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=25, group_id=None,
                                          **client_security(settings or CommonSettings()))
        self._from_beginning = from_beginning
        self.latest: dict[str, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StatusWatcher:
        await self._consumer.start()
        assigned = await partitions_of(self._consumer, topics.STATUS)
        if not assigned:
            raise RuntimeError(f"topic {topics.STATUS} does not exist (run `cancelflow topics`)")
        self._consumer.assign(assigned)
        if self._from_beginning:
            await self._consumer.seek_to_beginning(*assigned)
        else:
            await self._consumer.seek_to_end(*assigned)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        # The stack may have stopped under the watcher (a restart test): aiokafka's stop then re-raises its
        # failed fetch, even as a CancelledError of its own; the records read are kept all the same.
        await asyncio.gather(asyncio.ensure_future(self._consumer.stop()), return_exceptions=True)

    async def _run(self) -> None:
        gaps = GapGuard()
        while True:
            batch = await gaps.check(self._consumer, await self._consumer.getmany(timeout_ms=500))
            if not batch:
                continue
            async with self._changed:
                for records in batch.values():
                    for record in records:
                        envelope = orjson.loads(record.value)
                        status = envelope["payload"]
                        self.records.append(status)
                        self.latest[status["request_id"]] = status
                        if self._on_record is not None:
                            self._on_record(status)
                self._changed.notify_all()

    async def wait_for(self, request_id: str, predicate: Callable[[dict[str, Any]], bool],
                       timeout: float = 60) -> dict[str, Any]:
        async def until() -> dict[str, Any]:
            async with self._changed:
                while True:
                    status = self.latest.get(request_id)
                    if status is not None and predicate(status):
                        return status
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            last = self.latest.get(request_id)
            raise TimeoutError(f"request {request_id} did not get there in {timeout}s; last: "
                               f"{last and (last['state'], last['history'][-1:])}") from None

    async def terminal(self, request_id: str, *, emails: int = 0, timeout: float = 60) -> dict[str, Any]:
        """The request's record once it is terminal and `emails` deliveries are in its history."""
        return await self.wait_for(request_id, lambda s: is_terminal(s) and email_count(s) >= emails, timeout)

    def history_of(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["request_id"] == request_id]


def is_terminal(status: dict[str, Any]) -> bool:
    return State(status["state"]) in TERMINAL_STATES


def email_count(status: dict[str, Any]) -> int:
    return sum(1 for h in status["history"] if h["message"].startswith("Email "))


# How many emails each outcome owes (customer + support), CONTRACT.md section 5.
EMAILS_OWED = {("completed", None): 1, ("failed", "vendor"): 1, ("failed", "platform"): 2,
               ("manual_review", "payment"): 2, ("rejected", "validation"): 0}


def emails_owed(status: dict[str, Any]) -> int:
    error = status.get("error") or {}
    return EMAILS_OWED.get((status["state"], error.get("source")), 0)


async def read_all(bootstrap: str, topic: str, settings: CommonSettings | None = None) -> list[Any]:
    """Every record on `topic` up to its end right now (what is there when reading stops), partition by
    partition in offset order."""
    settings = settings or CommonSettings()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=25,
                                group_id=None, **client_security(settings))
    await consumer.start()
    try:
        partitions = await partitions_of(consumer, topic)
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: dict[TopicPartition, list[Any]] = {tp: [] for tp in partitions}

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        # The embedded broker answers ListOffsets with the first offset of a partition's last record
        # batch, not the end: read on until a fetch round brings nothing more. Kafka's end is the end.
        quiet, settled = 0, 0 if settings.on_kafka else 2
        while quiet < settled or await behind():
            batch = await consumer.getmany(timeout_ms=250)
            quiet = 0 if batch else quiet + 1
            for tp, found in batch.items():
                records[tp].extend(found)
        return [r for tp in partitions for r in records[tp]]
    finally:
        await consumer.stop()
