"""Handing records to handlers through the consume loop's own inbox paths (`ConsumeLoop.handle_once`,
`handle_batch`, `handle_in_rounds`), without a broker: for handler-level tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType

from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import transactions
from cancelflow.events import Payload, envelope_for
from cancelflow.messaging.codec import Message, decode, encode
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.rounds import Chain, Step
from cancelflow.messaging.uow import UnitOfWork

Handler = Callable[[Message, UnitOfWork], Awaitable[None]]


def message(payload: Payload, *, correlation_id: str | None = None) -> Message:
    """A record as the consume loop would hand it over (encoded and decoded on the payload's topic)."""
    correlation = correlation_id or str(getattr(payload, "request_id", "") or payload.record_key())
    envelope = envelope_for(payload, producer="upstream", correlation_id=correlation, causation_id=None)
    return decode(encode(envelope), topic=payload.topic, key=payload.record_key().encode())


def consume_loop(engine: AsyncEngine, orm: ModuleType, *,
                 on_commit: Callable[[frozenset[str]], None] | None = None) -> ConsumeLoop:
    """A consume loop on the service's database, without a consumer: its inbox paths, called directly."""
    def new_uow(msg: Message | None) -> UnitOfWork:
        return UnitOfWork(transactions(engine), orm.messaging, producer="test", message=msg, on_commit=on_commit)

    return ConsumeLoop(None, [], new_uow, service="test", group_id="test")  # type: ignore[arg-type]


async def handle(engine: AsyncEngine, orm: ModuleType, handler: Handler, msg: Message, *,
                 on_commit: Callable[[frozenset[str]], None] | None = None) -> bool:
    """A record handled one by one, as the consume loop does; True when handled, False when the inbox
    dropped it. `on_commit` hears what the commit wrote, as the service's wake-ups do."""
    return await consume_loop(engine, orm, on_commit=on_commit).handle_once(msg, handler)


async def handle_batch(engine: AsyncEngine, orm: ModuleType, work: list[tuple[Message, Handler]]) -> set[str]:
    """Records of a batch route handled in one transaction; the event ids dropped as already processed."""
    return await consume_loop(engine, orm).handle_batch(work)


async def handle_in_rounds(engine: AsyncEngine, orm: ModuleType, handler: Handler, msg: Message) -> bool:
    """One record of a route handled in rounds (messaging/rounds.py): True when handled; the handler's
    exception is raised, as `handle` does."""
    chain = Chain([Step(0, msg, handler)])
    skipped = await consume_loop(engine, orm).handle_in_rounds([chain])
    if chain.error is not None:
        raise chain.error
    return msg.event_id not in skipped
