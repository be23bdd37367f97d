"""`cancelflow bench`: completed cancellations per second on the embedded stack, against what the bare
broker moves through the same number of hops, in one run.

A run: a stack of its own (or a running one), N subscriptions with their charges loaded (not timed),
N immediate cancellations sent as fast as possible, each timed from its send to its terminal status
with the refund done and the email delivered; then a paced run at R per second for latency; then
plain aiokafka relays carrying N messages through as many hops as a cancellation takes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cancelflow import topics
from cancelflow.messaging.gaps import GapGuard
from cancelflow.messaging.kafka import client_security
from cancelflow.settings import CommonSettings
from cancelflow.topics import Topic
from cancelflow_tools import invariants
from cancelflow_tools.ops import (
    StackClient,
    StatusWatcher,
    email_count,
    is_terminal,
    read_all,
    sample_subscription,
)
from cancelflow_tools.services import SERVICES
from cancelflow_tools.smtp_sink import read_mailbox
from cancelflow_tools.stack.broker import create_topics
from cancelflow_tools.testing.stack import StackProcess

# What one immediate cancellation moves through Kafka, hop by hop (each a consume + produce):
# request -> billing -> provisioning -> billing -> payment-gateway -> notification (EmailSent)
# -> status tracker (status record).
HOPS = 6


@dataclass
class Measured:
    requests: int
    seconds: float
    latencies_ms: list[float]
    steps_ms: dict[str, float] = field(default_factory=dict)  # median time from one saga event to the next
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds of every process during the run
    # The embedded broker's CPU seconds while the first and while the second half of the requests were
    # being sent (not after the last: the drain would count for the second half only). Its cost per
    # fetch grows with every record batch it holds (docs/performance.md, item 29). In a run of a few
    # seconds the first half also holds the pipeline filling up, so it reads a little low.
    broker_cpu_s_halves: tuple[float, float] | None = None
    # Notification's recording of each email the SMTP server accepted (a transaction per email, so a
    # crash repeats at most one per connection): (seconds spent, emails), from its /metrics.
    email_records: tuple[float, int] | None = None

    def cpu_ms_per_request(self) -> dict[str, float]:
        return {name: round(1000 * seconds / self.requests, 2) for name, seconds in self.cpu_s.items()}

    def broker_ms_per_request_halves(self) -> list[float] | None:
        if self.broker_cpu_s_halves is None:
            return None
        first = self.requests // 2
        return [round(1000 * self.broker_cpu_s_halves[0] / max(first, 1), 2),
                round(1000 * self.broker_cpu_s_halves[1] / max(self.requests - first, 1), 2)]

    def email_record_ms(self) -> float | None:
        """Mean milliseconds to record one accepted email as sent."""
        if not self.email_records or not self.email_records[1]:
            return None
        return round(1000 * self.email_records[0] / self.email_records[1], 2)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


@dataclass
class ProcessUsage:
    cpu_seconds: float
    peak_rss_mb: float


@dataclass
class BenchResult:
    burst: Measured
    paced: Measured | None
    baseline_per_s: float
    usage: dict[str, ProcessUsage] = field(default_factory=dict)
    # The run's other processes (load generator, sandboxes, SMTP sink): not cancelflow's cost, but they
    # share the machine's cores with it.
    harness: dict[str, ProcessUsage] = field(default_factory=dict)
    store: str = "sqlite"
    broker: str = "embedded"  # CANCELFLOW_BROKER: the embedded broker or Apache Kafka
    instances: int = 1
    fetch_wait_ms: int | None = None  # the services' CANCELFLOW_FETCH_MAX_WAIT_MS
    violations: dict[str, list[str]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)  # `machine()`, with the reference at the start and end

    def summary(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "store": self.store,
            "broker": self.broker,
            "instances": self.instances,
            "fetch_wait_ms": self.fetch_wait_ms,
            "requests": self.burst.requests,
            "correct": not self.violations,
            "violations": {k: v[:3] for k, v in self.violations.items()},
            "throughput_per_s": round(self.burst.per_second, 1),
            "baseline_per_s": round(self.baseline_per_s, 1),
            "ratio": round(self.burst.per_second / self.baseline_per_s, 3) if self.baseline_per_s else None,
            "p50_ms": round(self.burst.percentile(50), 1),
            "p95_ms": round(self.burst.percentile(95), 1),
            "p99_ms": round(self.burst.percentile(99), 1),
            "p50_ms_paced": round(self.paced.percentile(50), 1) if self.paced else None,
            "p95_ms_paced": round(self.paced.percentile(95), 1) if self.paced else None,
            "p99_ms_paced": round(self.paced.percentile(99), 1) if self.paced else None,
            "rss_mb": {name: round(u.peak_rss_mb, 1) for name, u in self.usage.items()},
            "cpu_s": {name: round(u.cpu_seconds, 2) for name, u in self.usage.items()},
            "cpu_s_harness": {name: round(u.cpu_seconds, 2) for name, u in self.harness.items()},
            # Per request, every process (harness included): small batches cost more than a burst's.
            "cpu_ms_per_request": self.burst.cpu_ms_per_request(),
            "cpu_ms_per_request_paced": self.paced.cpu_ms_per_request() if self.paced else None,
            "broker_ms_per_request_paced_halves": self.paced.broker_ms_per_request_halves() if self.paced else None,
            "email_record_ms": self.burst.email_record_ms(),
            "email_record_ms_paced": self.paced.email_record_ms() if self.paced else None,
            "steps_ms": {step: round(ms, 1) for step, ms in self.burst.steps_ms.items()},
            "steps_ms_paced": {step: round(ms, 1) for step, ms in self.paced.steps_ms.items()} if self.paced else None,
        }


# --- the machine ---------------------------------------------------------------------------------


def reference_us(units: int = 200, repeat: int = 5) -> float:
    """How fast this machine runs Python now: microseconds per unit of a fixed piece of standard-library
    work (build a small record, encode it as JSON, parse it back, sort its keys), the best of `repeat`.
    It does not depend on cancelflow's code, so it compares machines, and minutes of one machine (a
    virtual machine's speed drifts), across releases. Taken before and after the runs, with the garbage
    collector off: after the runs this process holds every status record it read, and a collection
    walking them would be timed too."""
    def unit(n: int) -> None:
        record = {f"field_{i}": [n, str(i) * 3, {"at": i * 1.5, "ok": i % 2 == 0}] for i in range(20)}
        sorted(json.loads(json.dumps(record)))

    best = float("inf")
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            for n in range(units):
                unit(n)
            best = min(best, time.perf_counter() - started)
    finally:
        if collecting:
            gc.enable()
    return round(best / units * 1e6, 1)


def machine() -> dict[str, Any]:
    """What the figures were taken on: cores, processor, Python, and `reference_us` now."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    memory_kb = _kb(_read_lines("/proc/meminfo"), "MemTotal:")
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(memory_kb / 1024 ** 2, 1),
            "python": platform.python_version(), "reference_us": [reference_us()]}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _kb(lines: list[str], key: str) -> int:
    """The value of a `key  N kB` line of a /proc file (/proc/meminfo, /proc/PID/status); 0 without one."""
    return next((int(line.split()[1]) for line in lines if line.startswith(key)), 0)


