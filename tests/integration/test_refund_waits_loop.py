"""Facts first across polls, for refunds (payment_gateway.waits): after a restart the consume loop meets a
`PlatformCommitted` in a poll before the `ChargeCaptured` published ahead of it has been fetched. The
refund waits (the charges partition is not read to its end), then the charge comes in the next poll, its
commit wakes the waiter, and the refund is paid in full. On SQLite and PostgreSQL, through the
service's routes as bootstrap builds them (charges: a facts batch route; the saga: in rounds)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

from aiokafka import ConsumerRecord, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow import topics
from cancelflow.db import transactions
from cancelflow.events import ChargeCaptured, Payload, PlatformCommitted, envelope_for
from cancelflow.messaging.codec import EVENT_TYPE_HEADER, Message, encode
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.facts import FactsProgress, FactsWaiter
from cancelflow.messaging.uow import UnitOfWork
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from payment_gateway import orm
from payment_gateway.bootstrap import routes as payment_routes
from payment_gateway.disputes import DisputeRefundHandlers
from payment_gateway.handlers import PaymentHandlers
from payment_gateway.retries import RefundRetryHandlers
from payment_gateway.waits import AWAITING_FACTS, RefundWaits
from tests.unit.test_handlers import outbox
from tests.unit.test_refund_per_charge import PERIOD_END, PERIOD_START, committed, engine

__all__ = ["engine"]  # the fixture, used by name

SAGA = TopicPartition(topics.SAGA, 0)
CHARGES = TopicPartition(topics.PAYMENTS_CHARGES, 0)
CAPTURED_AT = datetime(2026, 11, 1, 9, tzinfo=UTC)


def record(tp: TopicPartition, offset: int, payload: Payload, timestamp_ms: int) -> ConsumerRecord:
    value = encode(envelope_for(payload, producer="test", correlation_id="c", causation_id=None))
    return ConsumerRecord(tp.topic, tp.partition, offset, timestamp_ms, 0, payload.record_key().encode(), value,
                          None, 1, len(value), [(EVENT_TYPE_HEADER, payload.event_type.encode())])


class Backlog:
    """A consumer holding the saga's and the charges' partitions, with the charge not fetched at first."""

    def __init__(self, polls: list[dict[TopicPartition, list[ConsumerRecord]]]) -> None:
        self.polls = polls
        self.drained = asyncio.Event()
        self.positions = {SAGA: 0, CHARGES: 0}

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[ConsumerRecord]]:
        if not self.polls:
            self.drained.set()
            await asyncio.sleep(3600)
        poll = self.polls.pop(0)
        for tp, found in poll.items():
            self.positions[tp] = found[-1].offset + 1
        return poll

    def highwater(self, tp: TopicPartition) -> int:
        return 1  # one record on each partition

    def assignment(self) -> set[TopicPartition]:
        return {SAGA, CHARGES}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        pass

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 1)

    async def committed(self, tp: TopicPartition) -> int:
        return 0


async def test_a_refund_met_a_poll_before_its_charge_waits_for_it_and_is_paid_in_full(engine: AsyncEngine) -> None:
    gateway = FakeGatewayClient()
    facts = FactsProgress()
    handlers = PaymentHandlers(gateway, facts)
    sessions = transactions(engine)
    waiter = FactsWaiter(lambda: UnitOfWork(sessions, orm.messaging, producer="test"),
                         lambda uow: RefundWaits(uow.db).waiting(), handlers.settle_waiting)
    woken = asyncio.Event()

    def committed_(written: frozenset[str]) -> None:
        if AWAITING_FACTS in written:  # the service's wake_on
            waiter.notify()
            woken.set()

    def new_uow(message: Message | None = None) -> UnitOfWork:
        return UnitOfWork(sessions, orm.messaging, producer="test", message=message, on_commit=committed_)

    routes = payment_routes(handlers, DisputeRefundHandlers(gateway), RefundRetryHandlers(gateway))
    await gateway.capture(amount=Decimal("30.00"), currency="USD", account_id="acc-1", subscription_id="sub-1",
                          captured_at=CAPTURED_AT, gateway_charge_id="gw-c1")
    charge = ChargeCaptured(charge_id="c1", account_id="acc-1", subscription_id="sub-1", amount="30.00",
                            currency="USD", captured_at=CAPTURED_AT, gateway_charge_id="gw-c1",
                            period_start=PERIOD_START, period_end=PERIOD_END)
    event: PlatformCommitted = committed()  # one license, a third of the period used: 20.00 owed
    published_ms = int(datetime.now(UTC).timestamp() * 1000) - 60_000  # the charge, a minute before
    consumer = Backlog([{SAGA: [record(SAGA, 0, event, published_ms + 1000)]},
                        {CHARGES: [record(CHARGES, 0, charge, published_ms)]}])
    loop = ConsumeLoop(consumer, routes, new_uow, service="payment_gateway", group_id="g",  # type: ignore[arg-type]
                       facts=facts)
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(consumer.drained.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert woken.is_set()
    assert await waiter.settle_round() == 0
    issued = [e for e in await outbox(engine, orm) if e["event_type"] == "RefundIssued"]
    assert [(e["payload"]["status"], e["payload"]["amount"]) for e in issued] == [("succeeded", "20.00")]
    refunded = [e for e in gateway.effects if e["type"] in ("refund", "reversal")]
    assert [Decimal(e["amount"]) for e in refunded] == [Decimal("20.00")]


async def test_a_waiter_trusts_the_facts_only_once_their_poll_is_handled() -> None:
    """The poll that reads the charges to their end counts them read at once (its own records come after
    them), but a waiter running beside the loop while they are still being written must not: on
    PostgreSQL it settled 20 of 20 waiting refunds `not_due` that way (tests/e2e/test_refund_waits.py)."""
    at = datetime.now(UTC)
    charge = ChargeCaptured(charge_id="c1", account_id="acc-1", subscription_id="sub-1", amount="30.00",
                            currency="USD", captured_at=CAPTURED_AT, gateway_charge_id="gw-c1",
                            period_start=PERIOD_START, period_end=PERIOD_END)
    consumer = Backlog([{CHARGES: [record(CHARGES, 0, charge, 0)]}, {}])
    progress = FactsProgress({topics.PAYMENTS_CHARGES})
    await progress.update(consumer, await consumer.getmany())  # type: ignore[arg-type]
    assert progress.read_up_to(at)  # for the poll's own handlers
    assert not progress.handled_up_to(at)  # its charge may not be committed yet
    await progress.update(consumer, await consumer.getmany())  # type: ignore[arg-type]  # the loop polls again
    assert progress.handled_up_to(at)
