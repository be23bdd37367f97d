"""A small asyncio process supervisor: start, wait until ready, restart on crash, stop in reverse order.

Each child runs in its own process group (so a terminal's Ctrl-C reaches only the supervisor, which then
stops the children in order) with stdout and stderr appended to its log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from rich.console import Console
from rich.markup import escape


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised process.

    `env` is the child's whole environment (None: inherit ours). `ready_url` is polled until it answers:
    `http://...` must return 200 to a GET, `tcp://host:port` must accept a connection; None means
    ready as soon as it is started.
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    ready_url: str | None = None
    log_file: Path | None = None


class NotReadyError(RuntimeError):
    """A process did not become ready in time."""


@dataclass
class _Child:
    spec: ProcessSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    task: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        ready_timeout: float = 60.0,
        grace: float = 10.0,
        backoff_initial: float = 0.25,
        backoff_cap: float = 10.0,
        stable_after: float = 30.0,
        console: Console | None = None,
        on_restart: Callable[[str, int], None] | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate process names in {names}")
        self._children = {s.name: _Child(s) for s in specs}
        self.ready_timeout, self.grace = ready_timeout, grace
        self.backoff_initial, self.backoff_cap, self.stable_after = backoff_initial, backoff_cap, stable_after
        self.console = console or Console(stderr=True)
        self.on_restart = on_restart
        self._stopping = asyncio.Event()

    # -- queries -------------------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        proc = self._children[name].proc
        return proc.pid if proc and proc.returncode is None else None

    def restart_count(self, name: str) -> int:
        return self._children[name].restarts

    @property
    def names(self) -> list[str]:
        return list(self._children)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every process (in order) and wait until all are ready; raise NotReadyError otherwise."""
        for child in self._children.values():
            await self._spawn(child)
            child.task = asyncio.create_task(self._watch(child), name=f"supervise-{child.spec.name}")
        await self.wait_ready()

    async def wait_ready(self, names: Sequence[str] | None = None, *, within: float | None = None) -> None:
        """Wait until the named processes (default: all) answer on their ready_url."""
        within = self.ready_timeout if within is None else within
        children = [self._children[n] for n in (names or self._children)]
        await asyncio.gather(*(self._wait_ready(c, within) for c in children))

    async def stop(self) -> None:
        """SIGTERM every process group (reverse order), wait up to `grace`, then SIGKILL what is left."""
        self._stopping.set()
        children = list(self._children.values())[::-1]
        for child in children:
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for child in children:
            if child.proc is None:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), timeout=max(deadline - time.monotonic(), 0))
            if child.proc.returncode is None:
                self.console.print(
                    f"[red]{child.spec.name}[/] did not stop within {self.grace:.0f}s: SIGKILL"
                )
                await self._kill(child)
        for child in children:
            if child.task:
                await child.task
            await self._kill(child)  # a restart that raced with stop() leaves a fresh process behind

    async def __aenter__(self) -> Supervisor:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals -----------------------------------------------------------------------------------

    async def _spawn(self, child: _Child) -> None:
        spec = child.spec
        log_path = spec.log_file or Path(os.devnull)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            if spec.log_file:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
                log.write(f"--- {stamp} supervisor starting {spec.name}: {' '.join(spec.argv)}\n".encode())
                log.flush()
            child.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=dict(spec.env) if spec.env is not None else None,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    async def _watch(self, child: _Child) -> None:
        """Wait for the process to exit; unless we are stopping, restart it with exponential backoff."""
        backoff = self.backoff_initial
        while True:
            started = time.monotonic()
            returncode = await child.proc.wait()
            if self._stopping.is_set():
                return
            uptime = time.monotonic() - started
            if uptime >= self.stable_after:
                backoff = self.backoff_initial
            self.console.print(
                f"[yellow]restart[/] {child.spec.name} exited with {returncode} after {uptime:.1f}s; "
                f"restarting in {backoff:.2f}s (restart #{child.restarts + 1})",
                soft_wrap=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
                return  # stop() was called during the backoff
            backoff = min(backoff * 2, self.backoff_cap)
            try:
                await self._spawn(child)
            except OSError as exc:  # the old, exited process stays in place: the loop backs off again
                self.console.print(f"[red]restart[/] {child.spec.name} failed to start: {escape(str(exc))}")
                continue
            child.restarts += 1
            if self.on_restart:
                self.on_restart(child.spec.name, child.restarts)

    async def _wait_ready(self, child: _Child, within: float) -> None:
        url = child.spec.ready_url
        if url is None:
            return
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while time.monotonic() < deadline:
                if child.proc is not None and child.proc.returncode is None and await _probe(session, url):
                    return
                await asyncio.sleep(0.1)
        raise NotReadyError(
            f"{child.spec.name} was not ready at {url} within {within:.0f}s "
            f"(log: {child.spec.log_file}):\n{_tail(child.spec.log_file)}"
        )

    @staticmethod
    def _signal(child: _Child, signum: int) -> None:
        # Only a live child: a reaped pid may already belong to someone else. The group id is the
        # child's pid (start_new_session), so its own children get the signal too.
        if child.proc is None or child.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signum)

    async def _kill(self, child: _Child) -> None:
        if child.proc is not None and child.proc.returncode is None:
            self._signal(child, signal.SIGKILL)
            await child.proc.wait()


async def _probe(session: aiohttp.ClientSession, url: str) -> bool:
    parts = urlsplit(url)
    try:
        if parts.scheme == "tcp":
            _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), 1.0)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        async with session.get(url) as response:
            return response.status == 200
    except (OSError, TimeoutError, aiohttp.ClientError):
        return False


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
