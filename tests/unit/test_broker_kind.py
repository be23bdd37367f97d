"""CANCELFLOW_BROKER: what the services do differently on Apache Kafka (the embedded broker's workarounds
off, static group membership on), and the local Kafka's settings against docker-compose.yml's."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import yaml

from cancelflow.messaging.gaps import GapGuard
from cancelflow.messaging.kafka import make_consumer, make_producer
from cancelflow.settings import CommonSettings
from cancelflow_tools.stack import apache_kafka
from cancelflow_tools.stack.apache_kafka import (
    BROKER_SETTINGS,
    CLUSTER_SETTINGS,
    NodeAddress,
    kafka_version,
    resolve_jars,
    server_properties,
)
from cancelflow_tools.stack.broker import BrokerError

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_KAFKA = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["kafka"]
# Where compose's node listens (and its HOST listener for the host's clients), its id and log dir: the
# local node has its own.
TOPOLOGY = {"node.id", "listeners", "advertised.listeners", "listener.security.protocol.map",
            "controller.quorum.voters", "log.dirs"}


def compose_properties() -> dict[str, str]:
    """The kafka service's KAFKA_* environment as the apache/kafka image turns it into server.properties."""
    env = COMPOSE_KAFKA["environment"]
    return {name.removeprefix("KAFKA_").lower().replace("_", "."): str(value).lower() if isinstance(value, bool)
            else str(value) for name, value in env.items() if name.startswith("KAFKA_")}


def test_local_kafka_has_the_settings_compose_gives_its_kafka() -> None:
    local = server_properties(NodeAddress(1, 9092, 9093), [NodeAddress(1, 9092, 9093)], Path("/data"))
    compose = compose_properties()
    assert {k: v for k, v in compose.items() if k not in TOPOLOGY} == {
        k: v for k, v in local.items() if k not in TOPOLOGY}
    assert compose.keys() - TOPOLOGY >= BROKER_SETTINGS.keys()


def test_compose_runs_the_kafka_version_of_the_pom() -> None:
    assert COMPOSE_KAFKA["image"] == f"apache/kafka:{kafka_version()}"
    assert re.fullmatch(r"3\.9\.\d+|[4-9]\.\d+\.\d+", kafka_version())


def test_three_nodes_replicate_every_write_to_two() -> None:
    nodes = [NodeAddress(i, 9000 + i, 9100 + i) for i in (1, 2, 3)]
    props = server_properties(nodes[1], nodes, Path("/data"))
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9101,2@127.0.0.1:9102,3@127.0.0.1:9103"
    assert props["node.id"] == "2" and props["listeners"].startswith("PLAINTEXT://127.0.0.1:9002,")
    assert props["min.insync.replicas"] == "2" and props["default.replication.factor"] == "3"
    assert props["offsets.topic.replication.factor"] == "3" == CLUSTER_SETTINGS["offsets.topic.replication.factor"]


def test_embedded_broker_keeps_its_workarounds() -> None:
    settings = CommonSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.broker == "embedded" and not settings.on_kafka
    assert settings.offset_gap_grace_ms == 2000 and settings.fetch_max_wait_ms == 200


def test_on_kafka_the_embedded_workarounds_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCELFLOW_BROKER", "kafka")
    settings = CommonSettings()
    assert settings.on_kafka
    assert settings.offset_gap_grace_ms == 0  # no re-reading of skipped offsets: Kafka skips none
    assert settings.fetch_max_wait_ms == 500  # a fetch wakes when a record arrives
    monkeypatch.setenv("CANCELFLOW_OFFSET_GAP_GRACE_MS", "100")
    assert CommonSettings().offset_gap_grace_ms == 100  # said explicitly, it stands


async def test_gap_guard_with_kafkas_grace_passes_every_batch_through() -> None:
    batch = {object(): [object()]}
    assert await GapGuard(grace_s=CommonSettings(broker="kafka").offset_gap_grace_ms / 1000).check(
        None, batch) is batch  # type: ignore[arg-type]


async def test_static_membership_only_on_kafka_and_no_idempotent_producer_anywhere() -> None:
    embedded = CommonSettings(broker="embedded", instance_id="1")
    kafka = CommonSettings(broker="kafka", instance_id="1")
    # aiokafka gives an idempotent producer a transaction manager (producer id and sequence numbers);
    # after a broker kill -9 it fails every send for good, so the outbox and inbox do that work alone.
    assert make_producer(embedded, client_id="p")._txn_manager is None  # noqa: SLF001
    assert make_producer(kafka, client_id="p")._txn_manager is None  # noqa: SLF001
    consumer = make_consumer(kafka, "t", group_id="cancelflow-billing", client_id="c")
    assert consumer._group_instance_id == "cancelflow-billing-1"  # noqa: SLF001
    assert make_consumer(embedded, "t", group_id="g", client_id="c")._group_instance_id is None  # noqa: SLF001
    without_id = CommonSettings(broker="kafka")
    assert make_consumer(without_id, "t", group_id="g", client_id="c")._group_instance_id is None  # noqa: SLF001
    await asyncio.sleep(0)


def test_without_java_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"Java 17.*apt-get install openjdk-17-jre-headless.*docker compose"):
        resolve_jars(tmp_path / "cache")


def test_without_maven_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    java = tmp_path / "bin" / "java"
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(BrokerError, match=r"Maven.*apt-get install maven.*docker compose"):
        resolve_jars(tmp_path / "cache")


def test_resolved_jars_need_no_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "java").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "java").chmod(0o755)
    (tmp_path / "cache" / "libs").mkdir(parents=True)
    (tmp_path / "cache" / "resolved").write_text(kafka_version())
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no mvn on it
    assert resolve_jars(tmp_path / "cache") == tmp_path / "cache" / "libs"


def test_cache_follows_the_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CANCELFLOW_KAFKA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert apache_kafka.cache_dir() == tmp_path / "cancelflow" / f"kafka-{kafka_version()}"
