"""What a cancellation's records cost on their own: the stack's Kafka traffic with no work behind it.

    python scripts/kafka_floor.py                     # 1000 cancellations as fast as possible
    python scripts/kafka_floor.py --requests 2000 --rate 100
    python scripts/kafka_floor.py --broker kafka      # on Apache Kafka (its partition counts and settings)

A skeleton of the embedded stack: its broker, its topics with the embedded partition counts, and six
processes in the six services' consumer groups, subscribed to the same topics with the same consumer
and producer settings (`make_consumer`, `make_producer`), committing offsets as often as a service.
Each reads what its service reads and publishes what its service publishes for an immediate
cancellation with a refund and an email (counted from a benchmark run's topics: one request, six saga
events read by all six groups, one status record per saga event), with records of the same sizes and
headers. There is no database, validation, HTTP or SMTP: every process only moves records.

It reports the CPU per cancellation of each process (from /proc) and of the broker. That is the part of
the bench's per-request cost that no work in the services can remove: the 300 per second target leaves
6.7 ms of the two cores per request for everything. docs/performance.md, item 33, has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event

from aiokafka import AIOKafkaConsumer
from rich.console import Console
from rich.table import Table

from cancelflow import topics
from cancelflow.messaging.codec import EVENT_TYPE_HEADER
from cancelflow.messaging.consumer import ConsumeLoop
from cancelflow.messaging.gaps import GapGuard
from cancelflow.messaging.kafka import make_consumer, make_producer
from cancelflow.settings import CommonSettings
from cancelflow_tools.bench import cpu_seconds, progress_bar
from cancelflow_tools.stack.apache_kafka import KafkaBroker
from cancelflow_tools.stack.broker import EmbeddedBroker, create_topics, free_port

# Sizes measured on a bench run's topics (bytes of value): requests 618, saga 659, status 1187.
REQUEST, SAGA_EVENT, STATUS_RECORD = b"r" * 618, b"s" * 659, b"t" * 1187
STATUS_TYPE = "CancellationStatusChanged"
SAGA_STEPS = ("CancellationReceived", "VendorCancellationRequested", "VendorProvisioned", "PlatformCommitted",
              "RefundIssued", "EmailSent")

# Each service: the topics it reads, and what it publishes to the saga for a record it handles
# (the request itself is "" here). The status tracker publishes a status record for every saga event.
SERVICES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "billing": ((topics.PLATFORM_SUBSCRIPTIONS, topics.REQUESTED, topics.SAGA),
                {"": ("CancellationReceived", "VendorCancellationRequested"), "VendorProvisioned": ("PlatformCommitted",)}),
    "provisioning": ((topics.SAGA,), {"VendorCancellationRequested": ("VendorProvisioned",)}),
    "payment_gateway": ((topics.PAYMENTS_CHARGES, topics.SAGA), {"PlatformCommitted": ("RefundIssued",)}),
    "dispute": ((topics.PAYMENTS_CHARGES, topics.SAGA), {}),
    "notification": ((topics.PLATFORM_SUBSCRIPTIONS, topics.SAGA), {"RefundIssued": ("EmailSent",)}),
    "status_tracker": ((topics.SAGA,), {}),
}


def _event_type(headers: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]]) -> str:
    return next((value.decode() for name, value in headers or () if name == EVENT_TYPE_HEADER), "")


async def _serve(service: str, settings: CommonSettings, ready: Event) -> None:
    reads, publishes = SERVICES[service]
    gaps = GapGuard()
    consumer = make_consumer(settings, *reads, group_id=service, client_id=service, gap_guard=gaps)
    producer = make_producer(settings, client_id=service)
    await producer.start()
    await consumer.start()
    ready.set()
    committed_at, pending = time.monotonic(), False
    while True:
        batch = await gaps.check(consumer, await consumer.getmany(timeout_ms=1000))
        sends = []
        for records in batch.values():
            for record in records:
                kind = _event_type(record.headers)
                if service == "status_tracker" and record.topic == topics.SAGA:
                    sends.append(await producer.send(topics.STATUS, STATUS_RECORD, key=record.key,
                                                     headers=[(EVENT_TYPE_HEADER, STATUS_TYPE.encode())]))
                for step in publishes.get(kind, ()) if record.topic in (topics.REQUESTED, topics.SAGA) else ():
                    key = record.key if record.topic == topics.SAGA else b"req-" + record.key
                    sends.append(await producer.send(topics.SAGA, SAGA_EVENT, key=key,
                                                     headers=[(EVENT_TYPE_HEADER, step.encode())]))
        if sends:
            await asyncio.gather(*sends)
        # Offsets as a service commits them: every COMMIT_EVERY_S, or when a poll comes back empty.
        pending = pending or bool(batch)
        if pending and (not batch or time.monotonic() - committed_at >= ConsumeLoop.COMMIT_EVERY_S):
            await consumer.commit()
            committed_at, pending = time.monotonic(), False


def _settings(bootstrap: str, fetch_wait_ms: int, broker: str = "embedded") -> CommonSettings:
    # As the stack runs its services (stack/embedded.py sets the shorter session timeout).
    return CommonSettings.model_validate({"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_SESSION_TIMEOUT_MS": 6000,
                                          "CANCELFLOW_FETCH_MAX_WAIT_MS": fetch_wait_ms, "CANCELFLOW_BROKER": broker})


def _run_service(service: str, bootstrap: str, fetch_wait_ms: int, broker: str, ready: Event) -> None:
    asyncio.run(_serve(service, _settings(bootstrap, fetch_wait_ms, broker), ready))


async def _load(bootstrap: str, settings: CommonSettings, requests: int, rate: float | None,
                pids: dict[str, int], advance: Callable[[int], None]) -> tuple[float, dict[str, float]]:
    """Send `requests` requests (paced at `rate` a second, or as fast as possible) and wait for every
    status record; the seconds it took and each process's CPU seconds meanwhile."""
    producer = make_producer(settings, client_id="floor-load")
    watcher = AIOKafkaConsumer(topics.STATUS, bootstrap_servers=bootstrap, auto_offset_reset="latest",
                               enable_auto_commit=False, fetch_max_wait_ms=settings.fetch_max_wait_ms)
    await producer.start()
    await watcher.start()
    await watcher.seek_to_end()
    try:
        tag = os.urandom(3).hex()
        counts: dict[bytes, int] = {}  # status records per request of this run (a redelivery adds one)
        done: set[bytes] = set()
        gaps = GapGuard(grace_s=settings.offset_gap_grace_ms / 1000)

        async def watch() -> None:
            while len(done) < requests:
                batch = await gaps.check(watcher, await watcher.getmany(timeout_ms=1000))
                for record in (record for records in batch.values() for record in records):
                    if record.key and tag.encode() in record.key:
                        counts[record.key] = counts.get(record.key, 0) + 1
                        if counts[record.key] >= len(SAGA_STEPS):
                            done.add(record.key)
                advance(len(done))

        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        watching = asyncio.create_task(watch())
        for n in range(requests):
            await producer.send(topics.REQUESTED, REQUEST, key=f"sub-{tag}-{n}".encode())
            if rate:
                await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.perf_counter()))
        await producer.flush()
        try:
            await asyncio.wait_for(watching, 60)
        except TimeoutError:
            raise RuntimeError(f"{requests - len(done)} of {requests} requests had no status records 60 s after "
                               "the last send") from None
        elapsed = time.perf_counter() - started
        return elapsed, {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    finally:
        await watcher.stop()
        await producer.stop()


async def measure(requests: int, rate: float | None, fetch_wait_ms: int, console: Console,
                  kind: str = "embedded") -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="kafka-floor-") as data_dir:
        broker_class = KafkaBroker if kind == "kafka" else EmbeddedBroker
        async with broker_class(port=free_port(), data_dir=data_dir) as broker:
            await create_topics(broker.bootstrap, embedded=kind == "embedded")
            context = multiprocessing.get_context("spawn")
            readies = {service: context.Event() for service in SERVICES}
            processes = {service: context.Process(target=_run_service, daemon=True,
                                                  args=(service, broker.bootstrap, fetch_wait_ms, kind,
                                                        readies[service]))
                         for service in SERVICES}
            for process in processes.values():
                process.start()
            try:
                with console.status("six consumer groups joining ..."):
                    if not all(await asyncio.gather(*(asyncio.to_thread(ready.wait, 120) for ready in readies.values()))):
                        raise RuntimeError("a consumer group did not start in 120 s")
                    settings = _settings(broker.bootstrap, fetch_wait_ms, kind)
                    # Warm up: every group has its partitions and is reading before the clock starts.
                    await _load(broker.bootstrap, settings, 20, None, {}, lambda n: None)
                pids = {service: process.pid for service, process in processes.items() if process.pid}
                pids |= {"broker": broker.pid, "load generator and status reader": os.getpid()}
                with progress_bar(console) as progress:
                    task = progress.add_task(f"{requests} cancellations" + (f" at {rate:g}/s" if rate else ""),
                                             total=requests)
                    return await _load(broker.bootstrap, settings, requests, rate, pids,
                                       lambda n: progress.update(task, completed=n))
            finally:
                for process in processes.values():
                    process.terminate()
                for process in processes.values():
                    process.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=None, help="requests a second (default: as fast as possible)")
    parser.add_argument("--broker", choices=("embedded", "kafka"), default="embedded")
    parser.add_argument("--fetch-wait-ms", type=int, default=None, help="default: the broker's (200; 500 on Kafka)")
    args = parser.parse_args()
    args.fetch_wait_ms = args.fetch_wait_ms or CommonSettings(broker=args.broker).fetch_max_wait_ms
    console = Console()
    elapsed, cpu = asyncio.run(measure(args.requests, args.rate, args.fetch_wait_ms, console, args.broker))
    table = Table(title=f"{args.requests} cancellations' records on the {args.broker} broker, no work behind them: "
                        f"{args.requests / elapsed:.0f} per second, fetch wait {args.fetch_wait_ms} ms")
    table.add_column("process")
    table.add_column("CPU ms per cancellation", justify="right")
    for name, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
        table.add_row(name, f"{1000 * seconds / args.requests:.2f}")
    table.add_row("total", f"{1000 * sum(cpu.values()) / args.requests:.2f}", style="bold")
    console.print(table)


if __name__ == "__main__":
    main()
