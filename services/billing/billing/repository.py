"""Billing's reads and writes, so handlers speak in subscriptions and cancellations, not SQL."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select, update

from billing import orm
from billing.cancellation import HOLDS_LOCK, Cancellation, State, Subscription
from billing.domain import CANCELED, IN_PROGRESS, Plan
from cancelflow.events import CancellationRequested, Mode, SubscriptionActivated, utcnow
from cancelflow.sql import Db, Query

_subscriptions, _history, _billings = orm.subscriptions, orm.history, orm.scheduled_billings
_cancellations, _parked, _faults = orm.cancellations, orm.parked_decisions, orm.armed_faults

# Billing's statements, built once (cancelflow.sql). An UPDATE's keyword parameters are its SET columns.
SUBSCRIPTION = Query(select(_subscriptions).where(
    _subscriptions.c.subscription_id == bindparam("subscription_id")))
ADD_SUBSCRIPTION = Query(insert(_subscriptions))
SET_SUBSCRIPTION = Query(update(_subscriptions).where(
    _subscriptions.c.subscription_id == bindparam("match_subscription_id")))

ADD_HISTORY = Query(insert(_history))
HISTORY = Query(select(_history).where(_history.c.subscription_id == bindparam("subscription_id"))
                .order_by(_history.c.id))

_SCHEDULED_FOR = (_billings.c.subscription_id == bindparam("match_subscription_id")) & (
    _billings.c.status == "scheduled")
SUPERSEDE_RENEWALS = Query(update(_billings).where(_SCHEDULED_FOR).values(status="superseded"))
CANCEL_RENEWALS = Query(update(_billings).where(_SCHEDULED_FOR).values(status="canceled"))
REPRICE_RENEWALS = Query(update(_billings).where(_SCHEDULED_FOR))
ADD_RENEWAL = Query(insert(_billings))
BILLINGS = Query(select(_billings).where(_billings.c.subscription_id == bindparam("subscription_id"))
                 .order_by(_billings.c.bill_on, _billings.c.id))

CANCELLATION = Query(select(_cancellations).where(_cancellations.c.request_id == bindparam("request_id")))
# A cancellation and the subscription it is about, in one read (the subscription's columns prefixed `s_`).
CANCELLATION_AND_SUBSCRIPTION = Query(
    select(_cancellations, *(column.label(f"s_{column.name}") for column in _subscriptions.c))
    .select_from(_cancellations.outerjoin(
        _subscriptions, _cancellations.c.subscription_id == _subscriptions.c.subscription_id))
    .where(_cancellations.c.request_id == bindparam("request_id")))
CANCELLATION_ID = Query(select(_cancellations.c.request_id).where(
    _cancellations.c.request_id == bindparam("request_id")))
ADD_CANCELLATION = Query(insert(_cancellations))
SET_CANCELLATION = Query(update(_cancellations).where(
    _cancellations.c.request_id == bindparam("match_request_id")))
# The states that hold the subscription's lock, spelled out (an IN list would be expanding: not a Query).
IN_FLIGHT = Query(select(_cancellations.c.request_id).where(
    (_cancellations.c.subscription_id == bindparam("subscription_id"))
    & (_cancellations.c.request_id != bindparam("exclude"))
    & or_(*(_cancellations.c.state == state.value for state in HOLDS_LOCK))).limit(1))
# A full end-of-term cancellation waiting for its date: the subscription does not renew.
ENDING_AT_TERM = Query(select(_cancellations.c.request_id).where(
    (_cancellations.c.subscription_id == bindparam("subscription_id")) & (_cancellations.c.state == State.SCHEDULED.value)
    & (_cancellations.c.new_quantity == 0)).limit(1))

# The fewest licenses a partial cancellation of ours left, effective in the given period or later.
KEPT_QUANTITY = Query(select(func.min(_cancellations.c.new_quantity).label("kept")).where(
    (_cancellations.c.subscription_id == bindparam("subscription_id")) & (_cancellations.c.state == State.COMMITTED.value)
    & (_cancellations.c.new_quantity > 0) & (_cancellations.c.effective_date >= bindparam("period_start"))))
# Locks taken before `before` whose vendor answer never came (locks.OverdueLocks).
OVERDUE_LOCKS = Query(select(_cancellations.c.request_id).where(
    (_cancellations.c.state == State.AWAITING_VENDOR.value) & (_cancellations.c.updated_at <= bindparam("before")))
    .order_by(_cancellations.c.updated_at).limit(200))

# Requests waiting for their subscription's facts, oldest first.
AWAITING = Query(select(_cancellations.c.request_id).where(
    (_cancellations.c.subscription_id == bindparam("subscription_id"))
    & (_cancellations.c.state == State.AWAITING_FACTS.value)).order_by(_cancellations.c.created_at))
ALL_AWAITING = Query(select(_cancellations.c.request_id).where(_cancellations.c.state == State.AWAITING_FACTS.value)
                     .order_by(_cancellations.c.created_at).limit(500))

PARKED_ID = Query(select(_parked.c.request_id).where(_parked.c.request_id == bindparam("request_id")))
PARKED = Query(select(_parked).where(_parked.c.request_id == bindparam("request_id")))
ADD_PARKED = Query(insert(_parked))
DROP_PARKED = Query(delete(_parked).where(_parked.c.request_id == bindparam("request_id")))

TAKE_FAULT = Query(delete(_faults).where(
    (_faults.c.subscription_id == bindparam("subscription_id")) & (_faults.c.stage == bindparam("stage"))))
DROP_FAULTS = Query(delete(_faults).where(_faults.c.subscription_id == bindparam("subscription_id")))
ADD_FAULT = Query(insert(_faults))


class BillingRepository:
    def __init__(self, db: Db) -> None:
        self.db = db

    async def subscription(self, subscription_id: str) -> dict[str, Any] | None:
        return await self.db.first(SUBSCRIPTION, subscription_id=subscription_id)

    async def upsert_subscription(self, facts: SubscriptionActivated, *, provisioning_status: str,
                                  existing: dict[str, Any] | None) -> None:
        """The upstream platform's facts, as far as our own state lets them in (`existing`: the row now)."""
        values = dict(
            account_id=facts.account_id, product_name=facts.product_name, vendor=facts.vendor,
            vendor_subscription_id=facts.vendor_subscription_id, billing_period=facts.billing_period,
            unit_price=facts.unit_price, currency=facts.currency, quantity=facts.quantity,
            status=facts.status, trial=facts.status == "trial", current_period_start=facts.current_period_start,
            current_period_end=facts.current_period_end, auto_renew=facts.auto_renew, updated_at=utcnow(),
        )
        if existing is None:
            await self.db.run(ADD_SUBSCRIPTION, subscription_id=facts.subscription_id,
                              provisioning_status=provisioning_status, effective_date=None,
                              period_quantity=facts.quantity, **values)
        else:
            if existing["period_quantity"] is None or facts.current_period_start != existing["current_period_start"]:
                values["period_quantity"] = values["quantity"]
            if existing["status"] == CANCELED:
                # Canceled here, vendor first: a refresh of the upstream platform does not bring it back
                # (a second cancellation would have refunded again), nor its renewal.
                values.pop("status")
                values.pop("trial")
                values["auto_renew"] = False
            elif existing["provisioning_status"] == IN_PROGRESS:
                # A cancellation holds the lock: no billing change proceeds (CONTRACT.md section 5). Its
                # status and its quantity stay what the vendor was asked to change (the refund's
                # share is counted from that quantity).
                values.pop("status")
                values.pop("trial")
                values.pop("quantity")
            await self.db.run(SET_SUBSCRIPTION, match_subscription_id=facts.subscription_id, **values)

    async def kept_quantity(self, subscription_id: str, period_start: date) -> int | None:
        """The licenses a partial cancellation of ours left, effective in the period beginning
        `period_start` or later (the fewest, when several); None when there is none."""
        kept: int | None = await self.db.scalar(KEPT_QUANTITY, subscription_id=subscription_id,
                                                period_start=period_start)
        return kept

    async def update_subscription(self, subscription_id: str, **values: Any) -> None:
        await self.db.run(SET_SUBSCRIPTION, match_subscription_id=subscription_id, updated_at=utcnow(), **values)

    async def add_history(self, subscription_id: str, request_id: str | None, message: str) -> None:
        await self.db.run(ADD_HISTORY, subscription_id=subscription_id, request_id=request_id, at=utcnow(),
                          message=message)

    async def history(self, subscription_id: str) -> list[dict[str, Any]]:
        return await self.db.all(HISTORY, subscription_id=subscription_id)

    async def billings(self, subscription_id: str) -> list[dict[str, Any]]:
        """Every billing of the subscription, scheduled or not (read view: the support runbook's step 8)."""
        return await self.db.all(BILLINGS, subscription_id=subscription_id)

    async def schedule_renewal(self, facts: SubscriptionActivated) -> None:
        await self.db.run(SUPERSEDE_RENEWALS, match_subscription_id=facts.subscription_id)
        if facts.auto_renew:
            await self.db.run(ADD_RENEWAL, subscription_id=facts.subscription_id, bill_on=facts.current_period_end,
                              amount=facts.unit_price * facts.quantity, currency=facts.currency,
                              status="scheduled")

    async def cancel_scheduled_billings(self, subscription_id: str) -> int:
        return await self.db.run(CANCEL_RENEWALS, match_subscription_id=subscription_id)

    async def reprice_scheduled_billings(self, subscription_id: str, amount: Decimal) -> int:
        """A partial cancellation: the next renewal bills only the licenses that are left."""
        return await self.db.run(REPRICE_RENEWALS, match_subscription_id=subscription_id, amount=amount)

    async def load_subscription(self, subscription_id: str) -> Subscription | None:
        row = await self.subscription(subscription_id)
        return None if row is None else _subscription(row)

    async def load(self, request_id: str, *, with_subscription: bool = True) -> Cancellation | None:
        """The cancellation of `request_id` and (unless told not to) the subscription it is about."""
        row = await self.db.first(CANCELLATION_AND_SUBSCRIPTION if with_subscription else CANCELLATION,
                                  request_id=request_id)
        if row is None:
            return None
        cancellation = _cancellation(row)
        if with_subscription and row["s_subscription_id"] is not None:
            cancellation.subscription = _subscription(row, prefix="s_")
        return cancellation

    async def save(self, cancellation: Cancellation) -> None:
        """Store what the cancellation's transitions changed: its row, its subscription's columns and
        renewals, and its new history records (one timestamp, so the subscription is never newer)."""
        now = utcnow()
        if cancellation.is_new:
            await self.db.run(ADD_CANCELLATION, created_at=now, updated_at=now,
                              **_cancellation_columns(cancellation, _CANCELLATION_FIELDS))
            cancellation.created_at = now
        elif cancellation.changes:
            await self.db.run(SET_CANCELLATION, match_request_id=cancellation.request_id, updated_at=now,
                              **_cancellation_columns(cancellation, cancellation.changes))
        if cancellation.changes:
            cancellation.updated_at = now
            cancellation.changes.clear()
        subscription = cancellation.subscription
        if subscription is not None:
            await self._save_subscription(subscription, now)
        for message in cancellation.history:
            assert subscription is not None, "history is kept per subscription"
            await self.db.run(ADD_HISTORY, subscription_id=subscription.subscription_id,
                              request_id=cancellation.request_id, at=now, message=message)
        cancellation.history.clear()

    async def _save_subscription(self, subscription: Subscription, now: datetime) -> None:
        if subscription.changes:
            await self.db.run(SET_SUBSCRIPTION, match_subscription_id=subscription.subscription_id,
                              updated_at=now, **subscription.changes)
            subscription.updated_at = now
            subscription.changes.clear()
        if subscription.renewals_canceled:
            await self.cancel_scheduled_billings(subscription.subscription_id)
            subscription.renewals_canceled = False
        if subscription.renewals_repriced is not None:
            await self.reprice_scheduled_billings(subscription.subscription_id, subscription.renewals_repriced)
            subscription.renewals_repriced = None

    async def seen(self, request_id: str) -> bool:
        """A cancellation exists for `request_id` (its request was taken in before)."""
        return await self.db.first(CANCELLATION_ID, request_id=request_id) is not None

    async def in_flight(self, subscription_id: str, *, exclude: str) -> bool:
        """Another request for the subscription is scheduled or at the vendor (it holds the lock)."""
        return await self.db.first(IN_FLIGHT, subscription_id=subscription_id, exclude=exclude) is not None

    async def ends_at_term(self, subscription_id: str) -> bool:
        """A full end-of-term cancellation of the subscription is scheduled (auto-renew stopped for it)."""
        return await self.db.first(ENDING_AT_TERM, subscription_id=subscription_id) is not None

    async def overdue_locks(self, before: datetime) -> list[str]:
        return [row["request_id"] for row in await self.db.all(OVERDUE_LOCKS, before=before)]

    async def awaiting_facts(self, subscription_id: str | None = None) -> list[str]:
        """Requests waiting for the facts of `subscription_id` (None: of any subscription), oldest first."""
        if subscription_id is None:
            return [row["request_id"] for row in await self.db.all(ALL_AWAITING)]
        return [row["request_id"] for row in await self.db.all(AWAITING, subscription_id=subscription_id)]

    async def park_decision(self, request_id: str, *, decision: str, decided_by: str, note: str) -> None:
        if await self.db.first(PARKED_ID, request_id=request_id) is not None:
            return  # the first decision stands
        await self.db.run(ADD_PARKED, request_id=request_id, decision=decision, decided_by=decided_by,
                          note=note, at=utcnow())

    async def take_parked_decision(self, request_id: str) -> dict[str, str] | None:
        row = await self.db.first(PARKED, request_id=request_id)
        if row is None:
            return None
        await self.db.run(DROP_PARKED, request_id=request_id)
        return {"decision": row["decision"], "decided_by": row["decided_by"], "note": row["note"]}

    async def take_fault(self, subscription_id: str, stage: str) -> bool:
        """Disarm and report a fault armed for this subscription's next `stage`."""
        return bool(await self.db.run(TAKE_FAULT, subscription_id=subscription_id, stage=stage))

    async def arm_fault(self, subscription_id: str, stage: str) -> None:
        await self.db.run(DROP_FAULTS, subscription_id=subscription_id)
        await self.db.run(ADD_FAULT, subscription_id=subscription_id, stage=stage, armed_at=utcnow())


