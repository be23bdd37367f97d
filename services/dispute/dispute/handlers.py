"""Disputes of duplicate charges. Until automatic detection lands (the dispute issue), every
case goes to support for manual review, so no request is left without an outcome."""

from __future__ import annotations

from sqlalchemy import insert, select

from cancelflow.events import CancellationReceived, ChargeCaptured, Failed, Source, utcnow
from cancelflow.messaging.codec import Message
from cancelflow.messaging.uow import UnitOfWork
from dispute import orm


class DisputeHandlers:
    async def charge_captured(self, msg: Message, uow: UnitOfWork) -> None:
        charge: ChargeCaptured = msg.payload  # type: ignore[assignment]
        table = orm.charges
        if (await uow.session.execute(select(table.c.charge_id).where(table.c.charge_id == charge.charge_id))).first():
            return
        await uow.session.execute(insert(table).values(
            charge_id=charge.charge_id, account_id=charge.account_id, subscription_id=charge.subscription_id,
            gateway_charge_id=charge.gateway_charge_id, amount=charge.amount, currency=charge.currency,
            captured_at=charge.captured_at, period_start=charge.period_start, period_end=charge.period_end))

    async def cancellation_received(self, msg: Message, uow: UnitOfWork) -> None:
        request: CancellationReceived = msg.payload  # type: ignore[assignment]
        if request.target != "charges":
            return
        request_id = str(request.request_id)
        if (await uow.session.execute(select(orm.cases.c.request_id).where(
                orm.cases.c.request_id == request_id))).first():
            return
        note = "Duplicate-charge requests are reviewed by support."
        await uow.session.execute(insert(orm.cases).values(
            request_id=request_id, account_id=request.account_id, state="manual_review", note=note,
            created_at=utcnow()))
        uow.emit(Failed(request_id=request.request_id, source=Source.payment, code="manual_review",
                        message=note, details={"account_id": request.account_id,
                                               "charge_ids": request.charge_ids}))
