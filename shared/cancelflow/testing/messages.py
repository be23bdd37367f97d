"""Handing records to handlers as the consume loop does, without a broker: for handler-level tests."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from types import ModuleType

from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import transactions
from cancelflow.events import Payload, envelope_for
from cancelflow.messaging.codec import Message, decode, encode
from cancelflow.messaging.rounds import Chain, Step, run_in_rounds
from cancelflow.messaging.uow import UnitOfWork

Handler = Callable[[Message, UnitOfWork], Awaitable[None]]


def message(payload: Payload, *, correlation_id: str | None = None) -> Message:
    """A record as the consume loop would hand it over (encoded and decoded on the payload's topic)."""
    correlation = correlation_id or str(getattr(payload, "request_id", "") or payload.record_key())
    envelope = envelope_for(payload, producer="upstream", correlation_id=correlation, causation_id=None)
    return decode(encode(envelope), topic=payload.topic, key=payload.record_key().encode())


async def handle(engine: AsyncEngine, orm: ModuleType, handler: Handler, msg: Message, *,
                 on_commit: Callable[[frozenset[str]], None] | None = None) -> bool:
    """What the consume loop does: skip a processed event id, else handle and commit. True when handled.
    `on_commit` hears what the commit wrote, as the service's wake-ups do."""
    async with UnitOfWork(transactions(engine), orm.messaging, producer="test", message=msg,
                          on_commit=on_commit) as uow:
        if await uow.already_processed(msg.event_id):
            return False
        await handler(msg, uow)
        await uow.commit()
    return True


async def handle_in_rounds(engine: AsyncEngine, orm: ModuleType, handler: Handler, msg: Message) -> bool:
    """What the consume loop does on a route handled in rounds (messaging/rounds.py), for one record:
    True when handled; the handler's exception is raised, as `handle` does."""
    chain = Chain([Step(0, msg, handler)])
    async with UnitOfWork(transactions(engine), orm.messaging, producer="test") as uow:
        seen = await uow.processed_among([msg.event_id])
        if seen:
            return False
        await run_in_rounds(uow, [chain], seen, lambda _: contextlib.nullcontext())
    if chain.error is not None:
        raise chain.error
    return True