# --- process usage, from /proc -------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    return _kb(Path(f"/proc/{pid}/status").read_text().splitlines(), "VmHWM:") / 1024


def _usage_since(pids: dict[str, int], cpu_before: dict[str, float]) -> dict[str, ProcessUsage]:
    return {name: ProcessUsage(cpu_seconds(pid) - cpu_before[name], _peak_rss_mb(pid)) for name, pid in pids.items()}


BROKER = "broker"  # the embedded broker (Tansu), or Apache Kafka (node 1)


# The stack's processes that are not services, by what their command line holds.
HARNESS = {b"-m cancelflow_tools.smtp_sink ": "SMTP sink", b"-m cancelflow_tools.sandboxes vendor ": "vendor sandbox",
           b"-m cancelflow_tools.sandboxes gateway ": "gateway sandbox", b"-m cancelflow_tools up ": "stack supervisor"}
LOAD_GENERATOR = "bench (load generator)"


def harness_pids(stack: StackProcess, services: dict[str, int]) -> dict[str, int]:
    """This process (it sends the requests and follows the status topic) and the stack's processes that
    are not services or the broker: sandboxes, SMTP sink, supervisor."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int(_stat(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
    assert stack.supervisor_pid is not None
    family = {stack.supervisor_pid}
    while more := {pid for pid, parent in parents.items() if parent in family} - family:
        family |= more
    pids = {LOAD_GENERATOR: os.getpid()}
    for pid in sorted(family - set(services.values())):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        name = next((label for needle, label in HARNESS.items() if needle in command), None)
        if name is not None and name not in pids:
            pids[name] = pid
    return pids


def service_pids(stack: StackProcess) -> dict[str, int]:
    """Every service's process, and the broker's: its CPU is part of what a request costs."""
    pids = {name: pid for name in SERVICES if (pid := stack.service_pid(name)) is not None}
    if (broker := stack.broker_pid()) is not None:
        pids[BROKER] = broker
    return pids


# --- the system ----------------------------------------------------------------------------------


class Timer:
    """Send times per request, and the moment each one was done (terminal, with its email)."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.sent_wall_ms: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.changed = asyncio.Event()

    def observe(self, status: dict[str, Any]) -> None:
        request_id = status["request_id"]
        if request_id in self.sent and request_id not in self.done and is_terminal(status) and (
                status["state"] != "completed" or email_count(status) >= 1):
            self.done[request_id] = time.perf_counter()
            self.changed.set()


