"""The refund guard and proration under any interleaving (hypothesis RuleBasedStateMachine).

Cancellations of the same charges arrive in any order, are redelivered, run concurrently, and meet
gateway faults (5xx/timeouts with no effect, answers lost after the refund was applied, refusals).
Whatever happens: no idempotency key is refunded twice at the gateway, no charge is refunded more
than was captured, the gateway never has to refuse an amount our guard let through, and the guard's
books match the gateway's.

Each runs on SQLite and on PostgreSQL, where concurrent deliveries rely on the guard's row lock.
CI runs a fixed, derandomized set of examples; `HYPOTHESIS_PROFILE=long` runs many more.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, select

from cancelflow.db import create_schema, make_engine
from cancelflow.events import ChargeCaptured, Mode, PlatformCommitted, SubscriptionSnapshot
from cancelflow.messaging.codec import Message
from cancelflow.messaging.deadletter import TransientError
from cancelflow_tools.fakes.gateway import FakeGatewayClient
from cancelflow_tools.testing.messages import handle, message
from payment_gateway import orm
from payment_gateway.adapters.gateway import RefundOutcome
from payment_gateway.domain import ChargeTerms, EarlierRefunds, fair_share
from payment_gateway.handlers import PaymentHandlers
from tests.conftest import pg_database_url

settings.register_profile("ci", max_examples=25, stateful_step_count=12, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

PERIOD_START = date(2026, 11, 1)
PERIOD_END = date(2026, 12, 1)
FAULTS = ("none", "unavailable", "answer_lost", "refused")


class FaultyGateway(FakeGatewayClient):
    """The sandbox's rules, plus faults armed for the next refund call."""

    def __init__(self) -> None:
        super().__init__()
        self.next_faults: list[str] = []
        self.refused_for_amount = 0

    async def refund(self, key: str, **kwargs: Any) -> RefundOutcome:
        fault = self.next_faults.pop(0) if self.next_faults else "none"
        if fault == "unavailable":  # 5xx or timeout for the whole budget, nothing applied
            return RefundOutcome(status="unknown", idempotency_key=key, code="gateway_unavailable", message="503")
        if fault == "refused" and await self.lookup_refund(key) is None:
            # A refusal is only possible for a key the gateway has not applied; an applied key is
            # answered with its first result, as real gateways do.
            return RefundOutcome(status="failed", idempotency_key=key, code="card_account_closed",
                                 message="refused", http_status=402)
        outcome = await super().refund(key, **kwargs)
        if outcome.code == "amount_exceeds_refundable":
            self.refused_for_amount += 1
        if fault == "answer_lost" and outcome.ok:
            # Applied, then the answer was lost: the real client looks the key up first; when even
            # that fails the outcome stays unknown and the record is delivered again later.
            return RefundOutcome(status="unknown", idempotency_key=key, code="gateway_timeout", message="lost")
        return outcome


