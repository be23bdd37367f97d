"""Settings from the environment, with the names of CONTRACT.md section 9.

Each service declares its own `ServiceSettings` subclass (its env prefix and HTTP port, see
`ServiceSettings.named`); all of them fail fast on bad values.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cancelflow.events import PUBLISHERS


class CommonSettings(BaseSettings):
    """What every process of the stack reads."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    data_dir: Path = Field(Path("./var"), validation_alias="CANCELFLOW_DATA_DIR")
    broker_port: int = Field(9092, validation_alias="CANCELFLOW_BROKER_PORT")
    kafka_bootstrap_servers: str | None = Field(None, validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    # Which broker the stack runs on: `embedded` (Tansu; `cancelflow up` starts it unless
    # KAFKA_BOOTSTRAP_SERVERS names one) or `kafka` (Apache Kafka: `cancelflow up` starts it from Maven's
    # jars, compose and k8s run it). What works around the embedded broker's quirks is off on Kafka.
    broker: Literal["embedded", "kafka"] = Field("embedded", validation_alias="CANCELFLOW_BROKER")
    # Kafka nodes `cancelflow up --broker kafka` starts: 1, or 3 for a replicated cluster.
    kafka_nodes: int = Field(1, ge=1, le=5, validation_alias="CANCELFLOW_KAFKA_NODES")
    # Static group membership (KIP-345): a restarted instance takes its partitions back at once.
    # The supervisor names each process it runs; unset, members are dynamic (Kafka only).
    instance_id: str | None = Field(None, validation_alias="CANCELFLOW_INSTANCE_ID")
    # How long a fetch may wait. The embedded broker answers about every half wait, records or not, so
    # this sets each hop's latency against idle CPU (docs/performance.md, items 23 and 31). On Kafka the
    # default is 500: a fetch wakes when a record arrives.
    fetch_max_wait_ms: int = Field(200, ge=1, le=10_000, validation_alias="CANCELFLOW_FETCH_MAX_WAIT_MS")
    # A fetch that skips offsets (the embedded broker does under concurrent produces) is read again; a
    # hole that stays this long is accepted (Apache Kafka has real ones next to transaction markers and
    # after compaction). 0: no check (messaging/gaps.py), the default on Kafka, whose fetches skip nothing.
    offset_gap_grace_ms: int = Field(2000, ge=0, le=600_000, validation_alias="CANCELFLOW_OFFSET_GAP_GRACE_MS")
    # A clean stop of the embedded stack first lets the work in flight finish, at most this long: the
    # embedded broker's records are lost when it stops (stack/drain.py). 0: stop at once.
    drain_s: float = Field(30.0, ge=0, le=3_600, validation_alias="CANCELFLOW_DRAIN_SECONDS")
    # How long the broker waits for a silent group member. Tansu completes a group join only after
    # about half of it and forgets a killed member only when it expires, so the embedded stack runs
    # with a short one (restarted services resume in seconds); Kafka's usual 30-45 s suits production.
    session_timeout_ms: int = Field(30_000, ge=1_000, le=300_000, validation_alias="KAFKA_SESSION_TIMEOUT_MS")
    # Kafka security (every client: producers, consumers, admin, the tracker, the CLI).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", validation_alias="KAFKA_SASL_MECHANISM")
    kafka_sasl_username: str | None = Field(None, validation_alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(None, validation_alias="KAFKA_SASL_PASSWORD")
    kafka_ssl_cafile: Path | None = Field(None, validation_alias="KAFKA_SSL_CAFILE")
    kafka_ssl_certfile: Path | None = Field(None, validation_alias="KAFKA_SSL_CERTFILE")
    kafka_ssl_keyfile: Path | None = Field(None, validation_alias="KAFKA_SSL_KEYFILE")
    smtp_host: str | None = Field(None, validation_alias="SMTP_HOST")
    smtp_port: int = Field(1025, validation_alias="SMTP_PORT")
    support_email: str = Field("support@localhost", validation_alias="SUPPORT_EMAIL")
    mail_from: str = Field("Billing <billing@localhost>", validation_alias="MAIL_FROM")
    # Notification: the longest wait between two delivery attempts while the mail server is away.
    smtp_retry_max_s: float = Field(60.0, gt=0, validation_alias="SMTP_RETRY_MAX_SECONDS")
    smtp_connections: int = Field(8, ge=1, le=64, validation_alias="SMTP_CONNECTIONS")
    vendor_api_url: str | None = Field(None, validation_alias="VENDOR_API_URL")
    gateway_api_url: str | None = Field(None, validation_alias="GATEWAY_API_URL")
    vendor_sandbox_port: int = Field(8090, validation_alias="VENDOR_SANDBOX_PORT")
    gateway_sandbox_port: int = Field(8091, validation_alias="GATEWAY_SANDBOX_PORT")
    duplicate_window_hours: int = Field(72, ge=0, validation_alias="DUPLICATE_WINDOW_HOURS")
    # How many record keys a service handles at once (records of one key always in order).
    handler_concurrency: int = Field(16, ge=1, le=256, validation_alias="CANCELFLOW_HANDLER_CONCURRENCY")
    # Outbound calls: a timeout per call and a bounded retry budget for 5xx/timeouts.
    vendor_timeout_s: float = Field(5.0, gt=0, validation_alias="VENDOR_TIMEOUT_SECONDS")
    vendor_attempts: int = Field(4, ge=1, le=20, validation_alias="VENDOR_ATTEMPTS")
    gateway_timeout_s: float = Field(5.0, gt=0, validation_alias="GATEWAY_TIMEOUT_SECONDS")
    gateway_attempts: int = Field(4, ge=1, le=20, validation_alias="GATEWAY_ATTEMPTS")
    # Billing: how often the end-of-term scheduler looks for periods that ended; and a clock offset
    # in days that only tests and demos set (production never does).
    scheduler_interval_s: float = Field(30.0, gt=0, validation_alias="SCHEDULER_INTERVAL_SECONDS")
    clock_offset_days: int = Field(0, ge=-3650, le=3650, validation_alias="CANCELFLOW_CLOCK_OFFSET_DAYS")
    # How long each service keeps the ids of the events it processed (its inbox), which drop a
    # redelivered event: longer than the topics keep their records (Kafka's default is 7 days). 0 keeps
    # them for ever (messaging/retention.py).
    inbox_retention_days: float = Field(30.0, ge=0, validation_alias="CANCELFLOW_INBOX_RETENTION_DAYS")
    # Status tracker: an open request with no change for this long ends `manual_review` (code `timeout`).
    stuck_after_s: float = Field(600.0, gt=0, validation_alias="STUCK_AFTER_SECONDS")
    # Sandboxes and fault hooks: on in the embedded stack (`cancelflow up` sets it), off otherwise.
    enable_fault_hooks: bool = Field(False, validation_alias="CANCELFLOW_ENABLE_FAULT_HOOKS")
    # CONTRACT.md section 10: "name:key,name:key" (several keys per name for rotation); unset: unchecked.
    producer_keys: str | None = Field(None, validation_alias="CANCELFLOW_PRODUCER_KEYS", repr=False)
    # Section 10, internal topics: "service:key,..." (each service signs with its first key and checks the
    # others'); required when producer keys are set (`cancelflow up` makes them), unset: unsigned.
    service_keys: str | None = Field(None, validation_alias="CANCELFLOW_SERVICE_KEYS", repr=False)
    # Support operators of the status service, `name:role:token,...` (CONTRACT.md section 11).
    operators: str | None = Field(None, validation_alias="CANCELFLOW_OPERATORS", repr=False)
    # Where the status service reads a subscription's page from the services that own it (unset: their
    # HTTP ports on this host, as in the embedded stack).
    billing_api_url: str | None = Field(None, validation_alias="BILLING_API_URL")
    provisioning_api_url: str | None = Field(None, validation_alias="PROVISIONING_API_URL")
    payment_gateway_api_url: str | None = Field(None, validation_alias="PAYMENT_GATEWAY_API_URL")
    log_level: str = Field("INFO", validation_alias="CANCELFLOW_LOG_LEVEL")
    log_json: bool = Field(False, validation_alias="CANCELFLOW_LOG_JSON")

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> CommonSettings:
        if self.kafka_security_protocol.startswith("SASL") and not (
                self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                             "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        return self

    @model_validator(mode="after")
    def _kafka_needs_no_workarounds(self) -> CommonSettings:
        """On Apache Kafka the embedded broker's workarounds are off unless set explicitly."""
        if self.broker == "kafka":
            if "fetch_max_wait_ms" not in self.model_fields_set:
                self.fetch_max_wait_ms = 500
            if "offset_gap_grace_ms" not in self.model_fields_set:
                self.offset_gap_grace_ms = 0
        return self

    @property
    def on_kafka(self) -> bool:
        """Apache Kafka: static group membership, no offset-gap grace, a longer fetch wait."""
        return self.broker == "kafka"

    @field_validator("producer_keys", "service_keys")
    @classmethod
    def _keys_parse(cls, value: str | None, info: ValidationInfo) -> str | None:
        from cancelflow.messaging.signatures import parse_keys

        variable = cls.model_fields[info.field_name].validation_alias  # type: ignore[index]
        parse_keys(value, str(variable))  # fail fast on a malformed list
        return value

    def signing_key(self, producer: str) -> str | None:
        """The key an upstream app named `producer` signs with (the first, i.e. the newest, listed)."""
        from cancelflow.messaging.signatures import parse_producer_keys

        keys = parse_producer_keys(self.producer_keys).get(producer)
        return keys[0] if keys else None

    def service_signing_key(self, service: str) -> str | None:
        """The key `service` signs what it publishes with (the first listed), or None (unsigned)."""
        from cancelflow.messaging.signatures import parse_keys

        keys = parse_keys(self.service_keys, "CANCELFLOW_SERVICE_KEYS").get(service)
        return keys[0] if keys else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.broker_port}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def vendor_url(self) -> str:
        return (self.vendor_api_url or f"http://127.0.0.1:{self.vendor_sandbox_port}").rstrip("/")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def gateway_url(self) -> str:
        return (self.gateway_api_url or f"http://127.0.0.1:{self.gateway_sandbox_port}").rstrip("/")

    @property
    def embedded_smtp(self) -> bool:
        return self.smtp_host is None

    @property
    def smtp_address(self) -> tuple[str, int]:
        return (self.smtp_host or "127.0.0.1", self.smtp_port)


class ServiceSettings(CommonSettings):
    """A service's own settings: its database and its HTTP port (a subclass per service, `named`)."""

    service: str = "service"
    variable_prefix: ClassVar[str] = ""
    http_host: str = Field("127.0.0.1", validation_alias="CANCELFLOW_HTTP_HOST")
    # Host names the HTTP port answers to besides loopback and `http_host` (comma-separated; `*`: any),
    # and whose pages may POST to it (cancelflow/http_guard.py).
    allowed_hosts: str | None = Field(None, validation_alias="CANCELFLOW_ALLOWED_HOSTS")
    database_url_env: str | None = None
    http_port: int = 0

    @model_validator(mode="after")
    def _internal_keys_with_upstream_keys(self) -> ServiceSettings:
        """Keys on must cover every topic: with upstream keys, every service needs every service's key
        (its own to sign, the others' to check what they publish)."""
        from cancelflow.messaging.signatures import parse_keys

        keys = parse_keys(self.service_keys, "CANCELFLOW_SERVICE_KEYS")
        if self.producer_keys and not keys:
            raise ValueError("CANCELFLOW_PRODUCER_KEYS is set: set CANCELFLOW_SERVICE_KEYS too "
                             "(service:key for each of the six services; `cancelflow up` makes them)")
        if keys and (missing := sorted(PUBLISHERS - set(keys))):
            raise ValueError(f"CANCELFLOW_SERVICE_KEYS has no key for {', '.join(missing)}")
        return self

    def database_url(self) -> str:
        if self.database_url_env:
            return self.database_url_env
        path = (self.data_dir / f"{self.service}.db").resolve()
        return f"sqlite+aiosqlite:///{path}"


    @classmethod
    def named(cls, service: str, *, prefix: str, port: int) -> type[ServiceSettings]:
        """The settings class of `service`: its database URL in `{prefix}_DATABASE_URL`, its HTTP port in
        `{prefix}_HTTP_PORT` (default `port`)."""
        return type(
            f"{prefix.title().replace('_', '')}Settings",
            (cls,),
            {
                "__annotations__": {"database_url_env": str | None, "http_port": int, "service": str},
                "__module__": cls.__module__,
                "service": service,
                "variable_prefix": prefix,
                # Out of the repr: a PostgreSQL URL carries its password.
                "database_url_env": Field(None, validation_alias=AliasChoices(f"{prefix}_DATABASE_URL"), repr=False),
                "http_port": Field(port, validation_alias=AliasChoices(f"{prefix}_HTTP_PORT")),
            },
        )