async def _run(client: StackClient, watcher: StatusWatcher, timer: Timer, samples: list[Any],
               rate: float | None, progress: Callable[[int], None],
               mark: Callable[[], None] | None = None) -> Measured:
    """Send `samples` (at `rate` a second, or as fast as possible) and wait until every one is terminal.
    `mark` is called when half of them have been sent and again when the last one has."""
    started = time.perf_counter()
    for n, sample in enumerate(samples):
        if rate:
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        if mark is not None and n == len(samples) // 2:
            mark()
        request_id = str(uuid.uuid4())
        timer.sent[request_id] = time.perf_counter()
        timer.sent_wall_ms[request_id] = time.time() * 1000
        await client.request_cancellation(account_id=sample.facts.account_id,
                                          subscription_id=sample.facts.subscription_id,
                                          request_id=uuid.UUID(request_id), wait=False)
    await client.publisher.flush()
    if mark is not None:
        mark()
    ids = list(timer.sent)[-len(samples):]
    while True:
        finished = sum(1 for r in ids if r in timer.done)
        progress(finished)
        if finished == len(ids):
            break
        timer.changed.clear()
        try:
            await asyncio.wait_for(timer.changed.wait(), 120)
        except TimeoutError:
            raise RuntimeError(f"{len(ids) - finished} requests did not finish within 120 s of no progress") from None
    latencies = [(timer.done[r] - timer.sent[r]) * 1000 for r in ids]
    return Measured(len(ids), max(timer.done[r] for r in ids) - min(timer.sent[r] for r in ids), latencies)


async def step_times(bootstrap: str, settings: Any, sent_wall_ms: dict[str, float]) -> dict[str, float]:
    """Where a request's time goes: the median, over the given requests, of the time from each saga event
    to the next one (record timestamps, set when the producing service's relay sent it), and from the
    send to the first. Read back from the saga topic after the run."""
    stamps: dict[str, list[tuple[int, str]]] = {rid: [] for rid in sent_wall_ms}
    for record in await read_all(bootstrap, topics.SAGA, settings):
        envelope = orjson.loads(record.value)
        rid = envelope.get("payload", {}).get("request_id")
        if rid in stamps:
            stamps[rid].append((record.timestamp, envelope["event_type"]))
    gaps: dict[str, list[float]] = {}
    for rid, events in stamps.items():
        events.sort()
        previous = (sent_wall_ms[rid], "sent")
        for at, event_type in events:
            gaps.setdefault(f"{previous[1]} -> {event_type}", []).append(at - previous[0])
            previous = (at, event_type)
    return {step: statistics.median(values) for step, values in gaps.items() if len(values) * 2 >= len(stamps)}


