"""Faults only a real broker allows, on Apache Kafka (the Kafka pass of scripts/test runs these): kill -9
of the broker with requests in flight and its restart on the same log; and on a three-node KRaft cluster
(replication factor 3, min.insync.replicas 2, acks=all) kill -9 of the node leading the saga topic's
partitions mid-run, then its return. Every invariant holds after each: every request ends once,
nothing is lost, nothing is paid or sent twice."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from cancelflow.topics import TOPICS
from cancelflow_tools.chaos import ChaosConfig, ChaosRun, chaos_env
from cancelflow_tools.testing.smtp import RecordingSMTPServer
from cancelflow_tools.testing.stack import StackProcess

pytestmark = [
    pytest.mark.e2e, pytest.mark.kafka, pytest.mark.timeout(900),
    pytest.mark.skipif(os.environ.get("CANCELFLOW_BROKER") != "kafka",
                       reason="Apache Kafka only: scripts/test runs it in its pass with CANCELFLOW_BROKER=kafka"),
]


def kafka_stack(data_dir: Path, smtp: RecordingSMTPServer, nodes: int) -> StackProcess:
    return StackProcess(data_dir, extra_env={**chaos_env(smtp.port, on_kafka=True), "CANCELFLOW_BROKER": "kafka",
                                             "CANCELFLOW_KAFKA_NODES": str(nodes)})


@pytest.fixture
def smtp() -> Iterator[RecordingSMTPServer]:
    with RecordingSMTPServer() as server:
        yield server


async def replicas(bootstrap: str) -> dict[str, set[int]]:
    """Each topic's replica counts over its partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([t.name for t in TOPICS])
    finally:
        await admin.close()
    return {t["topic"]: {len(p["replicas"]) for p in t["partitions"]} for t in described}


def _violations(result) -> dict:  # type: ignore[no-untyped-def]
    return {k: v[:3] for k, v in result.report.violations.items() if v}


async def test_broker_killed_with_requests_in_flight_restarts_on_its_log_and_loses_nothing(tmp_path, smtp) -> None:  # type: ignore[no-untyped-def]
    stack = kafka_stack(tmp_path / "kafka", smtp, nodes=1).start()
    try:
        config = ChaosConfig(duration_s=20, rate_per_s=3, broker_kills=1, kill_every_s=9, poison_every=6,
                             settle_timeout_s=240)
        result = await ChaosRun(stack, smtp, config).run()
    finally:
        assert stack.stop() == 0
    assert [node for node, _ in result.killed_leaders] == [1]
    assert result.report.ok, _violations(result)
    assert sum(result.outcomes.values()) == result.requests == 60
    assert "starting it again on its log" in stack.log.read_text() + stack.service_log("broker")


async def test_three_node_cluster_loses_nothing_when_the_saga_leader_is_killed(tmp_path, smtp) -> None:  # type: ignore[no-untyped-def]
    stack = kafka_stack(tmp_path / "cluster", smtp, nodes=3).start()
    try:
        assert len(stack.broker_pids()) == 3
        assert await replicas(stack.endpoints.bootstrap) == {t.name: {3} for t in TOPICS}
        config = ChaosConfig(duration_s=20, rate_per_s=3, broker_kills=1, poison_every=6, settle_timeout_s=240)
        result = await ChaosRun(stack, smtp, config).run()
    finally:
        assert stack.stop() == 0
    [(node, led)] = result.killed_leaders
    assert led >= 1, f"node {node} led none of the saga partitions"
    assert result.report.ok, _violations(result)
    assert sum(result.outcomes.values()) == result.requests == 60
