"""Property: whatever order a backlog brings a subscription's charges and its cancellations in (each
topic keeping its own order, the waiter's rounds anywhere, records redelivered under the same or a new
event id), every refund is what the order they were published in gives: per gateway charge, and per
request. A cancellation met before its charges waits for them (payment_gateway.waits); once every fact
is read, none waits.

Through the payment-gateway handlers, the consume loop's inbox path, the service's FactsWaiter and the
gateway sandbox's rules, on SQLite and PostgreSQL. CI runs a fixed derandomized set;
`HYPOTHESIS_PROFILE=long` runs many more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from cancelflow.db import create_schema, make_engine, transactions
from cancelflow.events import ChargeCaptured, PlatformCommitted
from cancelflow.messaging.codec import Message
from cancelflow.messaging.facts import FactsProgress, FactsWaiter
from cancelflow.messaging.uow import UnitOfWork
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from cancelflow_tools.testing.messages import handle, message
from payment_gateway import orm
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.waits import AWAITING_FACTS, RefundWaits
from tests.conftest import pg_database_url
from tests.unit.test_handlers import outbox
from tests.unit.test_refund_per_charge import PERIOD_END, PERIOD_START, committed

PROFILES = {"ci": settings(max_examples=30, derandomize=True, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow]),
            "long": settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])}
PROFILE = PROFILES[os.environ.get("HYPOTHESIS_PROFILE", "ci")]
PG_PROFILE = settings(PROFILE, max_examples=min(PROFILE.max_examples, 12))

PUBLISHED = datetime(2026, 11, 15, 12, tzinfo=UTC)  # record n was published at PUBLISHED + n seconds
CAPTURED_AT = datetime(2026, 11, 1, 9, tzinfo=UTC)


@dataclass(frozen=True)
class Record:
    """One published record: a charge's facts or a cancellation (its PlatformCommitted)."""

    at: int  # its place in the order of publication
    event: ChargeCaptured | PlatformCommitted

    @property
    def fact(self) -> bool:
        return isinstance(self.event, ChargeCaptured)

    def message(self) -> Message:
        """A delivery of it (a new event id each time), stamped with its publication time."""
        msg = message(self.event)
        return dataclasses.replace(msg, envelope=msg.envelope.model_copy(
            update={"occurred_at": PUBLISHED + timedelta(seconds=self.at)}))


@dataclass(frozen=True)
class Delivery:
    record: int  # index into the published records
    again: str  # "no" | "same" (the same record again: the inbox drops it) | "new" (a new event id)
    waiter_after: bool  # the waiter runs a round after it


@st.composite
def subscription(draw: st.DrawFn, n: int) -> list[ChargeCaptured | PlatformCommitted]:
    """A subscription's charges for the period, then its cancellations (published in that order)."""
    licenses = draw(st.integers(1, 6))
    if draw(st.booleans()):  # several charges, each paying for some of the licenses
        parts, left = [], licenses
        while left:
            part = draw(st.integers(1, left))
            parts.append(part)
            left -= part
        quantities: list[int | None] = list(parts[:3]) + ([sum(parts[3:])] if parts[3:] else [])
    else:
        quantities = [None]  # one charge for the subscription's licenses
    period_quantity = licenses if quantities != [None] or draw(st.booleans()) else None
    charges: list[ChargeCaptured | PlatformCommitted] = [ChargeCaptured(
        charge_id=f"ch-{n}-{i}", account_id="acc-1", subscription_id=f"sub-{n}",
        amount=Decimal(draw(st.integers(100, 100_000))) / 100, currency="USD", captured_at=CAPTURED_AT,
        gateway_charge_id=f"gw-{n}-{i}", period_start=PERIOD_START, period_end=PERIOD_END, quantity=q)
        for i, q in enumerate(quantities)]
    cancellations: list[ChargeCaptured | PlatformCommitted] = []
    quantity = licenses
    while quantity and len(cancellations) < 3:
        removed = draw(st.integers(1, quantity))
        effective = PERIOD_END - timedelta(days=draw(st.integers(0, 30)))
        cancellations.append(committed(
            subscription_id=f"sub-{n}", quantity_before=quantity, quantity_after=quantity - removed,
            full=removed == quantity, period_quantity=period_quantity, effective_date=effective,
            access_end_date=effective))
        quantity -= removed
    return charges + cancellations


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Record], list[Delivery]]:
    streams = [draw(subscription(n)) for n in range(draw(st.integers(1, 2)))]
    # Published: the subscriptions' streams interleaved, each in its own order.
    turns = draw(st.permutations([n for n, stream in enumerate(streams) for _ in stream]))
    published = [Record(at, streams[n].pop(0)) for at, n in enumerate(turns)]
    # Delivered: the facts' topic and the saga's each in order, merged anyhow (a backlog, a restart).
    facts = [i for i, r in enumerate(published) if r.fact]
    commands = [i for i, r in enumerate(published) if not r.fact]
    merged = draw(st.permutations([True] * len(facts) + [False] * len(commands)))
    order = [(facts if is_fact else commands).pop(0) for is_fact in merged]
    deliveries = [Delivery(i, draw(st.sampled_from(["no", "no", "same", "new"])), draw(st.booleans()))
                  for i in order]
    return published, deliveries


