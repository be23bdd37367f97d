"""Authenticity of upstream records (CONTRACT.md section 10).

With `CANCELFLOW_PRODUCER_KEYS` set (`name:key,name:key`; several keys per name while a key is
rotated), every record on the three upstream topics must carry `cf-producer` (a configured name) and
`cf-signature` (hex HMAC-SHA256 of the record value under one of that producer's keys). Anything else
is dead-lettered with reason `bad_signature` and has no effect. Unset: nothing is checked.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from cancelflow import topics

UPSTREAM_TOPICS = frozenset({topics.PLATFORM_SUBSCRIPTIONS, topics.PAYMENTS_CHARGES, topics.REQUESTED})


def parse_producer_keys(text: str | None) -> dict[str, tuple[str, ...]]:
    """`"storefront:k1,storefront:k2,bss:k3"` -> {"storefront": ("k1", "k2"), "bss": ("k3",)}."""
    keys: dict[str, list[str]] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, key = item.strip().partition(":")
        if not sep or not name or not key:
            raise ValueError(f"CANCELFLOW_PRODUCER_KEYS entries are name:key, got {item.strip()[:20]!r}...")
        keys.setdefault(name, []).append(key)
    return {name: tuple(values) for name, values in keys.items()}


def sign(value: bytes, key: str) -> str:
    return hmac.new(key.encode(), value, hashlib.sha256).hexdigest()


class SignatureCheck:
    def __init__(self, keys: dict[str, tuple[str, ...]]) -> None:
        self._keys = keys

    @classmethod
    def from_text(cls, text: str | None) -> SignatureCheck | None:
        keys = parse_producer_keys(text)
        return cls(keys) if keys else None

    def problem(self, topic: str, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> str | None:
        """Why the record is not authentic, or None when it is (or the topic is not checked)."""
        if topic not in UPSTREAM_TOPICS:
            return None
        found = {name: raw for name, raw in (headers or ())}
        producer = found.get("cf-producer", b"").decode("utf-8", "replace")
        signature = found.get("cf-signature", b"").decode("ascii", "replace")
        if not producer or not signature:
            return "the record is not signed (headers cf-producer and cf-signature are required)"
        keys = self._keys.get(producer)
        if keys is None:
            return f"producer {producer[:40]!r} is not a configured producer"
        body = value or b""
        if not any(hmac.compare_digest(sign(body, key), signature) for key in keys):
            return f"the signature does not match any key of producer {producer[:40]!r}"
        return None
