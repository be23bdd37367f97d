"""Kafka security settings reach every client the project builds (CONTRACT section 9 plus
KAFKA_SECURITY_PROTOCOL and friends), and a password never reaches children masked."""

from __future__ import annotations

import ssl

import pytest
from pydantic import ValidationError

from cancelflow.messaging.kafka import client_security, make_consumer, make_producer
from cancelflow.settings import CommonSettings
from cancelflow_tools.stack.embedded import child_env


def settings(**env: str) -> CommonSettings:
    return CommonSettings(**env)  # type: ignore[arg-type]


def test_plaintext_adds_nothing() -> None:
    assert client_security(settings()) == {}


def test_sasl_ssl_gives_tls_and_scram() -> None:
    options = client_security(settings(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
                                       KAFKA_SASL_USERNAME="billing", KAFKA_SASL_PASSWORD="s3cret"))
    assert options["security_protocol"] == "SASL_SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "SCRAM-SHA-256", "billing", "s3cret")


def test_ssl_alone_has_no_sasl() -> None:
    options = client_security(settings(KAFKA_SECURITY_PROTOCOL="SSL"))
    assert set(options) == {"security_protocol", "ssl_context"}


def test_sasl_without_credentials_fails_fast() -> None:
    with pytest.raises(ValidationError, match="KAFKA_SASL_USERNAME"):
        settings(KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT")


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValidationError):
        settings(KAFKA_SECURITY_PROTOCOL="KERBEROS")


async def test_producers_and_consumers_carry_the_settings() -> None:
    configured = settings(KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", KAFKA_SASL_USERNAME="u",
                          KAFKA_SASL_PASSWORD="p", KAFKA_SASL_MECHANISM="SCRAM-SHA-512")
    producer = make_producer(configured, client_id="t")
    consumer = make_consumer(configured, "t", group_id="g", client_id="t")
    for client in (producer.client, consumer._client):
        assert client._security_protocol == "SASL_PLAINTEXT"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._sasl_plain_username == "u"


def test_children_get_the_real_password_not_a_mask() -> None:
    configured = settings(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_USERNAME="u", KAFKA_SASL_PASSWORD="p4ss")
    env = child_env(configured, {})
    assert env["KAFKA_SASL_PASSWORD"] == "p4ss"
    assert "p4ss" not in repr(configured)


def test_a_database_password_is_not_in_the_settings_repr(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cancelflow_tools.services import service_settings

    monkeypatch.setenv("BILLING_DATABASE_URL", "postgresql+asyncpg://billing:s3cret@db/billing")
    configured = service_settings("billing")
    assert configured.database_url() == "postgresql+asyncpg://billing:s3cret@db/billing"
    assert "s3cret" not in repr(configured) and "s3cret" not in str(configured)
