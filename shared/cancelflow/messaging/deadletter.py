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
from cancelflow.pii import scrub_record

log = get_logger(__name__)

MAX_HANDLER_ATTEMPTS = 3


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


def dead_letter_record(record: Any, *, reason: str, detail: str, request_id: str | None,
                       consumer_group: str) -> RecordDeadLettered:
    value = record.value or b""
    return RecordDeadLettered(
        reason=reason,
        detail=detail,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        original_key=record.key.decode("utf-8", "replace") if record.key else None,
        consumer_group=consumer_group,
        original_size=len(value),
        original_sha256=hashlib.sha256(value).hexdigest(),
        # The bytes stay readable for the operator, customer email and name masked (no PII in the DLQ).
        original_base64=base64.b64encode(scrub_record(value)).decode() if len(value) <= MAX_RECORD_BYTES else None,
        request_id=request_id,
    )


def count_dead_lettered(record: Any, reason: str, detail: str) -> None:
    metrics.DEAD_LETTERED.labels(record.topic, reason).inc()
    log.warning("record dead-lettered", topic=record.topic, partition=record.partition, offset=record.offset,
                reason=reason, detail=detail)
