"""aiokafka clients configured the same way everywhere (works on Apache Kafka and on Tansu)."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.helpers import create_ssl_context

from cancelflow.logging import get_logger
from cancelflow.messaging.gaps import GapGuard
from cancelflow.settings import CommonSettings
from cancelflow.topics import MAX_MESSAGE_BYTES

log = get_logger(__name__)


def client_security(settings: CommonSettings) -> dict[str, Any]:
    """aiokafka options for KAFKA_SECURITY_PROTOCOL: TLS (a context from the CA/cert/key files) and/or
    SASL (PLAIN or SCRAM-SHA-256/512). Empty for PLAINTEXT."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {}
    if protocol != "PLAINTEXT":
        options["security_protocol"] = protocol
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
            certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
            keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        )
    if protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None  # the settings validator made sure
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    return options


def make_producer(settings: CommonSettings, *, client_id: str, idempotent: bool = False) -> AIOKafkaProducer:
    """`idempotent`: a producer id and per-partition sequence numbers, so a batch retried after a lost
    acknowledgement is written once. Only Apache Kafka has them (not the embedded broker); a producer
    whose sequence state is lost for good is replaced by the outbox relay (`relay.PRODUCER_STATE_LOST`)."""
    return AIOKafkaProducer(**producer_options(settings, client_id=client_id, idempotent=idempotent))


def producer_options(settings: CommonSettings, *, client_id: str, idempotent: bool = False) -> dict[str, Any]:
    return dict(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=idempotent and settings.on_kafka,
        linger_ms=2,
        max_request_size=MAX_MESSAGE_BYTES,
        request_timeout_ms=30_000,
        **client_security(settings),
    )


class Membership:
    """Whether a group member has joined its group and holds its assignment (a readiness check):
    None from the start and while a rebalance is under way, the assigned partitions after a join."""

    def __init__(self) -> None:
        self.assignment: frozenset[Any] | None = None

    @property
    def joined(self) -> bool:
        return self.assignment is not None


class LoggedRebalance(ConsumerRebalanceListener):
    """Says which partitions a group member gives up and takes on: what an operator reads first when a
    partition seems to stand still."""

    def __init__(self, group_id: str, gap_guard: GapGuard | None = None,
                 membership: Membership | None = None) -> None:
        self._group_id = group_id
        self._gap_guard = gap_guard
        self._membership = membership

    async def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("partitions revoked", group=self._group_id, partitions=_names(revoked))
        if self._membership is not None:
            self._membership.assignment = None
        if self._gap_guard is not None:
            self._gap_guard.forget(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned", group=self._group_id, partitions=_names(assigned))
        if self._gap_guard is not None:
            self._gap_guard.forget(assigned)
        if self._membership is not None:
            self._membership.assignment = frozenset(assigned)


def _names(partitions: Any) -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)


def make_consumer(settings: CommonSettings, *topics: str, group_id: str, client_id: str,
                  gap_guard: GapGuard | None = None, membership: Membership | None = None,
                  **overrides: Any) -> AIOKafkaConsumer:
    """A group consumer; `overrides` replace single AIOKafkaConsumer options. `gap_guard` (the one its
    reader checks batches with) and `membership` (its readiness) learn of every rebalance.

    Tests pass a short `session_timeout_ms`: Tansu completes a group join only after about half the
    session timeout, and a member that left is only forgotten when its session expires, so with 30 s
    a service needs ~15 s to start consuming and ~55 s to resume after a restart.
    """
    config: dict[str, Any] = dict(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(300, settings.session_timeout_ms // 10),
        max_poll_records=500,
        **client_security(settings),
    )
    if settings.on_kafka and settings.instance_id:
        # Static membership: a restarted process (same instance id) gets its partitions back at once,
        # without waiting for its old session to expire or a rebalance of the group.
        config["group_instance_id"] = f"{group_id}-{settings.instance_id}"
    config.update(overrides)
    consumer = AIOKafkaConsumer(**config)
    consumer.subscribe(list(topics), listener=LoggedRebalance(group_id, gap_guard, membership))
    return consumer


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, from fresh cluster metadata. `consumer.topics()` fetches it too but
    leaves the consumer's own view alone, which on Kafka knows only the topics it reads already."""
    cluster = await consumer._client.fetch_all_metadata()  # noqa: SLF001 (what topics() calls)
    return [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
