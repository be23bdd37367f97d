"""structlog setup: one line per event, request context on every line, no customer PII."""

from __future__ import annotations

import logging
import re
import sys

import structlog

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+)")
_PII_KEYS = {"email", "customer_email", "name", "customer_name", "to", "recipient"}


def mask_email(text: str) -> str:
    return _EMAIL.sub(r"\1***@\2", text)


def _scrub(_logger: object, _method: str, event_dict: dict) -> dict:
    for key, value in list(event_dict.items()):
        if key in _PII_KEYS and value is not None:
            event_dict[key] = mask_email(str(value)) if "@" in str(value) else "***"
        elif isinstance(value, str) and "@" in value:
            event_dict[key] = mask_email(value)
    return event_dict


def configure(service: str, *, level: str = "INFO", json: bool = False) -> None:
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
