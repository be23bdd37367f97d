"""Billing's handlers: each loads a cancellation, calls one of its transitions, saves it and emits the
events it recorded, in one unit of work (state, outbox and inbox commit together)."""

from __future__ import annotations

from collections.abc import Callable

from billing import domain
from billing.cancellation import Cancellation, State, Subscription
from billing.cancellation import received as _received  # noqa: F401  (its size is tested under this name)
from billing.clock import Clock
from billing.repository import BillingRepository
from cancelflow.events import (
    CancellationApproved,
    CancellationDeclined,
    CancellationRequested,
    RequestStuck,
    SubscriptionActivated,
    VendorCancellationFailed,
    VendorProvisioned,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import HandlerContext
from cancelflow.messaging.facts import FACTS_WAIT_S, FactsProgress
from cancelflow.sql import Savepoint

log = get_logger(__name__)

# What a request waiting for its subscription's facts wakes once committed (`settle_waiting`).
AWAITING_FACTS = State.AWAITING_FACTS

# The platform commit after the vendor canceled: undone as a whole when it fails (scenario 3).
PLATFORM_COMMIT = Savepoint("platform_commit")


class BillingHandlers:
    def __init__(self, clock: Clock, facts: FactsProgress | None = None, *,
                 facts_wait_s: float = FACTS_WAIT_S) -> None:
        self.clock = clock
        self.facts = facts or FactsProgress()
        self.facts_wait_s = facts_wait_s
        self.on_scheduled: Callable[[], None] = lambda: None

    async def subscription_activated(self, msg: Message[SubscriptionActivated], uow: HandlerContext) -> None:
        facts = msg.payload
        repo = BillingRepository(uow.db)
        existing = await repo.subscription(facts.subscription_id)
        if existing is not None and msg.envelope.occurred_at < existing["updated_at"]:
            # Facts from before our last change of the subscription (a cancellation committed since,
            # a lock taken): applying them would undo what happened after them.
            log.info("subscription facts older than our last change of it: not applied",
                     subscription_id=facts.subscription_id, occurred_at=msg.envelope.occurred_at.isoformat())
            return
        if facts.auto_renew and existing is not None and (
                existing["status"] == domain.CANCELED or await repo.ends_at_term(facts.subscription_id)):
            # An upstream refresh does not undo a cancellation, done or scheduled for the end of the
            # term: auto-renew stays off, and no renewal comes back (the gateway's schedule stays stopped).
            facts = facts.model_copy(update={"auto_renew": False})
        kept = await repo.kept_quantity(facts.subscription_id, facts.current_period_start)
        if kept is not None and facts.quantity > kept:
            # Licenses our own cancellation removed stay removed, however upstream counts them, as a
            # canceled subscription stays canceled (a refresh with the old quantity would refund them again).
            facts = facts.model_copy(update={"quantity": kept})
        await repo.upsert_subscription(facts, provisioning_status=domain.SYNCHRONIZED, existing=existing)
        await repo.schedule_renewal(facts)
        for request_id in await repo.awaiting_facts(facts.subscription_id):  # in the order they came
            await self.settle_waiting(uow, request_id)

    # --- intake ------------------------------------------------------------------------------

    async def cancellation_requested(self, msg: Message[CancellationRequested], uow: HandlerContext) -> None:
        request = msg.payload
        repo = BillingRepository(uow.db)
        if await repo.seen(str(request.request_id)):
            log.info("request_id seen before: no new effect", request_id=str(request.request_id))
            return
        cancellation = Cancellation.receive(request)
        if request.target == "charges":
            cancellation.route_to_dispute()
            await _save(uow, repo, cancellation)
            return
        subscription = await repo.load_subscription(request.subscription_id or "")
        if subscription is None and not self.facts.read_up_to(msg.envelope.occurred_at):
            # The subscription's facts may be behind us in a backlog (billing restarted): the request waits
            # for them, within a bound (`settle_waiting`), rather than being rejected as unknown now.
            cancellation.await_facts()
            await _save(uow, repo, cancellation)
            log.info("subscription unknown while its facts are not read up to the request: waiting",
                     request_id=cancellation.request_id, subscription_id=request.subscription_id)
            uow.wrote(AWAITING_FACTS)  # wakes the waiter once committed
            return
        await self._intake(uow, repo, cancellation, subscription)

    async def _intake(self, uow: HandlerContext, repo: BillingRepository, cancellation: Cancellation,
                      subscription: Subscription | None) -> None:
        """Validate the request and reject it, park it for approval or set it on its way."""
        request = cancellation.request
        assert request is not None
        verdict = await self._validate(repo, request, subscription)
        cancellation.take_in(verdict, subscription, today=self.clock.today(),
                             retried=await self._retried(repo, request))
        if cancellation.state is State.PENDING_APPROVAL:
            parked = await repo.take_parked_decision(cancellation.request_id)
            if parked is not None:
                await self._decide(uow, repo, cancellation, **parked)
                return
        await self._saved(uow, repo, cancellation)

    async def settle_waiting(self, uow: HandlerContext, request_id: str) -> bool:
        """A request waiting for its subscription's facts: taken in when they have arrived; rejected as
        unknown once the facts are read up to when it arrived, or after `facts_wait_s` whatever they say.
        False while it still waits (or waits no more)."""
        repo = BillingRepository(uow.db)
        cancellation = await repo.load(request_id)
        if cancellation is None or cancellation.state is not State.AWAITING_FACTS:
            return False
        assert cancellation.created_at is not None
        arrived = cancellation.created_at
        if cancellation.subscription is None and not self.facts.handled_up_to(arrived) and (
                utcnow() - arrived).total_seconds() < self.facts_wait_s:
            return False
        if cancellation.subscription is None:
            log.info("subscription still unknown after waiting for its facts", request_id=request_id,
                     waited_s=round((utcnow() - arrived).total_seconds(), 1))
        await self._intake(uow, repo, cancellation, cancellation.subscription)
        return True

    async def _validate(self, repo: BillingRepository, request: CancellationRequested,
                        subscription: Subscription | None) -> domain.Rejection | domain.Plan:
        other_in_flight = False
        if subscription is not None and subscription.account_id == request.account_id:
            other_in_flight = await repo.in_flight(subscription.subscription_id, exclude=str(request.request_id))
        return domain.validate(request, subscription.facts() if subscription else None, self.clock.today(),
                               other_in_flight=other_in_flight)

    @staticmethod
    async def _retried(repo: BillingRepository, request: CancellationRequested) -> Cancellation | None:
        """The earlier request an operator's retry names (its vendor step may have gone through)."""
        if request.retry_of is None:
            return None
        return await repo.load(str(request.retry_of), with_subscription=False)

    # --- operator decisions ------------------------------------------------------------------

    async def cancellation_approved(self, msg: Message[CancellationApproved], uow: HandlerContext) -> None:
        decision = msg.payload
        await self._on_decision(uow, str(decision.request_id), "approved", decision.decided_by, decision.note)

    async def cancellation_declined(self, msg: Message[CancellationDeclined], uow: HandlerContext) -> None:
        decision = msg.payload
        await self._on_decision(uow, str(decision.request_id), "declined", decision.decided_by, decision.note)

    async def _on_decision(self, uow: HandlerContext, request_id: str, decision: str, decided_by: str,
                           note: str) -> None:
        repo = BillingRepository(uow.db)
        cancellation = await repo.load(request_id)
        if cancellation is None or cancellation.state is State.AWAITING_FACTS:
            # Decisions travel on other partitions than their request: keep it until the request is taken in.
            await repo.park_decision(request_id, decision=decision, decided_by=decided_by, note=note)
            return
        if cancellation.state is not State.PENDING_APPROVAL:
            log.warning("decision for a request that is not pending approval: ignored",
                        request_id=request_id, state=cancellation.state.value, decision=decision)
            return
        await self._decide(uow, repo, cancellation, decision=decision, decided_by=decided_by, note=note)

    async def _decide(self, uow: HandlerContext, repo: BillingRepository, cancellation: Cancellation, *,
                      decision: str, decided_by: str, note: str) -> None:
        if decision == "declined":
            cancellation.decline(decided_by, note)
        else:
            # Approved: the world may have moved on while the request waited, so validate again.
            request = cancellation.request
            assert request is not None
            verdict = await self._validate(repo, request, cancellation.subscription)
            cancellation.approve(decided_by, verdict, cancellation.subscription, today=self.clock.today(),
                                 retried=await self._retried(repo, request))
        await self._saved(uow, repo, cancellation)

    async def _saved(self, uow: HandlerContext, repo: BillingRepository, cancellation: Cancellation) -> None:
        await _save(uow, repo, cancellation)
        if cancellation.state is State.SCHEDULED:
            self.on_scheduled()

    # --- scheduling and the vendor step ---------------------------------------------------------

    async def start_scheduled(self, uow: HandlerContext, request_id: str) -> bool:
        """Called by the scheduler when a scheduled cancellation's period has ended."""
        repo = BillingRepository(uow.db)
        cancellation = await repo.load(request_id)
        if cancellation is None or cancellation.state is not State.SCHEDULED:
            return False
        if cancellation.subscription is None or cancellation.subscription.locked:
            return False  # something else holds the lock: next round
        request = cancellation.request
        cancellation.lock(retried=await self._retried(repo, request) if request else None)
        await _save(uow, repo, cancellation)
        return True

    async def request_stuck(self, msg: Message[RequestStuck], uow: HandlerContext) -> None:
        """The status tracker set the request aside (no progress for too long). Its lock must not outlive
        it: were the subscription left `In Progress`, every later request for it would be rejected and
        support could do nothing. Billing unlocks it (statuses back to what they were) and says in the
        history that the vendor may have canceled and that canceling again is safe (the vendor counts
        "already canceled" as success)."""
        event = msg.payload
        await self.release_lock(uow, str(event.request_id), why=f"set aside as stuck at the {event.stage} step")

    async def release_lock(self, uow: HandlerContext, request_id: str, *, why: str) -> bool:
        """Unlock the subscription of a request that waits for the vendor's answer no more (its status
        set aside, or a lock left overdue: `locks.OverdueLocks`); False when it holds no lock."""
        repo = BillingRepository(uow.db)
        cancellation = await repo.load(request_id)
        if cancellation is None or cancellation.state is not State.AWAITING_VENDOR:
            return False  # not holding the lock: nothing of billing's to release
        cancellation.release()
        await _save(uow, repo, cancellation)
        log.warning("lock released: the request waits for the vendor no more", request_id=request_id,
                    subscription_id=cancellation.subscription_id, why=why)
        return True

    async def vendor_provisioned(self, msg: Message[VendorProvisioned], uow: HandlerContext) -> None:
        event = msg.payload
        repo = BillingRepository(uow.db)
        cancellation = await repo.load(str(event.request_id))
        if cancellation is None or cancellation.state not in (State.AWAITING_VENDOR, State.RELEASED_STUCK):
            return
        subscription = cancellation.subscription
        assert subscription is not None
        if cancellation.changed_since_released:
            cancellation.note_late_vendor()
            await _save(uow, repo, cancellation)
            return
        # Disarmed outside the savepoint, so the injected fault fires once and stays spent.
        fault = await repo.take_fault(subscription.subscription_id, "commit")
        committed = cancellation.copy()  # the one to revert stays as loaded, should the commit fail
        try:
            async with uow.db.savepoint(PLATFORM_COMMIT):
                committed.commit()
                await repo.save(committed)
                if fault:  # after the writes, so the savepoint really has something to undo
                    raise domain.PlatformCommitError("injected platform fault at stage 'commit'")
        except Exception as exc:  # scenario 3: the vendor canceled, our platform did not
            log.error("platform commit failed after vendor success", error=repr(exc))
            cancellation.revert_platform(exc)
            await _save(uow, repo, cancellation)
            return
        _emit(uow, committed)

    async def vendor_failed(self, msg: Message[VendorCancellationFailed], uow: HandlerContext) -> None:
        event = msg.payload
        repo = BillingRepository(uow.db)
        cancellation = await repo.load(str(event.request_id))
        if cancellation is None or cancellation.state is not State.AWAITING_VENDOR:
            return
        cancellation.revert_vendor(event)
        await _save(uow, repo, cancellation)


async def _save(uow: HandlerContext, repo: BillingRepository, cancellation: Cancellation) -> None:
    """Store the cancellation's changes and emit the events its transitions recorded, in one transaction."""
    await repo.save(cancellation)
    _emit(uow, cancellation)


def _emit(uow: HandlerContext, cancellation: Cancellation) -> None:
    for event in cancellation.events:
        uow.emit(event)
    cancellation.events.clear()
