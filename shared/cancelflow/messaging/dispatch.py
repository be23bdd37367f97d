"""Routes keyed by event class, the context a handler runs in, and the one `dispatch` every path calls.

A service registers `Route(topic).on(VendorProvisioned, handlers.vendor_provisioned)`: mypy checks that
the handler takes a `Message[VendorProvisioned]`. The event type string (the class's `event_type`) is
only the lookup key, so a record is still skipped by its header without decoding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cancelflow.events import Envelope, Payload
from cancelflow.messaging.codec import Message
from cancelflow.sql import Db

P = TypeVar("P", bound=Payload)


class HandlerContext(Protocol):
    """What a handler may do: statements in the transaction, events to the outbox, and calls to the outside
    world after committing its intent. `UnitOfWork` (one by one, batch) and `RoundStep` (rounds) are one."""

    @property
    def db(self) -> Db: ...

    def emit(self, payload: Payload, *, correlation_id: str | None = None, key: str | None = None,
             headers: dict[str, str] | None = None) -> Envelope: ...

    def emit_envelope(self, envelope: Envelope, *, topic: str, key: str | None,
                      headers: dict[str, str] | None = None) -> None: ...

    def wrote(self, what: str) -> None: ...

    async def checkpoint(self) -> None: ...

    async def resume(self) -> None: ...

    def outside(self) -> AbstractAsyncContextManager[None]: ...


EventHandler = Callable[[Message[P], HandlerContext], Awaitable[None]]
Handler = EventHandler[Any]


@dataclass
class Route:
    """What a service does with one topic: a handler per event class, and how the topic is consumed.

    `dead_letter`: this service dead-letters the topic's bad records (one service per topic, so each
    lands there once). `batch`: the handlers touch only the service's own database, so a poll's records
    share one transaction. `rounds`: the handlers call the outside world (`outside()`), so a poll's
    records go in rounds (messaging/rounds.py). `facts`: upstream facts the requests rely on, handled
    before a poll's other records (and tracked by `FactsProgress`).
    """

    topic: str
    dead_letter: bool = False
    batch: bool = False
    rounds: bool = False
    facts: bool = False
    handlers: dict[str, Handler] = field(default_factory=dict, init=False)  # by event_type

    def on(self, event: type[P], handler: EventHandler[P]) -> Route:
        """Handle `event` with `handler` (typed with that event)."""
        if event.topic != self.topic:
            raise ValueError(f"{event.event_type} is published on {event.topic}, not {self.topic}")
        if event.event_type in self.handlers:
            raise ValueError(f"{event.event_type} already has a handler on {self.topic}")
        self.handlers[event.event_type] = handler
        return self

    def on_each(self, events: Iterable[type[P]], handler: EventHandler[P]) -> Route:
        """Handle every one of `events` with `handler` (typed with their common base)."""
        for event in events:
            self.on(event, handler)
        return self

    def handles(self, event_type: str) -> bool:
        return event_type in self.handlers


async def dispatch(route: Route, message: Message[Payload], context: HandlerContext) -> bool:
    """Run `route`'s handler of `message` in `context`; False when it has none (an event for another
    service)."""
    handler = route.handlers.get(message.event_type)
    if handler is None:
        return False
    await handler(message, context)
    return True