async def email_records(client: StackClient) -> tuple[float, int]:
    """(seconds, emails) the (first) notification process spent recording accepted emails as sent."""
    _, text = await client.get_json(f"{client.endpoints.notification}/metrics")
    found = {sample.name: sample.value for family in text_string_to_metric_families(text)
             if family.name == "cancelflow_email_record_seconds" for sample in family.samples}
    return found.get("cancelflow_email_record_seconds_sum", 0.0), int(found.get("cancelflow_email_record_seconds_count", 0))


def _since(before: tuple[float, int], after: tuple[float, int]) -> tuple[float, int]:
    return after[0] - before[0], after[1] - before[1]


async def scale_out(stack: StackProcess, instances: int, timeout_s: float = 180) -> list[subprocess.Popen[bytes]]:
    """`instances - 1` more processes of every service (same databases, same consumer groups), returned
    once every group has that many members and is stable again."""
    extra = [stack.start_extra_instance(name) for name in SERVICES for _ in range(instances - 1)]
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.endpoints.bootstrap, **client_security(stack.settings))
    await admin.start()
    try:
        groups = [f"cancelflow-{name}" for name in SERVICES]
        deadline = time.monotonic() + timeout_s
        while True:
            # One group per request: the embedded broker closes the connection on a request for several.
            described = [g for group in groups for response in await admin.describe_consumer_groups([group])
                         for g in response.groups]
            if all(g[2] == "Stable" and len(g[5]) >= instances for g in described) and len(described) == len(groups):
                return extra
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumer groups did not reach {instances} members: "
                                   f"{[(g[1], g[2], len(g[5])) for g in described]}")
            await asyncio.sleep(0.5)  # polling the broker's view of the groups
    finally:
        await admin.close()


async def check_results(stack: StackProcess, client: StackClient, accepted: set[str]) -> invariants.Report:
    """The reliability checker over what the run left: topics, sandbox ledgers, mailbox, databases."""
    mails = read_mailbox(stack.data_dir / "mail")
    evidence = await invariants.collect(client, mails, stack.database_urls())
    return invariants.check(evidence, invariants.Expectations(accepted=accepted))


@dataclass
class SystemRun:
    burst: Measured
    paced: Measured | None
    usage: dict[str, ProcessUsage]  # cancelflow's processes (services, broker), during the burst
    harness: dict[str, ProcessUsage]  # the run's other processes, during the burst
    report: invariants.Report


async def measure_system(stack: StackProcess, requests: int, paced_rate: float, paced_requests: int,
                         console: Console, instances: int = 1
                         ) -> SystemRun:
    account = f"acct-bench-{uuid.uuid4().hex[:6]}"
    today = datetime.now(UTC).date()
    samples = [sample_subscription(account_id=account, subscription_id=f"bench-{account[-6:]}-{n}", today=today)
               for n in range(requests + paced_requests)]
    timer = Timer()
    extra: list[subprocess.Popen[bytes]] = []
    try:
        return await _measure(stack, samples, timer, extra, requests, paced_rate, paced_requests, console, instances)
    finally:
        for process in extra:
            process.terminate()
        for process in extra:
            process.wait(30)


