"""The single writer of `cancellations.status`: one record per change, version + 1 each time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update

from cancelflow import metrics
from cancelflow.events import TERMINAL_STATES, CancellationStatusChanged, State, utcnow
from cancelflow.messaging.codec import Message
from cancelflow.messaging.uow import UnitOfWork
from status_tracker import fold, orm

views = orm.views


async def load_view(session: Any, request_id: str) -> dict[str, Any] | None:
    row = (await session.execute(select(views).where(views.c.request_id == request_id))).mappings().first()
    return dict(row) if row else None


class TrackerHandlers:
    async def saga_event(self, msg: Message, uow: UnitOfWork) -> None:
        request_id = str(msg.payload.request_id)  # type: ignore[attr-defined]
        row = await load_view(uow.session, request_id)
        current = row["view"] if row else fold.empty_view(request_id)
        new = fold.apply(current, msg.payload, msg.envelope.occurred_at)
        if new is None:
            return
        version = (row["version"] if row else 0) + 1
        now = utcnow()
        columns = dict(state=new["state"], account_id=new["account_id"], subscription_id=new["subscription_id"],
                       version=version, view=new, updated_at=now)
        if row is None:
            await uow.session.execute(insert(views).values(request_id=request_id, created_at=now, **columns))
        else:
            await uow.session.execute(update(views).where(views.c.request_id == request_id).values(**columns))
        uow.emit(CancellationStatusChanged.model_validate({**new, "version": version, "updated_at": now}))
        if new["state"] != current["state"] and new["state"] and State(new["state"]) in TERMINAL_STATES:
            error = new.get("error") or {}
            metrics.OUTCOMES.labels(new["state"], error.get("source", "")).inc()
