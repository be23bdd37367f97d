"""`StackProcess`: the whole stack (`python -m cancelflow_tools up`, on the broker CANCELFLOW_BROKER names) as a
child process on free ports and a private data dir, for end-to-end tests, the benchmark and chaos runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cancelflow.settings import CommonSettings
from cancelflow_tools.ops import Endpoints
from cancelflow_tools.services import SERVICES
from cancelflow_tools.stack.broker import free_port, free_ports
from cancelflow_tools.stack.embedded import running_stack


class StackProcess:
    def __init__(self, data_dir: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        env = {k: v for k, v in os.environ.items() if not k.endswith("_DATABASE_URL")}
        # Every port distinct: the vendor sandbox and a service once drew the same one.
        names = ["CANCELFLOW_BROKER_PORT", "VENDOR_SANDBOX_PORT", "GATEWAY_SANDBOX_PORT", "SMTP_PORT",
                 *(f"{prefix}_HTTP_PORT" for prefix, _ in SERVICES.values())]
        env.update(zip(names, map(str, free_ports(len(names))), strict=True))
        env["CANCELFLOW_DATA_DIR"] = str(data_dir)
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        env.update(extra_env or {})
        if env.get("CANCELFLOW_BROKER", "embedded") == "embedded":
            # The embedded broker answers a fetch only when its wait ends; Kafka when a record arrives.
            env.setdefault("CANCELFLOW_FETCH_MAX_WAIT_MS", "25")
        self._configure(env)
        self.log = data_dir / "up.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}  # an attached stack's stack.json (`attach`)

    def _configure(self, env: dict[str, str]) -> None:
        self.env = env
        self.settings = CommonSettings(_env_file=None, **{k: v for k, v in env.items()})  # type: ignore[arg-type]
        self.endpoints = Endpoints.from_env(self.settings, env)

    @classmethod
    def attach(cls, env: dict[str, str] | None = None) -> StackProcess:
        """The stack `cancelflow up` already runs with this environment (its data dir, ports and
        settings): used as it is, and left running by `stop`."""
        stack = cls.__new__(cls)
        stack._configure(dict(os.environ if env is None else env))
        info = running_stack(stack.settings)
        if info is None:
            raise RuntimeError(f"no stack is running on {stack.settings.data_dir.resolve()}: start one with "
                               "`cancelflow up` (same environment), or leave out --running")
        stack.data_dir = Path(info["data_dir"])
        stack.log = stack.data_dir / "up.log"
        stack.process = None
        stack.info = info
        return stack

    @property
    def supervisor_pid(self) -> int | None:
        """The `cancelflow up` process: started here, or the one attached to."""
        if self.process is not None:
            return self.process.pid
        return int(self.info["pid"]) if self.info else None

    def start(self, timeout: float = 120) -> StackProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "cancelflow_tools", "up"], env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while running_stack(self.settings) is None:
                if self.process.poll() is not None:
                    raise RuntimeError(f"cancelflow up exited with {self.process.returncode}:\n{self.log.read_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stack not up within {timeout}s:\n{self.log.read_text()}")
                time.sleep(0.2)
        except BaseException:  # a timeout, or SIGTERM/Ctrl-C while it starts: nothing left running
            self.stop()
            raise
        # Every node of the broker it started (a Kafka cluster's), for clients that start later.
        info = running_stack(self.settings) or {}
        self.endpoints = dataclasses.replace(self.endpoints,
                                             bootstrap=info.get("bootstrap_servers", self.endpoints.bootstrap))
        return self

    def stop(self, timeout: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def database_urls(self) -> dict[str, str]:
        """Each service's database: its <SERVICE>_DATABASE_URL, else the SQLite file in the data dir."""
        return {service: self.env.get(f"{prefix}_DATABASE_URL")
                or f"sqlite+aiosqlite:///{(self.data_dir / f'{service}.db').resolve()}"
                for service, (prefix, _) in SERVICES.items()}

    def start_extra_instance(self, service: str) -> subprocess.Popen[bytes]:
        """Another instance of `service` (same database, same consumer group, its own HTTP port)."""
        prefix, _ = SERVICES[service]
        env = {**self.env, f"{prefix}_HTTP_PORT": str(free_port()), "CANCELFLOW_ENABLE_FAULT_HOOKS": "1",
               "KAFKA_BOOTSTRAP_SERVERS": self.endpoints.bootstrap}
        env.pop("CANCELFLOW_CRASH_POINTS", None)
        with open(self.data_dir / "logs" / f"{service}-extra.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-m", service], env=env, stdout=log, stderr=subprocess.STDOUT)

    def service_pid(self, service: str) -> int | None:
        """The pid a service reports on /healthz (None while it is down or restarting)."""
        prefix, default = SERVICES[service]
        url = f"http://127.0.0.1:{self.env.get(f'{prefix}_HTTP_PORT', default)}/healthz"
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as response:
                return int(json.loads(response.read())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def broker_pid(self) -> int | None:
        """The broker's pid (on a Kafka cluster, node 1's), found in /proc."""
        return self.broker_pids().get(1)

    def broker_pids(self) -> dict[int, int]:
        """Every broker process by node id: the embedded one by its listener address, Kafka's nodes by
        the server.properties under this stack's data dir."""
        tansu = f"127.0.0.1:{self.settings.broker_port}".encode()
        kafka = str((self.data_dir / "kafka").resolve()).encode()
        found = {}
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes()
            except OSError:
                continue
            if b"tansu" in argv and b"broker" in argv and tansu in argv:
                found[1] = int(cmdline.parent.name)
            elif b"kafka.Kafka\0" + kafka in argv:
                config = argv.rstrip(b"\0").split(b"\0")[-1]
                node = Path(config.decode()).parent.name
                found[int(node.removeprefix("node-")) if node.startswith("node-") else 1] = int(cmdline.parent.name)
        return found

    def service_log(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def __enter__(self) -> StackProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
