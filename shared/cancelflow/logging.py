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


def _scrubbed(key: object, value: object) -> object:
    """`value` with customer emails masked and names hidden, inside dicts and lists too."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _scrubbed(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(key, v) for v in value]
    if key in _PII_KEYS:
        return mask_email(str(value)) if "@" in str(value) else "***"
    if isinstance(value, str) and "@" in value:
        return mask_email(value)
    return value


def _scrub(_logger: object, _method: str, event_dict: dict) -> dict:
    for key, value in list(event_dict.items()):
        if key == "event" and isinstance(value, str):
            event_dict[key] = mask_email(value)  # the message itself is never hidden, only masked
        else:
            event_dict[key] = _scrubbed(key, value)
    return event_dict


def configure(service: str, *, level: str = "INFO", json: bool = False) -> None:
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    # The same steps for our lines and for the libraries' (aiokafka, aiohttp, ...): the request context,
    # level, time, the traceback as text, and masking last, so nothing printed escapes it.
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _scrub,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # Library records become lines of the same shape (JSON in production), with the logger's name.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
