"""Structured logs: one JSON object per line, the request on every line the consume loop produces,
and no customer email address or name, whoever logs it (our code, a handler, a library)."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import structlog

from cancelflow import logging as cf_logging
from cancelflow.events import CancellationRequested, Payload, RequestedBy, SubscriptionActivated, envelope_for
from cancelflow.messaging.codec import Message
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.dispatch import Route


def _configure(json: bool) -> io.StringIO:
    """Logging configured as `run_service` does, writing to a buffer instead of stderr."""
    buffer = io.StringIO()
    cf_logging.configure("billing", json=json)
    # Module-level loggers must not keep this buffer for good (cache off), and library records go to
    # the buffer as well.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer),
                        cache_logger_on_first_use=False)
    for handler in logging.getLogger().handlers:
        handler.setStream(buffer)  # type: ignore[attr-defined]
    return buffer


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        root.handlers[:], root.level = saved[0], saved[1]


@pytest.fixture
def json_logs(restore_logging: None) -> Any:
    """Production logging (CANCELFLOW_LOG_JSON=1); `read()` gives the lines written since the last read."""
    buffer = _configure(json=True)

    def read() -> list[dict[str, Any]]:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return [orjson.loads(line) for line in text.splitlines() if line.strip()]

    return read


def test_every_line_is_json_with_the_service(json_logs: Any) -> None:
    cf_logging.get_logger("t").info("hello", answer=42)
    [line] = json_logs()
    assert line["event"] == "hello" and line["answer"] == 42
    assert line["service"] == "billing" and line["level"] == "info" and line["timestamp"].endswith("Z")


def test_customer_email_and_name_are_masked_everywhere(json_logs: Any) -> None:
    log = cf_logging.get_logger("t")
    log.info("mail for alex.customer@example.com", to="alex.customer@example.com", name="Alex Customer",
             customer={"email": "alex.customer@example.com", "name": "Alex Customer"},
             recipients=["bo@example.org"])
    try:
        raise ValueError("refused: alex.customer@example.com")
    except ValueError:
        log.error("failed", exc_info=True)
        logging.getLogger("aiosmtplib").exception("library says alex.customer@example.com")
    lines = json_logs()
    text = "\n".join(orjson.dumps(line).decode() for line in lines)
    assert "alex.customer@" not in text and "Alex Customer" not in text and "bo@example.org" not in text
    assert "a***@example.com" in lines[0]["event"]
    assert lines[0]["customer"] == {"email": "a***@example.com", "name": "***"}
    assert lines[2]["logger"] == "aiosmtplib" and "a***@example.com" in lines[2]["exception"]


def test_library_lines_carry_the_request_context(json_logs: Any) -> None:
    with structlog.contextvars.bound_contextvars(request_id="r-1", correlation_id="r-1"):
        logging.getLogger("aiokafka").warning("rebalancing")
    [line] = json_logs()
    assert (line["request_id"], line["correlation_id"], line["service"]) == ("r-1", "r-1", "billing")


def test_a_records_context_names_its_lines_and_yields_to_what_a_line_says(json_logs: Any) -> None:
    log = cf_logging.get_logger("t")
    with cf_logging.record_context(request_id="r-1", event_type="RefundIssued"):
        log.info("plain")
        log.info("explicit", request_id="r-2")
        with structlog.contextvars.bound_contextvars(event_type="bound"):
            logging.getLogger("aiohttp").warning("library line")
    log.info("after")
    plain, explicit, library, after = json_logs()
    assert (plain["request_id"], plain["event_type"]) == ("r-1", "RefundIssued")
    assert explicit["request_id"] == "r-2"
    assert (library["request_id"], library["event_type"]) == ("r-1", "bound")
    assert "request_id" not in after and "event_type" not in after


class _FakeUow:
    async def __aenter__(self) -> _FakeUow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def already_processed(self, _event_id: str) -> bool:
        return False

    async def commit(self, **_kwargs: object) -> None:
        return None


def _record(payload: Any, correlation_id: str) -> SimpleNamespace:
    envelope = envelope_for(payload, producer="tests", correlation_id=correlation_id, causation_id=None)
    return SimpleNamespace(topic=payload.topic, partition=0, offset=7, key=b"k", headers=[],
                           value=orjson.dumps(envelope.model_dump(mode="json")))


async def _consume(record: SimpleNamespace, event: type[Payload]) -> None:
    async def handler(_msg: Message[Payload], _uow: Any) -> None:
        cf_logging.get_logger("handler").info("handling")

    loop = ConsumeLoop(SimpleNamespace(), [Route(event.topic).on(event, handler)],
                       lambda _message: _FakeUow(), service="billing", group_id="g")  # type: ignore[arg-type, return-value]
    await loop.process(record)  # type: ignore[arg-type]


async def test_consume_loop_binds_the_request_on_handler_lines(json_logs: Any) -> None:
    request_id = str(uuid.uuid4())
    request = CancellationRequested(
        request_id=request_id, account_id="acct-1", target="subscription", subscription_id="sub-1",
        requested_by=RequestedBy(user_id="u", role="customer", channel="storefront"))
    await _consume(_record(request, request_id), CancellationRequested)
    [line] = json_logs()
    assert line["event"] == "handling"
    assert line["request_id"] == line["correlation_id"] == request_id
    assert line["event_type"] == "CancellationRequested" and line["event_id"]
    # Nothing stays bound after the record.
    cf_logging.get_logger("t").info("after")
    assert "request_id" not in json_logs()[0]


async def test_facts_belong_to_no_request(json_logs: Any) -> None:
    facts = SubscriptionActivated.model_validate({
        "subscription_id": "sub-1", "account_id": "acct-1",
        "customer": {"email": "alex@example.com", "name": "Alex"}, "product_name": "AV", "vendor": "v",
        "vendor_subscription_id": "v-1", "billing_period": "monthly", "unit_price": "1.00",
        "currency": "USD", "quantity": 1, "status": "active", "current_period_start": "2026-01-01",
        "current_period_end": "2026-02-01", "auto_renew": True})
    await _consume(_record(facts, "sub-1"), SubscriptionActivated)
    [line] = json_logs()
    assert line["request_id"] is None and line["correlation_id"] == "sub-1"


def test_console_format_when_not_json(restore_logging: None) -> None:
    buffer = _configure(json=False)
    cf_logging.get_logger("t").info("plain", to="alex@example.com")
    text = buffer.getvalue()
    assert "plain" in text and "a***@example.com" in text and "alex@" not in text