_CANCELLATION_FIELDS = frozenset({"subscription_id", "account_id", "mode", "state", "plan", "request", "decided_by",
                                  "prior_status", "prior_provisioning_status"})


def _cancellation_columns(cancellation: Cancellation, fields: set[str] | frozenset[str]) -> dict[str, Any]:
    """The stored columns of the cancellation's `fields` (a plan is four columns, a request JSON)."""
    columns: dict[str, Any] = {"request_id": cancellation.request_id} if cancellation.is_new else {}
    for name in fields:
        if name == "plan":
            plan = cancellation.plan
            columns.update(dict.fromkeys(("effective_date", "access_end_date", "new_quantity", "run_on")) if plan is None
                           else dict(effective_date=plan.effective_date, access_end_date=plan.access_end_date,
                                     new_quantity=plan.new_quantity, run_on=plan.run_on))
        elif name == "request":
            request = cancellation.request
            columns["request"] = None if request is None else request.model_dump(mode="json")
        elif name in ("mode", "state"):
            columns[name] = getattr(cancellation, name).value
        else:
            columns[name] = getattr(cancellation, name)
    return columns


def _cancellation(row: dict[str, Any]) -> Cancellation:
    plan = None if row["new_quantity"] is None else Plan(
        effective_date=row["effective_date"], access_end_date=row["access_end_date"],
        new_quantity=row["new_quantity"], run_on=row["run_on"])
    return Cancellation(
        request_id=row["request_id"], account_id=row["account_id"], mode=Mode(row["mode"]), state=State(row["state"]),
        subscription_id=row["subscription_id"],
        request=None if row["request"] is None else CancellationRequested.model_validate(row["request"]),
        plan=plan, decided_by=row["decided_by"], prior_status=row["prior_status"],
        prior_provisioning_status=row["prior_provisioning_status"], created_at=row["created_at"],
        updated_at=row["updated_at"])


def _subscription(row: dict[str, Any], *, prefix: str = "") -> Subscription:
    def column(name: str) -> Any:
        return row[prefix + name]

    return Subscription(
        subscription_id=column("subscription_id"), account_id=column("account_id"), vendor=column("vendor"),
        vendor_subscription_id=column("vendor_subscription_id"), unit_price=column("unit_price"),
        currency=column("currency"), quantity=column("quantity"), period_quantity=column("period_quantity"),
        status=column("status"), trial=column("trial"), provisioning_status=column("provisioning_status"),
        current_period_start=column("current_period_start"), current_period_end=column("current_period_end"),
        auto_renew=column("auto_renew"), effective_date=column("effective_date"),
        updated_at=column("updated_at"))

