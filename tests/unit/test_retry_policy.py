"""The consume loop's retry policy (messaging/deadletter.py): a transient error (the database or the
broker away) is retried without bound, anything else three times and then dead-lettered."""

from __future__ import annotations

import asyncio
import sqlite3
from types import SimpleNamespace

import asyncpg
import pytest
from sqlalchemy.exc import OperationalError

from cancelflow.messaging import deadletter


@pytest.mark.parametrize(("error", "transient"), [
    # units of work on SQLite run on the driver: its own errors, not SQLAlchemy's wrappers
    (sqlite3.OperationalError("database is locked"), True),
    (sqlite3.OperationalError("this process's other writers held it for 30000 ms"), True),
    (OperationalError("SELECT 1", {}, Exception("server closed the connection")), True),
    (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
    (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
    (asyncpg.exceptions.SerializationError("could not serialize access due to concurrent update"), True),
    (asyncpg.exceptions.UniqueViolationError("duplicate key value violates unique constraint"), False),
    (deadletter.TransientError("the gateway is away"), True),
    (sqlite3.IntegrityError("UNIQUE constraint failed: inbox.message_id"), False),
    (ValueError("a handler bug"), False),
])
async def test_transient_errors_are_retried_until_they_pass_others_dead_lettered(
        monkeypatch: pytest.MonkeyPatch, error: Exception, transient: bool) -> None:
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(deadletter, "asyncio", SimpleNamespace(sleep=no_wait, CancelledError=asyncio.CancelledError))
    failures_left = 5
    given_up: list[Exception] = []

    async def attempt() -> None:
        nonlocal failures_left
        if failures_left:
            failures_left -= 1
            raise error

    async def give_up(exc: Exception) -> None:
        given_up.append(exc)

    await deadletter.handle_with_retries(attempt, event_type="RefundIssued", give_up=give_up)
    if transient:
        assert given_up == [] and failures_left == 0 and len(waits) == 5  # retried until it passed
    else:
        assert given_up == [error] and failures_left == 2  # three attempts, then the dead-letter topic
