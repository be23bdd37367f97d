"""Each service reads the saga events it acts on: the status tracker and notification the whole saga,
the others only their own copy topic (topics.SAGA_READERS), and a service's route must agree with what
the relays copy to it (checked when the route is added, so a mismatch stops the service at start)."""

from __future__ import annotations

import importlib
import uuid
from datetime import date
from pathlib import Path

import pytest

from cancelflow import topics
from cancelflow.events import REGISTRY, SubscriptionSnapshot, VendorCancellationRequested, envelope_for
from cancelflow.messaging.codec import BadRecord, decode, encode
from cancelflow.messaging.consumer import Route
from cancelflow.settings import SERVICES
from cancelflow.topics import SAGA, SAGA_READERS, saga_of


async def _routes(service: str) -> dict[str, set[str]]:
    runtime = importlib.import_module(f"{service}.bootstrap").build()
    try:
        return {route.topic: set(route.handlers) for route in runtime.routes if route.topic.startswith(SAGA)}
    finally:
        await runtime.engine.dispose()


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_each_service_reads_the_saga_events_it_acts_on(service: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCELFLOW_DATA_DIR", str(tmp_path))
    routes = await _routes(service)
    if service in SAGA_READERS:
        assert routes == {saga_of(service): set(SAGA_READERS[service])}
    else:  # the status tracker and notification follow every request's whole story
        assert routes.keys() == {SAGA}


def test_every_copied_type_is_a_saga_event_and_every_copy_topic_exists() -> None:
    saga_types = {event_type for (event_type, _), model in REGISTRY.items() if model.topic == SAGA}
    assert set(topics.SAGA_COPIES) <= saga_types
    assert {copy for copies in topics.SAGA_COPIES.values() for copy in copies} == {
        saga_of(service) for service in SAGA_READERS} <= set(topics.BY_NAME)


async def test_a_route_that_disagrees_with_the_copies_stops_the_service(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCELFLOW_DATA_DIR", str(tmp_path))
    runtime = importlib.import_module("provisioning.bootstrap").build()

    async def handler(*_: object) -> None:
        return None

    try:
        with pytest.raises(ValueError, match="not the whole saga"):
            runtime.add_route(Route(SAGA, {"VendorCancellationRequested": handler}))
        with pytest.raises(ValueError, match="SAGA_READERS copies"):
            runtime.add_route(Route(saga_of("provisioning"), {"VendorCancellationRequested": handler,
                                                              "PlatformCommitted": handler}))
    finally:
        await runtime.engine.dispose()


def test_a_saga_event_decodes_on_the_copy_topics_of_its_readers_and_nowhere_else() -> None:
    request = VendorCancellationRequested(
        request_id=uuid.uuid4(), account_id="a", subscription_id="s", vendor="acme", vendor_subscription_id="V-s",
        effective_date=date(2026, 11, 22), current_quantity=1, new_quantity=0, snapshot=SubscriptionSnapshot())
    raw = encode(envelope_for(request, producer="billing", correlation_id="c", causation_id=None))
    for topic in (SAGA, saga_of("provisioning")):
        assert decode(raw, topic=topic).event_type == "VendorCancellationRequested"
    with pytest.raises(BadRecord) as bad:
        decode(raw, topic=saga_of("billing"))  # billing does not act on it: no relay copies it there
    assert bad.value.reason == "wrong_topic"
