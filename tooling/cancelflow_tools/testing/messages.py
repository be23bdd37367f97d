"""Handing records to handlers through the consume loop's own inbox paths (`ConsumeLoop.handle_once`,
`handle_batch`, `handle_in_rounds`), without a broker: for handler-level tests. The loop dispatches by the
service's own routes (each bootstrap's `routes(...)`); a test of one handler may pass just the handler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import transactions
from cancelflow.events import Payload, envelope_for
from cancelflow.messaging.codec import Message, decode, encode
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.dispatch import Handler, Route
from cancelflow.messaging.rounds import Chain, Step
from cancelflow.messaging.uow import UnitOfWork

P = TypeVar("P", bound=Payload)

# The service's routes, one of them, or a single handler (routed by the message's own event class).
Routes = Sequence[Route] | Route | Handler


def message(payload: P, *, correlation_id: str | None = None) -> Message[P]:
    """A record as the consume loop would hand it over (encoded and decoded on the payload's topic)."""
    correlation = correlation_id or str(getattr(payload, "request_id", "") or payload.record_key())
    envelope = envelope_for(payload, producer="upstream", correlation_id=correlation, causation_id=None)
    return cast(Message[P], decode(encode(envelope), topic=payload.topic, key=payload.record_key().encode()))


def _routes(routes: Routes, msg: Message[Payload]) -> list[Route]:
    if isinstance(routes, Route):
        return [routes]
    if callable(routes):
        return [Route(msg.topic).on(type(msg.payload), routes)]
    return list(routes)


def consume_loop(engine: AsyncEngine, orm: ModuleType, routes: Sequence[Route] = (), *,
                 on_commit: Callable[[frozenset[str]], None] | None = None) -> ConsumeLoop:
    """A consume loop on the service's database, without a consumer: its inbox paths, called directly."""
    def new_uow(msg: Message[Payload] | None) -> UnitOfWork:
        return UnitOfWork(transactions(engine), orm.messaging, producer="test", message=msg, on_commit=on_commit)

    return ConsumeLoop(None, list(routes), new_uow, service="test", group_id="test")


async def handle(engine: AsyncEngine, orm: ModuleType, routes: Routes, msg: Message[Payload], *,
                 on_commit: Callable[[frozenset[str]], None] | None = None) -> bool:
    """A record handled one by one, as the consume loop does; True when handled, False when the inbox
    dropped it. `on_commit` hears what the commit wrote, as the service's wake-ups do."""
    return await consume_loop(engine, orm, _routes(routes, msg), on_commit=on_commit).handle_once(msg)


async def handle_batch(engine: AsyncEngine, orm: ModuleType, routes: Routes,
                       messages: list[Message[Payload]]) -> set[str]:
    """Records of a batch route handled in one transaction; the event ids dropped as already processed."""
    return await consume_loop(engine, orm, _routes(routes, messages[0])).handle_batch(messages)


async def handle_in_rounds(engine: AsyncEngine, orm: ModuleType, routes: Routes, msg: Message[Payload], *,
                           on_commit: Callable[[frozenset[str]], None] | None = None) -> bool:
    """One record of a route handled in rounds (messaging/rounds.py): True when handled; the handler's
    exception is raised, as `handle` does."""
    found = _routes(routes, msg)
    route = next(r for r in found if r.topic == msg.topic)
    chain = Chain([Step(0, msg, route)])
    skipped = await consume_loop(engine, orm, found, on_commit=on_commit).handle_in_rounds([chain])
    if chain.error is not None:
        raise chain.error
    return msg.event_id not in skipped
