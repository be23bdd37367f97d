"""Authenticity of records (CONTRACT.md section 10).

Upstream: with `CANCELFLOW_PRODUCER_KEYS` set (`name:key,name:key`; several keys per name while a key
is rotated), every record on the three upstream topics must carry `cf-producer` (a configured name) and
`cf-signature` (hex HMAC-SHA256 of the record value under one of that producer's keys).

Internal: with `CANCELFLOW_SERVICE_KEYS` set (`service:key,...`, the same shape), each service signs
every record it publishes on the internal topics with its own key (the outbox relay adds the headers),
and a consumer takes an event type only from a service its class names in `published_by`.

Anything else is dead-lettered with reason `bad_signature` and has no effect. Unset: nothing is checked.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from cancelflow import topics
from cancelflow.events import REGISTRY

# event type -> the services that may publish it (every version of a type has the same owners)
_OWNERS = {event_type: cls.published_by for (event_type, _), cls in REGISTRY.items()}
UPSTREAM_TOPICS = frozenset({topics.PLATFORM_SUBSCRIPTIONS, topics.PAYMENTS_CHARGES, topics.REQUESTED})
INTERNAL_TOPICS = frozenset({topics.SAGA, topics.STATUS, topics.DLQ})
PRODUCER_HEADER = "cf-producer"
SIGNATURE_HEADER = "cf-signature"

Keys = dict[str, tuple[str, ...]]
Headers = Sequence[tuple[str, bytes]] | None


def parse_keys(text: str | None, variable: str = "CANCELFLOW_PRODUCER_KEYS") -> Keys:
    """`"storefront:k1,storefront:k2,bss:k3"` -> {"storefront": ("k1", "k2"), "bss": ("k3",)}."""
    keys: dict[str, list[str]] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, key = item.strip().partition(":")
        if not sep or not name or not key:
            raise ValueError(f"{variable} entries are name:key, got {item.strip()[:20]!r}...")
        keys.setdefault(name, []).append(key)
    return {name: tuple(values) for name, values in keys.items()}


def parse_producer_keys(text: str | None) -> Keys:
    return parse_keys(text, "CANCELFLOW_PRODUCER_KEYS")


def sign(value: bytes, key: str) -> str:
    return hmac.new(key.encode(), value, hashlib.sha256).hexdigest()


def signature_headers(value: bytes, name: str, key: str) -> list[tuple[str, bytes]]:
    """The headers that say `name` wrote `value` (its key signs it)."""
    return [(PRODUCER_HEADER, name.encode()), (SIGNATURE_HEADER, sign(value, key).encode())]


def producer_of(headers: Headers) -> str:
    """The name a record's `cf-producer` header gives (authentic only once `problem` said so)."""
    for name, raw in headers or ():
        if name == PRODUCER_HEADER:
            return raw.decode("utf-8", "replace")
    return ""


class SignatureCheck:
    def __init__(self, keys: Keys, service_keys: Keys | None = None) -> None:
        self._keys = keys
        self._service_keys = service_keys or {}

    @classmethod
    def from_text(cls, text: str | None, service_text: str | None = None) -> SignatureCheck | None:
        keys = parse_producer_keys(text)
        service_keys = parse_keys(service_text, "CANCELFLOW_SERVICE_KEYS")
        return cls(keys, service_keys) if keys or service_keys else None

    def _keys_for(self, topic: str) -> Keys | None:
        if topic in UPSTREAM_TOPICS:
            return self._keys or None
        if topic in INTERNAL_TOPICS:
            return self._service_keys or None
        return None

    def problem(self, topic: str, value: bytes | None, headers: Headers) -> str | None:
        """Why the record is not authentic, or None when it is (or the topic is not checked)."""
        keys_by_name = self._keys_for(topic)
        if keys_by_name is None:
            return None
        found = {name: raw for name, raw in (headers or ())}
        producer = found.get(PRODUCER_HEADER, b"").decode("utf-8", "replace")
        signature = found.get(SIGNATURE_HEADER, b"").decode("ascii", "replace")
        if not producer or not signature:
            return f"the record is not signed (headers {PRODUCER_HEADER} and {SIGNATURE_HEADER} are required)"
        keys = keys_by_name.get(producer)
        if keys is None:
            return f"producer {producer[:40]!r} is not a configured producer"
        body = value or b""
        if not any(hmac.compare_digest(sign(body, key), signature) for key in keys):
            return f"the signature does not match any key of producer {producer[:40]!r}"
        return None

    def not_owner(self, topic: str, event_type: str, headers: Headers) -> str | None:
        """Why an authentic internal record may still not be taken: its type is not its producer's to
        publish (a service's key signs only what that service owns). None when it is."""
        if topic not in INTERNAL_TOPICS or not self._service_keys:
            return None
        owners = _OWNERS.get(event_type)
        producer = producer_of(headers)
        if owners is not None and producer not in owners:
            return f"{event_type} is published by {', '.join(sorted(owners))}, not by {producer[:40]!r}"
        return None
