"""Customer data (email address, name) kept out of logs and the dead-letter queue.

Logs mask every email-shaped string and hide values under PII keys. Dead-lettered records keep their
bytes (CONTRACT.md section 7) with the same masking applied; the digest is of the untouched original,
which stays readable at its topic/partition/offset for whoever may see it.
"""

from __future__ import annotations

import re

import orjson

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+)")
PII_KEYS = frozenset({"email", "customer_email", "name", "customer_name", "to", "recipient"})


def mask_email(text: str) -> str:
    return _EMAIL.sub(r"\1***@\2", text)


def scrubbed(key: object, value: object) -> object:
    """`value` with customer emails masked and names hidden, inside dicts and lists too."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: scrubbed(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrubbed(key, v) for v in value]
    if key in PII_KEYS:
        return mask_email(str(value)) if "@" in str(value) else "***"
    if isinstance(value, str) and "@" in value:
        return mask_email(value)
    return value


def scrub_record(value: bytes) -> bytes:
    """A record's bytes with PII masked: field by field when it is JSON, email-shaped text otherwise."""
    try:
        return orjson.dumps(scrubbed(None, orjson.loads(value)))
    except orjson.JSONDecodeError:
        pass
    try:
        return mask_email(value.decode("utf-8")).encode("utf-8")
    except UnicodeDecodeError:
        return value
