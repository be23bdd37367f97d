"""Publishing as an upstream app would (storefront, BSS, the platform): used by the CLI, the demo,
the benchmark and the tests. Records are envelopes on the public topics, keyed as section 2 says."""

from __future__ import annotations

import uuid
from types import TracebackType

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from cancelflow.events import Envelope, Payload, envelope_for
from cancelflow.messaging.codec import encode
from cancelflow.messaging.kafka import make_producer
from cancelflow.messaging.signatures import sign
from cancelflow.settings import CommonSettings


class UpstreamPublisher:
    def __init__(self, settings: CommonSettings, *, producer_name: str = "storefront",
                 signing_key: str | None = None) -> None:
        self.producer_name = producer_name
        self.attempts = 6
        # Signed when CANCELFLOW_PRODUCER_KEYS names this producer (CONTRACT.md section 10).
        self.signing_key = signing_key or settings.signing_key(producer_name)
        self._producer: AIOKafkaProducer = make_producer(settings, client_id=f"upstream-{producer_name}")

    async def __aenter__(self) -> UpstreamPublisher:
        await self._producer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._producer.stop()

    async def publish(self, payload: Payload, *, correlation_id: str | None = None, wait: bool = True) -> Envelope:
        envelope = envelope_for(payload, producer=self.producer_name,
                                correlation_id=correlation_id or str(getattr(payload, "request_id", uuid.uuid4())),
                                causation_id=None)
        await self.send_raw(payload.topic, encode(envelope), key=payload.record_key(), wait=wait)
        return envelope

    async def send_raw(self, topic: str, value: bytes | None, *, key: str | None, wait: bool = True,
                       headers: list[tuple[str, bytes]] | None = None) -> None:
        headers = list(headers or [])
        if self.signing_key and value is not None:
            headers += [("cf-producer", self.producer_name.encode()),
                        ("cf-signature", sign(value, self.signing_key).encode())]
        async for attempt in AsyncRetrying(
            # The broker may be away for a while (a restart, a stall): send the same bytes again. A copy
            # that did land is dropped by its consumers by event_id.
            retry=retry_if_exception_type(KafkaError), stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.5, max=10), reraise=True,
        ):
            with attempt:
                future = await self._producer.send(topic, value=value, key=key.encode() if key else None,
                                                   headers=headers)
                if wait:
                    await future

    async def flush(self) -> None:
        await self._producer.flush()
