"""Cancellations whose refund waits for the charges that paid for their period (facts first, README).

After a restart or with a backlog, a `PlatformCommitted` can come before the `ChargeCaptured` facts
published ahead of it; decided then, its refund would be `not_due`. It waits here instead, durably, and
`PaymentHandlers.settle_waiting` decides it once the charges come, the facts are read up to it, or the
bound has passed. A subscription's refunds are decided in the order they came: one behind a waiting
refund waits too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select

from cancelflow.events import PlatformCommitted, utcnow
from cancelflow.sql import Db, Query
from payment_gateway import orm

# What a transaction that starts a wait, or records a charge while some wait, says it wrote (wakes the waiter).
AWAITING_FACTS = "awaiting_facts"

_waits = orm.refund_waits
WAIT = Query(select(_waits).where(_waits.c.request_id == bindparam("request_id")))
ADD_WAIT = Query(insert(_waits))
DROP_WAIT = Query(delete(_waits).where(_waits.c.request_id == bindparam("request_id")))
ANY_WAIT = Query(select(_waits.c.request_id).limit(1))
OLDEST_OF = Query(select(_waits.c.request_id).where(_waits.c.subscription_id == bindparam("subscription_id"))
                  .order_by(_waits.c.created_at, _waits.c.request_id).limit(1))
ALL_WAITING = Query(select(_waits.c.request_id).order_by(_waits.c.created_at, _waits.c.request_id).limit(500))


class RefundWaits:
    def __init__(self, db: Db) -> None:
        self.db = db

    async def add(self, event: PlatformCommitted, occurred_at: datetime) -> None:
        await self.db.run(ADD_WAIT, request_id=str(event.request_id), subscription_id=event.subscription_id,
                          event=event.model_dump(mode="json"), occurred_at=occurred_at, created_at=utcnow())

    async def get(self, request_id: str) -> dict[str, Any] | None:
        return await self.db.first(WAIT, request_id=request_id)

    async def drop(self, request_id: str) -> None:
        await self.db.run(DROP_WAIT, request_id=request_id)

    async def any(self) -> bool:
        return await self.db.first(ANY_WAIT) is not None

    async def oldest(self, subscription_id: str) -> str | None:
        """The subscription's refund that has waited longest (decided before any later one)."""
        row = await self.db.first(OLDEST_OF, subscription_id=subscription_id)
        return None if row is None else row["request_id"]

    async def waiting(self) -> list[str]:
        """Every waiting refund's request, oldest first."""
        return [row["request_id"] for row in await self.db.all(ALL_WAITING)]
