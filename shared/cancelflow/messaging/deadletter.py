"""What every consumer does with a record it cannot take: the retry policy before giving up, and the
dead-letter record it then writes (CONTRACT.md section 7)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiokafka.errors import KafkaError
from sqlalchemy.exc import DBAPIError, OperationalError

from cancelflow import metrics
from cancelflow.events import RecordDeadLettered
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import MAX_RECORD_BYTES
from cancelflow.messaging.store import KEY_CHARS
from cancelflow.pii import scrub_record

log = get_logger(__name__)

MAX_HANDLER_ATTEMPTS = 3
# A dead-letter record's reason sentence, cut to this: it may quote the record (an event type), and the
# DLQ record must stay within the topics' size limit whatever the record held.
DETAIL_CHARS = 1000


class TransientError(Exception):
    """Raised by a handler when the outside world is away (retry the record, do not dead-letter)."""


# The drivers' own errors that say "the database is away or busy, try again" (units of work run on
# the drivers without SQLAlchemy, which wrapped them): sqlite3's OperationalError (locked, busy, disk
# I/O, disk full); PostgreSQL's connection errors (08), its operator's shutdowns (57), exhausted
# resources (53: too many connections, disk full) and transaction rollbacks (40: serialization
# failure, deadlock; retrying the transaction is the remedy).
_DRIVER_TRANSIENT = (sqlite3.OperationalError, asyncpg.PostgresConnectionError,
                     asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError,
                     asyncpg.exceptions.TransactionRollbackError)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (TransientError, OperationalError, KafkaError, ConnectionError, *_DRIVER_TRANSIENT)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


async def handle_with_retries(attempt: Callable[[], Awaitable[None]], *, event_type: str,
                              give_up: Callable[[Exception], Awaitable[None]]) -> None:
    """Run `attempt` until it succeeds. The database or a dependency away (transient): wait and retry
    without bound, the partition waits and nothing is lost (/readyz reports it meanwhile). Anything
    else: `MAX_HANDLER_ATTEMPTS` tries, then `give_up`, so the records behind it flow on."""
    tries = 0
    while True:
        tries += 1
        try:
            await attempt()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.HANDLER_ERRORS.labels(event_type).inc()
            if is_transient(exc):
                log.warning("transient error, retrying", attempt=tries, error=str(exc))
                await asyncio.sleep(min(10.0, 0.2 * 2 ** min(tries, 6)))
                continue
            if tries < MAX_HANDLER_ATTEMPTS:
                log.warning("handler failed, retrying", attempt=tries, error=repr(exc))
                await asyncio.sleep(0.1 * tries)
                continue
            log.error("handler failed repeatedly, dead-lettering", error=repr(exc), exc_info=exc)
            await give_up(exc)
            return


def marker_of(record: Any) -> str:
    """The inbox id of a dead-lettered record: where it was, since it may have no event id."""
    return f"dlq:{record.topic}:{record.partition}:{record.offset}"


def bounded(detail: str) -> str:
    return detail if len(detail) <= DETAIL_CHARS else detail[:DETAIL_CHARS - 3] + "..."


def fitting_key(key: bytes) -> str:
    """A record's key as the outbox can hold it: as it is when it fits; else its start and the sha256 of
    the whole (the operator finds the record by topic, partition and offset). PostgreSQL text holds no NUL."""
    text = key.decode("utf-8", "replace").replace("\x00", "\ufffd")
    if len(text) <= KEY_CHARS:
        return text
    digest = f"...sha256:{hashlib.sha256(key).hexdigest()}"
    return text[:KEY_CHARS - len(digest)] + digest


def _readable(value: bytes) -> str | None:
    """The record's bytes for the operator, customer email and name masked (no PII in the DLQ); None when
    too large, or when they cannot be masked (nested deeper than the JSON writer goes, say): the digest
    then stands for them."""
    if len(value) > MAX_RECORD_BYTES:
        return None
    try:
        scrubbed = scrub_record(value)
    except Exception:
        return None
    return base64.b64encode(scrubbed).decode() if len(scrubbed) <= MAX_RECORD_BYTES else None


def dead_letter_record(record: Any, *, reason: str, detail: str, request_id: str | None,
                       consumer_group: str, keep_value: bool = True) -> RecordDeadLettered:
    """The DLQ record of `record`. Every field is bounded whatever the record held, so writing it cannot
    fail on the record; `keep_value=False` leaves out its bytes and key (where it is, its size and digest
    remain), the last resort when even this could not be written."""
    value = record.value or b""
    return RecordDeadLettered(  # type: ignore[call-arg]  # pydantic's mypy plugin misses the `topic` alias
        reason=reason,
        detail=bounded(detail),
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        original_key=fitting_key(record.key) if record.key and keep_value else None,
        consumer_group=consumer_group,
        original_size=len(value),
        original_sha256=hashlib.sha256(value).hexdigest(),
        original_base64=_readable(value) if keep_value else None,
        request_id=request_id,
    )


def count_dead_lettered(record: Any, reason: str, detail: str) -> None:
    metrics.DEAD_LETTERED.labels(record.topic, reason).inc()
    log.warning("record dead-lettered", topic=record.topic, partition=record.partition, offset=record.offset,
                reason=reason, detail=detail)