class RefundGuardMachine(RuleBasedStateMachine):
    charges = Bundle("charges")
    unfinished = Bundle("unfinished")

    # The store the examples run on: a new SQLite file each, unless a test gives another database.
    database_url: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.engine = make_engine(self.database_url or f"sqlite+aiosqlite:///{Path(self.dir.name) / 'payments.db'}")
        self.run(create_schema(self.engine, orm.metadata))
        self.run(self._empty())  # a database shared by the examples starts empty
        self.gateway = FaultyGateway()
        self.handlers = PaymentHandlers(self.gateway)
        self.captured: dict[str, Decimal] = {}  # charge_id -> amount
        self.account = "acc-1"

    async def _empty(self) -> None:
        async with self.engine.begin() as conn:
            for table in reversed(orm.metadata.sorted_tables):
                await conn.execute(delete(table))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.engine.dispose())
        self.loop.close()
        self.dir.cleanup()

    async def deliver(self, msg: Message) -> bool:
        """As the consume loop does; False when the record must be delivered again later."""
        try:
            await handle(self.engine, orm, self.handlers.platform_committed, msg)
        except TransientError:
            return False
        return True

    def _deliver_with(self, msg: Message, fault: str) -> None:
        self.gateway.next_faults.append(fault)
        self.run(self.deliver(msg))

    def _deliver_until_done(self, msg: Message, what: str) -> None:
        self.gateway.next_faults.clear()
        for _ in range(5):
            if self.run(self.deliver(msg)):
                return
        raise AssertionError(f"{what} was still transient with the gateway healthy")

    # --- rules -----------------------------------------------------------------------------------

    @rule(target=charges, cents=st.integers(min_value=1, max_value=50_000))
    def capture(self, cents: int) -> str:
        amount = Decimal(cents) / 100
        n = len(self.captured)
        subscription_id, charge_id, gateway_id = f"sub-{n}", f"ch-{n}", f"gw-{n}"
        self.run(self.gateway.capture(amount=amount, currency="USD", account_id=self.account,
                                      subscription_id=subscription_id, gateway_charge_id=gateway_id,
                                      captured_at=datetime(2026, 11, 1, 1, tzinfo=UTC)))
        charge = ChargeCaptured(charge_id=charge_id, account_id=self.account, subscription_id=subscription_id,
                                amount=str(amount), currency="USD", captured_at=datetime(2026, 11, 1, 1, tzinfo=UTC),
                                gateway_charge_id=gateway_id, period_start=PERIOD_START, period_end=PERIOD_END)
        self.run(handle(self.engine, orm, self.handlers.charge_captured, message(charge)))
        self.captured[charge_id] = amount
        return subscription_id

    def _commit_message(self, subscription_id: str, unused_days: int, quantity: int, removed: int) -> Message:
        effective = PERIOD_END - timedelta(days=unused_days)
        event = PlatformCommitted(
            request_id=uuid.uuid4(), account_id=self.account, subscription_id=subscription_id,
            mode=Mode.past_dated, full=removed == quantity, trial=False, effective_date=effective,
            access_end_date=effective, period_start=PERIOD_START, period_end=PERIOD_END,
            quantity_before=quantity, quantity_after=quantity - removed, currency="USD", refund_due=True,
            history="", snapshot=SubscriptionSnapshot())
        return message(event)

    @rule(target=unfinished, subscription=charges, unused=st.integers(0, 30), quantity=st.integers(1, 5),
          removed=st.integers(1, 5), fault=st.sampled_from(FAULTS))
    def cancel(self, subscription: str, unused: int, quantity: int, removed: int, fault: str) -> Message:
        msg = self._commit_message(subscription, unused, quantity, min(removed, quantity))
        self._deliver_with(msg, fault)
        return msg  # kept: it may be redelivered (a no-op once done) or need another delivery

    @rule(msg=unfinished, fault=st.sampled_from(FAULTS))
    def redeliver(self, msg: Message, fault: str) -> None:
        self._deliver_with(msg, fault)

    @rule(msg=consumes(unfinished))
    def deliver_until_done(self, msg: Message) -> None:
        self._deliver_until_done(msg, "a record")

    @rule(subscription=charges, unused=st.integers(0, 30), removed=st.integers(1, 3))
    def concurrent(self, subscription: str, unused: int, removed: int) -> None:
        first = self._commit_message(subscription, unused, 3, removed)
        second = self._commit_message(subscription, unused, 3, removed)

        async def both() -> list[bool]:
            return list(await asyncio.gather(self.deliver(first), self.deliver(second)))

        for msg, done in zip((first, second), self.run(both()), strict=True):
            if not done:
                self.gateway.next_faults.clear()
                assert self.run(self.deliver(msg)) or self.run(self.deliver(msg))

    # --- invariants ------------------------------------------------------------------------------

    def _rows(self, table: Any) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            async with self.engine.connect() as conn:
                return [dict(r) for r in (await conn.execute(select(table))).mappings()]

        return self.run(read())

    @invariant()
    def never_twice_per_key_nor_past_the_charge(self) -> None:
        refunds = [e for e in self.gateway.effects if e["type"] in ("refund", "reversal")]
        keys = Counter(e["idempotency_key"] for e in refunds)
        assert all(n == 1 for n in keys.values()), keys
        per_charge: Counter[str] = Counter()
        for e in refunds:
            per_charge[e["gateway_charge_id"]] += Decimal(e["amount"])
        for charge_id, amount in self.captured.items():
            assert per_charge[charge_id.replace("ch-", "gw-")] <= amount
        assert self.gateway.refused_for_amount == 0, "the gateway had to refuse what our guard allowed"

    @invariant()
    def the_guard_matches_its_records_and_the_gateway(self) -> None:
        charges = {c["charge_id"]: c for c in self._rows(orm.charges)}
        refunds = self._rows(orm.refunds)
        at_gateway = {e["idempotency_key"]: Decimal(e["amount"]) for e in self.gateway.effects
                      if e["type"] in ("refund", "reversal")}
        for charge_id, charge in charges.items():
            held = sum((Decimal(r["amount"]) for r in refunds
                        if r["charge_id"] == charge_id and r["status"] in ("pending", "succeeded")), Decimal(0))
            assert Decimal(charge["refunded_amount"]) == held
            assert Decimal(charge["refunded_amount"]) <= Decimal(charge["amount"])
        for r in refunds:
            if r["status"] == "succeeded":
                assert at_gateway.get(r["idempotency_key"]) == Decimal(r["amount"])
            if r["status"] == "failed":
                assert r["idempotency_key"] not in at_gateway


RefundGuardMachine.TestCase.settings = PROFILE
TestRefundGuard = RefundGuardMachine.TestCase


@pytest.mark.pg
def test_the_refund_guard_on_postgresql(pg_server) -> None:  # type: ignore[no-untyped-def]
    class OnPostgreSQL(RefundGuardMachine):
        database_url = pg_database_url(pg_server, "refund_guard")

    run_state_machine_as_test(OnPostgreSQL, settings=PROFILE)


def test_proration_of_a_full_cancellation_refunds_the_unused_part_of_what_was_captured() -> None:
    terms = ChargeTerms(Decimal("30.00"), 1, (PERIOD_END - PERIOD_START).days)
    assert fair_share(terms, EarlierRefunds(), removed=1, unused=10).amount == Decimal("10.00")