async def _measure(stack: StackProcess, samples: list[Any], timer: Timer, extra: list[subprocess.Popen[bytes]],
                   requests: int, paced_rate: float, paced_requests: int, console: Console, instances: int
                   ) -> SystemRun:
    async with StackClient(stack.endpoints, stack.settings) as client, \
            StatusWatcher(stack.endpoints.bootstrap, from_beginning=False, settings=stack.settings,
                          on_record=timer.observe) as watcher:
        with progress_bar(console) as bar:
            task = bar.add_task("loading subscriptions and charges", total=len(samples))
            for start in range(0, len(samples), 100):
                await client.load(samples[start:start + 100], timeout=300)
                bar.update(task, completed=min(len(samples), start + 100))
            pids = service_pids(stack)
            if instances > 1:
                with console.status(f"starting {instances - 1} more instance(s) of every service, waiting for "
                                    "their consumer groups to settle ..."):
                    extra += await scale_out(stack, instances)
                names = [f"{name}#{n}" for name in SERVICES for n in range(2, instances + 1)]
                pids.update(zip(names, (process.pid for process in extra), strict=True))
            harness = harness_pids(stack, pids)
            everyone = pids | harness
            cpu_before = {name: cpu_seconds(pid) for name, pid in everyone.items()}
            records_before = await email_records(client)
            task = bar.add_task(f"{requests} cancellations, as fast as possible", total=requests)
            burst = await _run(client, watcher, timer, samples[:requests], None,
                               lambda n: bar.update(task, completed=n))
            records_after = await email_records(client)
            burst.email_records = _since(records_before, records_after)
            usage, harness_usage = _usage_since(pids, cpu_before), _usage_since(harness, cpu_before)
            burst.cpu_s = {name: u.cpu_seconds for name, u in (usage | harness_usage).items()}
            paced = None
            if paced_requests:
                task = bar.add_task(f"{paced_requests} cancellations at {paced_rate:g}/s", total=paced_requests)
                cpu_before = {name: cpu_seconds(pid) for name, pid in everyone.items()}
                broker_at = [cpu_before[BROKER]] if BROKER in everyone else None

                def mark() -> None:
                    if broker_at is not None:
                        broker_at.append(cpu_seconds(everyone[BROKER]))

                paced = await _run(client, watcher, timer, samples[requests:], paced_rate,
                                   lambda n: bar.update(task, completed=n), mark)
                paced.cpu_s = {name: u.cpu_seconds for name, u in _usage_since(everyone, cpu_before).items()}
                paced.email_records = _since(records_after, await email_records(client))
                if broker_at is not None and len(broker_at) == 3:
                    start, half, last = broker_at
                    paced.broker_cpu_s_halves = (half - start, last - half)
            for name, pid in pids.items():
                usage[name].peak_rss_mb = max(usage[name].peak_rss_mb, _peak_rss_mb(pid))
        with console.status("checking every invariant over the run's topics, ledgers, mailbox and databases ..."):
            report = await check_results(stack, client, set(timer.sent))
    burst_ids = list(timer.sent)[:requests]
    burst.steps_ms = await step_times(stack.endpoints.bootstrap, stack.settings,
                                      {rid: timer.sent_wall_ms[rid] for rid in burst_ids})
    if paced is not None:
        paced.steps_ms = await step_times(stack.endpoints.bootstrap, stack.settings,
                                          {rid: timer.sent_wall_ms[rid] for rid in list(timer.sent)[requests:]})
    return SystemRun(burst, paced, usage, harness_usage, report)



# --- the bare broker -----------------------------------------------------------------------------


async def measure_baseline(bootstrap: str, messages: int, hops: int = HOPS) -> float:
    """Messages per second through `hops` plain aiokafka relays (consume, produce), no database or I/O."""
    tag = uuid.uuid4().hex[:6]
    names = [f"bench.{tag}.hop{i}" for i in range(hops + 1)]
    await create_topics(bootstrap, tuple(Topic(n, 4, "key", "bench", "bench") for n in names))
    payload = b'{"event_type":"Bench","payload":{"request_id":"' + b"x" * 36 + b'"}}' + b" " * 300

    async def relay(source: str, target: str) -> None:
        consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=f"relay-{source}",
                                    auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=25)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
        await consumer.start()
        await producer.start()
        # What every cancelflow consumer does, so the relays cannot lose a record either (off on Kafka).
        gaps = GapGuard(grace_s=CommonSettings().offset_gap_grace_ms / 1000)
        try:
            while True:
                batch = await gaps.check(consumer, await consumer.getmany(timeout_ms=200))
                futures = [await producer.send(target, r.value, key=r.key) for rs in batch.values() for r in rs]
                await asyncio.gather(*futures)
                if batch:
                    await consumer.commit()
        finally:
            await consumer.stop()
            await producer.stop()

    relays = [asyncio.create_task(relay(names[i], names[i + 1])) for i in range(hops)]
    sink = AIOKafkaConsumer(names[-1], bootstrap_servers=bootstrap, group_id=f"sink-{tag}",
                            auto_offset_reset="earliest", fetch_max_wait_ms=25)
    await sink.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        # Warm up: every group joined and moving before the clock starts.
        await producer.send_and_wait(names[0], payload, key=b"warm")
        await _receive(sink, 1)
        started = time.perf_counter()
        for n in range(messages):
            await producer.send(names[0], payload, key=str(n).encode())
        await producer.flush()
        await _receive(sink, messages)
        return messages / (time.perf_counter() - started)
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await producer.stop()
        await sink.stop()


