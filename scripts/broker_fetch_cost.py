"""What a fetch costs the embedded broker, against how many record batches the partition already holds.

    python scripts/broker_fetch_cost.py                       # 0, 500, 1000, 2000 and 4000 batches held
    python scripts/broker_fetch_cost.py --held 0 --held 8000  # other points

The embedded broker (Tansu 0.6, memory storage) keeps every record batch as one object and, for each
fetch of a partition that has records past the consumer's offset, lists every batch object of that
partition to find where to start. So a fetch that brings records costs more the longer the broker has
run. This measures it on a broker of its own: ten consumer groups read one partition while a producer
adds 50 records a second (one batch each), at each number of batches held; the broker's CPU (from /proc)
divided by the fetches that brought records. docs/performance.md, item 29, has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cancelflow_tools.bench import cpu_seconds
from cancelflow_tools.stack.broker import EmbeddedBroker, free_port

TOPIC = "fetch-cost"
GROUPS = 10
RATE = 50  # records a second while measuring, one batch each
PAYLOAD = b"x" * 500


async def measure(held_points: list[int], seconds: float, data_dir: str, console: Console) -> list[tuple[int, ...]]:
    rows = []
    async with EmbeddedBroker(port=free_port(), data_dir=data_dir) as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0)
        await producer.start()
        await (await producer.send(TOPIC, PAYLOAD))  # creates the topic (one partition)
        consumers = [AIOKafkaConsumer(TOPIC, bootstrap_servers=broker.bootstrap, group_id=f"g{i}",
                                      fetch_max_wait_ms=100, auto_offset_reset="latest") for i in range(GROUPS)]
        fetches = 0

        async def drain(consumer: AIOKafkaConsumer) -> None:
            nonlocal fetches
            while True:
                if await consumer.getmany(timeout_ms=1000):
                    fetches += 1

        await asyncio.gather(*(consumer.start() for consumer in consumers))
        tasks = [asyncio.create_task(drain(c)) for c in consumers]
        held = 1
        try:
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("measuring", total=len(held_points))
                for target in held_points:
                    while held < target:  # one batch object per awaited send
                        await (await producer.send(TOPIC, PAYLOAD))
                        held += 1
                    cpu, before, started, sent = cpu_seconds(broker.pid), fetches, time.perf_counter(), 0
                    while time.perf_counter() - started < seconds:
                        await (await producer.send(TOPIC, PAYLOAD))
                        sent += 1
                        await asyncio.sleep(max(0.0, started + sent / RATE - time.perf_counter()))
                    elapsed, used, brought = time.perf_counter() - started, cpu_seconds(broker.pid) - cpu, fetches - before
                    rows.append((target, round(100 * used / elapsed), round(brought / elapsed),
                                 round(1e6 * used / max(brought, 1))))
                    held += sent
                    progress.advance(task)
        finally:
            for t in tasks:
                t.cancel()
            for consumer in consumers:
                await consumer.stop()
            await producer.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, action="append", help="batches held before measuring (repeatable)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time at each point")
    parser.add_argument("--data-dir", default="var/broker-fetch-cost", help="where the broker's log goes")
    args = parser.parse_args()
    console = Console()
    rows = asyncio.run(measure(sorted(args.held or [0, 500, 1000, 2000, 4000]), args.seconds, args.data_dir, console))
    table = Table(title=f"embedded broker: {GROUPS} consumer groups on one partition, {RATE} records/s")
    for column in ("batches held", "broker CPU, % of a core", "fetches with records /s", "CPU per such fetch (us)"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)


if __name__ == "__main__":
    main()
