"""The inbox and the outbox, as tables inside each service's own database.

A handler's state change, the events it emits (outbox) and the id of the event it processed (inbox)
commit in one transaction. The relay publishes the outbox afterwards, in insertion order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    func,
    insert,
    select,
)

from cancelflow.columns import UtcDateTime
from cancelflow.sql import Among, Query

# The longest record key the outbox holds: every key we emit is an id (events.ID_CHARS) or a dead-letter
# record's fitted key (messaging/deadletter.fitting_key).
KEY_CHARS = 200


@dataclass(frozen=True)
class MessagingTables:
    inbox: Table
    outbox: Table

    # The statements every unit of work and relay runs, built once (cancelflow.sql).
    @cached_property
    def add_inbox(self) -> Query:
        return Query(insert(self.inbox))

    @cached_property
    def inbox_has(self) -> Query:
        return Query(select(self.inbox.c.message_id).where(self.inbox.c.message_id == bindparam("message_id")))

    @cached_property
    def inbox_among(self) -> Among:
        """Which of a list of message ids the inbox holds (one statement per poll)."""
        return Among(lambda ids: select(self.inbox.c.message_id).where(self.inbox.c.message_id.in_(ids)))

    @cached_property
    def inbox_prune(self) -> Query:
        """Delete up to `size` inbox rows processed before `before` (one chunk of messaging/retention.py)."""
        old = (select(self.inbox.c.message_id).where(self.inbox.c.processed_at < bindparam("before"))
               .limit(bindparam("size")))
        return Query(delete(self.inbox).where(self.inbox.c.message_id.in_(old.scalar_subquery())))

    @cached_property
    def add_outbox(self) -> Query:
        return Query(insert(self.outbox))

    @cached_property
    def outbox_head(self) -> Query:
        return Query(select(self.outbox).order_by(self.outbox.c.id).limit(bindparam("size")))

    @cached_property
    def outbox_remove(self) -> Query:
        return Query(delete(self.outbox).where(self.outbox.c.id == bindparam("row_id")))

    @cached_property
    def outbox_backlog(self) -> Query:
        return Query(select(func.count().label("rows")).select_from(self.outbox))


def messaging_tables(metadata: MetaData) -> MessagingTables:
    inbox = Table(
        "inbox",
        metadata,
        # event_id for valid records; "dlq:<topic>:<partition>:<offset>" for dead-lettered ones
        Column("message_id", String(200), primary_key=True),
        Column("topic", String(200), nullable=False),
        Column("partition", Integer, nullable=False),
        Column("offset", BigInteger, nullable=False),
        # indexed for pruning (messaging/retention.py)
        Column("processed_at", UtcDateTime(), nullable=False, index=True),
    )
    outbox = Table(
        "outbox",
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("topic", String(200), nullable=False),
        Column("key", String(KEY_CHARS), nullable=True),
        Column("value", LargeBinary, nullable=False),
        Column("headers", JSON, nullable=True),
        Column("event_type", String(100), nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        # Never reuse an id on SQLite. Without AUTOINCREMENT a row inserted after the table emptied
        # takes a deleted row's id; a second relay (two instances on one database) still holding the
        # deleted row would then delete the new row unpublished (db.sqlite_outbox_ids_never_reused).
        sqlite_autoincrement=True,
    )
    return MessagingTables(inbox, outbox)


def service_metadata() -> tuple[MetaData, MessagingTables]:
    """A service's schema, begun with its inbox and outbox: `metadata, messaging = service_metadata()`."""
    metadata = MetaData()
    return metadata, messaging_tables(metadata)