async def _receive(consumer: AIOKafkaConsumer, count: int) -> None:
    received, gaps = 0, GapGuard()
    while received < count:
        batch = await gaps.check(consumer, await consumer.getmany(timeout_ms=200))
        received += sum(len(rs) for rs in batch.values())


# --- the report ----------------------------------------------------------------------------------


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def render(result: BenchResult, console: Console) -> None:
    s = result.summary()
    box = result.machine
    caption = (f"on {box['cores']} cores ({box['cpu']}, {box['memory_gib']} GiB), Python {box['python']}; "
               f"reference {' then '.join(map(str, box['reference_us']))} µs (bench.reference_us: lower is faster)"
               if box else None)
    broker = "Apache Kafka" if result.broker == "kafka" else "embedded broker"
    table = Table(title=f"cancelflow bench ({broker}, {result.store} stores, {result.instances} instance(s) of each service, "
                        f"{s['requests']} requests, fetch wait {s['fetch_wait_ms']} ms)", caption=caption)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = [
        ("completed cancellations per second (refund + email)", f"{s['throughput_per_s']}", ">= 300"),
        (f"bare broker, {HOPS} relay hops, messages per second", f"{s['baseline_per_s']}", ""),
        ("ratio to the bare broker", f"{s['ratio']}", ""),
        ("latency p50 / p95 / p99, as fast as possible (ms)", f"{s['p50_ms']} / {s['p95_ms']} / {s['p99_ms']}", ""),
        ("latency p50 / p95 / p99, paced (ms)", f"{s['p50_ms_paced']} / {s['p95_ms_paced']} / {s['p99_ms_paced']}",
         "p99 <= 1000"),
        ("email recorded as sent, ms per email (its own transaction): burst / paced",
         f"{s['email_record_ms']} / {s['email_record_ms_paced']}", ""),
        ("broker CPU ms/request, paced: first / second half",
         " / ".join(map(str, s["broker_ms_per_request_paced_halves"] or ["-"])), ""),
        ("invariant violations (reliability checker)",
         str(sum(len(v) for v in result.violations.values())) + (f" {s['violations']}" if s["violations"] else ""), "0"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    usage = Table(title="per process", caption="dim: the harness (load generator, sandboxes, SMTP sink), sharing "
                                               "the cores but not part of what a request costs")
    for column in ("process", "CPU s, burst", "CPU ms/request, burst / paced", "peak RSS MB"):
        usage.add_column(column, justify="right" if column != "process" else "left")
    burst_ms, paced_ms = s["cpu_ms_per_request"], s["cpu_ms_per_request_paced"] or {}
    # The harness shares the cores but is not part of what a request costs: shown dim.
    for name, u, style in [*((n, u, "") for n, u in sorted(result.usage.items())),
                           *((n, u, "dim") for n, u in sorted(result.harness.items()))]:
        per_request = f"{burst_ms[name]:.2f} / " + (f"{paced_ms[name]:.2f}" if name in paced_ms else "-")
        rss = f"{u.peak_rss_mb:.1f}" + (" [red]> 150[/]" if u.peak_rss_mb > 150 and not style else "")
        usage.add_row(name, f"{u.cpu_seconds:.2f}", per_request, rss,
                      style=style or None)
    usage.add_row("total", f"{sum(result.burst.cpu_s.values()):.2f}",
                  f"{sum(burst_ms.values()):.1f} / " + (f"{sum(paced_ms.values()):.1f}" if paced_ms else "-"), "",
                  style="bold")
    console.print(usage)
    steps = Table(title="median time per step (ms): where a request's time goes")
    for column in ("step", "burst", "paced"):
        steps.add_column(column, justify="right" if column != "step" else "left")
    paced_steps = result.paced.steps_ms if result.paced else {}
    for step, ms in result.burst.steps_ms.items():
        steps.add_row(step, f"{ms:.0f}", f"{paced_steps[step]:.0f}" if step in paced_steps else "")
    console.print(steps)
