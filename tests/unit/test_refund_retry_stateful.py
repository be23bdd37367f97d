"""The refund guard under operators' refund retries (CONTRACT.md section 11), on top of every rule of
`test_refund_guard_stateful`: cancellations, redeliveries, concurrency and gateway faults, plus
operators retrying the refused refunds of any request, several times, by several retry requests at
once, each redelivered in any order.

Whatever happens, besides that machine's invariants (no key twice at the gateway, no charge past what
it captured, the guard's books matching the gateway's): a refused line is refunded at most once over
all its retries, never for more than was refused, and a retry only ever refunds a line that was
refused.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from decimal import Decimal

import test_refund_guard_stateful as guard
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, consumes, invariant, rule

from cancelflow.events import RefundRetryRequested
from cancelflow.messaging.codec import Message
from cancelflow.messaging.deadletter import TransientError
from cancelflow_tools.testing.messages import handle, message
from payment_gateway import orm
from payment_gateway.retries import RefundRetryHandlers


class RefundRetryMachine(guard.RefundGuardMachine):
    retries = Bundle("retries")

    def __init__(self) -> None:
        super().__init__()
        self.retry_handlers = RefundRetryHandlers(self.gateway)
        self.requests: list[str] = []  # every request id whose refunds an operator may retry
        self.retry_of: dict[str, str] = {}  # retry request id -> the request whose refusals it retries

    async def deliver(self, msg: Message) -> bool:
        if isinstance(msg.payload, RefundRetryRequested):
            try:
                await handle(self.engine, orm, self.retry_handlers.refund_retry_requested, msg)
            except TransientError:
                return False
            return True
        self.requests.append(str(msg.payload.request_id))  # type: ignore[attr-defined]
        return await super().deliver(msg)

    @rule(target=retries, pick=st.integers(0, 10_000), fault=st.sampled_from(guard.FAULTS),
          copies=st.integers(1, 3))
    def operator_retries_refund(self, pick: int, fault: str, copies: int) -> Message:
        """An operator retries the refused refunds of some request (a retry's own included); `copies`
        retry requests for the same one at once, as if two operators clicked together."""
        # Mostly a request with a refused refund (what an operator retries); sometimes any request.
        refused = sorted({r["request_id"] for r in self._rows(orm.refunds) if r["status"] == "failed"})
        candidates = refused if refused and pick % 4 else self.requests
        if not candidates:
            return self._retry(str(uuid.uuid4()))
        target = candidates[pick % len(candidates)]
        msgs = [self._retry(target) for _ in range(copies)]
        for msg in msgs:
            self._deliver_with(msg, fault)
        return msgs[0]

    @rule(target=retries, subscription=guard.RefundGuardMachine.charges, unused=st.integers(1, 30),
          copies=st.integers(1, 3), fault=st.sampled_from(guard.FAULTS))
    def refused_then_retried(self, subscription: str, unused: int, copies: int, fault: str) -> Message:
        """The case operators meet: a cancellation whose refund the gateway refused, then retried by
        `copies` retry requests at once (the first delivered with `fault`)."""
        refused = self._commit_message(subscription, unused, 1, 1)
        self.gateway.next_faults.append("refused")
        self.run(self.deliver(refused))
        msgs = [self._retry(str(refused.payload.request_id)) for _ in range(copies)]  # type: ignore[attr-defined]
        self.gateway.next_faults.append(fault)
        for msg in msgs:
            self.run(self.deliver(msg))
        return msgs[-1]

    def _retry(self, refused: str) -> Message:
        new_id = uuid.uuid4()
        self.retry_of[str(new_id)] = refused
        self.requests.append(str(new_id))
        return message(RefundRetryRequested(request_id=new_id, retry_of=uuid.UUID(refused), account_id=self.account,
                                            subscription_id="sub-0", operator="alice"))

    @rule(msg=retries, fault=st.sampled_from(guard.FAULTS))
    def redeliver_retry(self, msg: Message, fault: str) -> None:
        self._deliver_with(msg, fault)

    @rule(msg=consumes(retries))
    def retry_until_done(self, msg: Message) -> None:
        self._deliver_until_done(msg, "a retry")

    @invariant()
    def a_refused_line_is_refunded_at_most_once_over_its_retries(self) -> None:
        rows = {r["idempotency_key"]: r for r in self._rows(orm.refunds)}
        by_request: dict[str, list[dict]] = defaultdict(list)
        for r in rows.values():
            by_request[r["request_id"]].append(r)
        retried: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        for retry_id, refused_id in self.retry_of.items():
            for r in by_request.get(retry_id, []):
                refused = [o for o in by_request.get(refused_id, []) if o["charge_id"] == r["charge_id"]]
                assert refused and refused[0]["status"] == "failed", "a retry refunded a line that was not refused"
                assert Decimal(r["amount"]) <= Decimal(refused[0]["amount"])
                if r["status"] in ("pending", "succeeded"):
                    retried[(refused_id, r["charge_id"])] += Decimal(r["amount"])
                    assert retried[(refused_id, r["charge_id"])] <= Decimal(refused[0]["amount"])


RefundRetryMachine.TestCase.settings = guard.PROFILE
TestRefundRetry = RefundRetryMachine.TestCase
