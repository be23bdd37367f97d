"""End-to-end fixtures: the whole stack as processes (`cancelflow up`), on SQLite stores and on
PostgreSQL stores, with a recording SMTP server standing in for the mail server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from cancelflow import topics
from cancelflow.settings import CommonSettings
from cancelflow_tools.ops import SampleSubscription, StackClient, StatusWatcher, sample_subscription
from cancelflow_tools.services import SERVICES
from cancelflow_tools.testing.smtp import RecordingSMTPServer
from cancelflow_tools.testing.stack import StackProcess

SUPPORT = "support@cancelflow.test"


def saga_partition(request_id: str) -> int:
    """The partition of `cancellations.saga` a request's events go to, on the tests' broker."""
    count = topics.BY_NAME[topics.SAGA].partitions_on(embedded=not CommonSettings().on_kafka)
    partitions = list(range(count))
    return DefaultPartitioner()(request_id.encode(), partitions, partitions)


def id_on_same_saga_partition(request_id: str) -> uuid.UUID:
    """A new request id whose saga events share `request_id`'s partition: a marker request behind them."""
    while True:
        candidate = uuid.uuid4()
        if saga_partition(str(candidate)) == saga_partition(request_id):
            return candidate


async def loaded_subscription(client: StackClient, *, account_id: str, subscription_id: str,
                              **sample: Any) -> SampleSubscription:
    """A sample subscription (see `sample_subscription`), loaded into the stack."""
    subscription = sample_subscription(account_id=account_id, subscription_id=subscription_id, **sample)
    await client.load([subscription])
    return subscription


async def awaiting_approval(client: StackClient, watcher: StatusWatcher, *, account_id: str,
                            subscription_id: str, **sample: Any) -> tuple[SampleSubscription, str, dict[str, Any]]:
    """A loaded subscription and the id and status of its cancellation, which waits for an operator."""
    subscription = await loaded_subscription(client, account_id=account_id, subscription_id=subscription_id,
                                             **sample)
    request_id = await client.request_cancellation(account_id=account_id, subscription_id=subscription_id,
                                                   requires_approval=True)
    return subscription, request_id, await watcher.wait_for(request_id, lambda s: s["state"] == "pending_approval")


async def vendor_answers(client: StackClient, subscription: SampleSubscription, respond: dict[str, Any],
                         times: int | None = 1) -> None:
    """The vendor sandbox answers `respond` to the next `times` calls about `subscription`."""
    await client.post_json(f"{client.endpoints.vendor}/_sandbox/rules", {
        "match": {"vendor_subscription_id": subscription.facts.vendor_subscription_id},
        "respond": respond, "times": times})


async def gateway_answers(client: StackClient, gateway_charge_id: str, respond: dict[str, Any],
                          times: int | None = 1) -> None:
    """The gateway sandbox answers `respond` to the next `times` calls about one charge."""
    await client.post_json(f"{client.endpoints.gateway}/_sandbox/rules", {
        "match": {"gateway_charge_id": gateway_charge_id}, "respond": respond, "times": times})


async def service_back(stack: StackProcess, client: StackClient, service: str, killed: int) -> None:
    """Until `service`, restarted after a kill (another pid), is ready: consuming again."""
    deadline = asyncio.get_running_loop().time() + 90
    while asyncio.get_running_loop().time() < deadline:
        pid = stack.service_pid(service)
        if pid is not None and pid != killed:
            try:
                code, _ = await client.get_json(f"{getattr(client.endpoints, service)}/readyz")
            except OSError:
                code = 0
            if code == 200:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{service} did not come back")


async def publish_with_charges(client: StackClient, sample: SampleSubscription) -> None:
    """A subscription's facts and its charges, each captured at the gateway sandbox first (unflushed)."""
    await client.publisher.publish(sample.facts, correlation_id=sample.facts.subscription_id, wait=False)
    for charge in sample.charges:
        await client.post_json(f"{client.endpoints.gateway}/v1/charges", {
            "amount": f"{charge.amount:.2f}", "currency": charge.currency,
            "account_id": charge.account_id, "subscription_id": charge.subscription_id,
            "gateway_charge_id": charge.gateway_charge_id, "captured_at": charge.captured_at.isoformat()})
        await client.publisher.publish(charge, correlation_id=charge.charge_id, wait=False)


def _pg_urls(pg_server, tag: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    host = pg_server.get_uri().split("host=", 1)[1]
    urls = {}
    for service, (prefix, _) in SERVICES.items():
        name = f"e2e_{tag}_{service}"
        pg_server.psql(f"CREATE DATABASE {name};")
        urls[f"{prefix}_DATABASE_URL"] = f"postgresql+asyncpg://postgres@/{name}?host={host}"
    return urls


@pytest.fixture(scope="module")
def smtp() -> Iterator[RecordingSMTPServer]:
    with RecordingSMTPServer() as server:
        yield server


@pytest.fixture(scope="module", params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
def stack(request, tmp_path_factory, smtp) -> Iterator[StackProcess]:  # type: ignore[no-untyped-def]
    env = {
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port), "SUPPORT_EMAIL": SUPPORT,
        # Short vendor/gateway budgets keep the failure scenarios quick.
        "VENDOR_TIMEOUT_SECONDS": "1", "VENDOR_ATTEMPTS": "3",
        "GATEWAY_TIMEOUT_SECONDS": "1", "GATEWAY_ATTEMPTS": "3", "SCHEDULER_INTERVAL_SECONDS": "1",
        # Mail is retried at most a second apart while the test SMTP server is stopped.
        "SMTP_RETRY_MAX_SECONDS": "1",
    }
    if request.param == "pg":
        env.update(_pg_urls(request.getfixturevalue("pg_server"), uuid.uuid4().hex[:8]))
    process = StackProcess(tmp_path_factory.mktemp(f"stack-{request.param}"), extra_env=env)
    process.start()
    yield process
    code = process.stop()
    assert code == 0, f"cancelflow up did not stop cleanly ({code}):\n{process.log.read_text()[-3000:]}"


@pytest.fixture
async def client(stack: StackProcess) -> AsyncIterator[StackClient]:
    async with StackClient(stack.endpoints, stack.settings) as c:
        yield c


@pytest.fixture
async def watcher(stack: StackProcess) -> AsyncIterator[StatusWatcher]:
    async with StatusWatcher(stack.endpoints.bootstrap) as w:
        yield w


@pytest.fixture
def ids() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"account": f"acct-{tag}", "other_account": f"acct-other-{tag}", "tag": tag}


@pytest.fixture
def today():  # type: ignore[no-untyped-def]
    return datetime.now(UTC).date()