class ReadSoFar(FactsProgress):
    """The charges' topic read up to a time when every charge published before it has been delivered."""

    def __init__(self, published: list[Record]) -> None:
        super().__init__({"payments.charges"})
        self.published = published
        self.delivered: set[int] = set()

    def read_up_to(self, at: datetime) -> bool:
        before = (at - PUBLISHED).total_seconds()
        return all(r.at in self.delivered for r in self.published if r.fact and r.at < before)

    handled_up_to = read_up_to  # the waiter runs between deliveries here


class Service:
    """Payment-gateway on one database: its handlers, the waiter it runs, and the gateway sandbox."""

    def __init__(self, engine: Any, published: list[Record], facts: FactsProgress) -> None:
        self.engine = engine
        self.gateway = FakeGatewayClient()
        self.handlers = PaymentHandlers(self.gateway, facts)
        self.waiter = FactsWaiter(lambda: UnitOfWork(transactions(engine), orm.messaging, producer="test"),
                                  lambda uow: RefundWaits(uow.db).waiting(), self.handlers.settle_waiting)
        self.published = published

    async def capture_all(self) -> None:
        for record in self.published:  # the gateway knows its charges, whatever we have read
            if isinstance(charge := record.event, ChargeCaptured):
                await self.gateway.capture(amount=charge.amount, currency=charge.currency,
                                           account_id=charge.account_id, subscription_id=charge.subscription_id,
                                           captured_at=charge.captured_at,
                                           gateway_charge_id=charge.gateway_charge_id)

    async def deliver(self, record: Record, msg: Message) -> None:
        handler = self.handlers.charge_captured if record.fact else self.handlers.platform_committed
        await handle(self.engine, orm, handler, msg, on_commit=self._woken)

    def _woken(self, written: frozenset[str]) -> None:
        if AWAITING_FACTS in written:  # as the service's wake-ups do
            self.waiter.notify()

    def per_charge(self) -> Counter[str]:
        refunded: Counter[str] = Counter()
        for effect in self.gateway.effects:
            if effect["type"] in ("refund", "reversal"):
                refunded[effect["gateway_charge_id"]] += Decimal(effect["amount"])
        return refunded

    async def per_request(self) -> dict[str, tuple[str, str]]:
        """Each request's first outcome: its event type and amount (a later delivery says it again)."""
        found: dict[str, tuple[str, str]] = {}
        for event in await outbox(self.engine, orm):
            found.setdefault(event["payload"]["request_id"], (event["event_type"], event["payload"].get("amount", "")))
        return found

    async def waiting(self) -> list[str]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(select(orm.refund_waits.c.request_id))).scalars())


async def _fresh(url: str) -> Any:
    engine = make_engine(url)
    await create_schema(engine, orm.metadata)
    async with engine.begin() as conn:  # a database shared by the examples starts empty
        for table in reversed(orm.metadata.sorted_tables):
            await conn.execute(delete(table))
    return engine


async def compare(published: list[Record], deliveries: list[Delivery], urls: tuple[str, str]) -> None:
    in_order, backlog = await _fresh(urls[0]), await _fresh(urls[1])
    try:
        expected = Service(in_order, published, FactsProgress())  # every charge read before what follows it
        await expected.capture_all()
        for record in published:
            await expected.deliver(record, record.message())
        assert await expected.waiting() == []

        facts = ReadSoFar(published)
        actual = Service(backlog, published, facts)
        await actual.capture_all()
        for delivery in deliveries:
            record = published[delivery.record]
            msg = record.message()
            await actual.deliver(record, msg)
            if record.fact:
                facts.delivered.add(record.at)
            if delivery.again != "no":
                await actual.deliver(record, msg if delivery.again == "same" else record.message())
            if delivery.waiter_after:
                await actual.waiter.settle_round()
        assert await actual.waiter.settle_round() == 0  # every fact read: nothing waits any more
        assert await actual.waiting() == []

        assert actual.per_charge() == expected.per_charge()
        assert await actual.per_request() == await expected.per_request()
        keys = Counter(e["idempotency_key"] for e in actual.gateway.effects if e["type"] in ("refund", "reversal"))
        assert all(n == 1 for n in keys.values()), keys
    finally:
        await in_order.dispose()
        await backlog.dispose()


@PROFILE
@given(scenarios())
def test_a_backlog_in_any_order_refunds_what_the_published_order_does(scenario: tuple) -> None:
    published, deliveries = scenario
    with tempfile.TemporaryDirectory() as folder:
        urls = (f"sqlite+aiosqlite:///{Path(folder) / 'in-order.db'}",
                f"sqlite+aiosqlite:///{Path(folder) / 'backlog.db'}")
        asyncio.run(compare(published, deliveries, urls))


@pytest.mark.pg
def test_a_backlog_in_any_order_refunds_what_the_published_order_does_on_postgresql(pg_server: Any) -> None:
    urls = (pg_database_url(pg_server, "waits_in_order"), pg_database_url(pg_server, "waits_backlog"))

    @PG_PROFILE
    @given(scenarios())
    def check(scenario: tuple) -> None:
        asyncio.run(compare(*scenario, urls))

    check()
