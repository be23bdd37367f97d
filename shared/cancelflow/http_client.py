"""What the vendor and gateway clients share: one aiohttp session, a timeout per call, a bounded
retry budget with full jitter (tenacity), and every exchange timed in
`cancelflow_external_call_seconds{target, operation, outcome}`.

An exchange never raises: it is an answer (status, JSON body, headers) or the reason there was none
(`timeout`, `unreachable`, `dropped`). What an answer *means* stays with each client.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_attempt,
    wait_random_exponential,
)

from cancelflow import metrics
from cancelflow.events import TEXT_CHARS

T = TypeVar("T")


@dataclass(frozen=True)
class Exchange:
    """One HTTP exchange: the answer, or why there was none (`timeout`, `dropped`, `unreachable`)."""

    status: int | None
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    failure: str | None = None
    detail: str = ""

    @property
    def answer_lost(self) -> bool:
        """The request may have reached the server and taken effect without us hearing back."""
        return self.failure in ("timeout", "dropped")

    @property
    def worth_retrying(self) -> bool:
        return self.failure is not None or (self.status or 0) >= 500


def json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object of a response body, its texts clipped (a vendor's error message goes into events
    and status records, which must fit a record), or {"message": what came instead}."""
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        body = None
    return _clipped(body) if isinstance(body, dict) else {"message": raw.decode("utf-8", "replace")[:500]}


def _clipped(value: Any) -> Any:
    if isinstance(value, str):
        return value[:TEXT_CHARS]
    if isinstance(value, dict):
        return {k: _clipped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clipped(v) for v in value]
    return value


def lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    # Header names are case-insensitive (and lower-case over HTTP/2).
    return {name.lower(): value for name, value in headers.items()}


class JsonApiClient:
    """`async with Client(url) as api`, or `start()`/`close()`. `target` names the API in metrics and
    messages ("vendor", "gateway")."""

    target = "api"

    def __init__(self, base_url: str, *, timeout: float = 5.0, attempts: int = 4, backoff_base: float = 0.2,
                 backoff_cap: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def with_retries(self, once: Callable[[], Awaitable[T]],
                           retry_when: Callable[[T], bool]) -> tuple[T, int]:
        """Run `once` until `retry_when` is false or the budget is spent; the last result and the count."""
        # Most calls succeed at once: only then is the retry machinery built (profiled: building it for
        # every call was a tenth of the payment gateway's time on its calls). The first answer is
        # handed to it as its first attempt, so the budget and the waits are the same either way.
        first = await once()
        if not retry_when(first):
            return first, 1
        answers = [first]
        attempts = 1

        async def counted() -> T:
            nonlocal attempts
            if answers:
                return answers.pop()
            attempts += 1
            return await once()

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            # Full jitter, so callers retrying the same server at once spread out.
            wait=wait_random_exponential(multiplier=self.backoff_base, max=self.backoff_cap),
            retry=retry_if_result(retry_when),
            retry_error_callback=_last_answer,
        )
        return await retrying(counted), attempts

    async def exchange(self, method: str, path: str, body: dict[str, Any] | None = None,
                       headers: dict[str, str] | None = None, *, operation: str) -> Exchange:
        started = time.perf_counter()
        exchange = await self._send(method, path, body, headers)
        metrics.EXTERNAL_CALL_SECONDS.labels(
            self.target, operation, metrics.call_outcome(exchange.status, exchange.failure)
        ).observe(time.perf_counter() - started)
        return exchange

    async def _send(self, method: str, path: str, body: dict[str, Any] | None,
                    headers: dict[str, str] | None) -> Exchange:
        await self.start()
        assert self._session is not None
        if body is not None:  # encoded with orjson: the standard encoder aiohttp's json= uses cost more
            headers = {"Content-Type": "application/json", **(headers or {})}
        try:
            async with self._session.request(method, self.base_url + path, headers=headers,
                                             data=None if body is None else orjson.dumps(body)) as response:
                return Exchange(response.status, json_object(await response.read()), lower_keys(response.headers))
        except TimeoutError:
            return Exchange(None, failure="timeout",
                            detail=f"The {self.target} did not answer within {self.timeout:g} s")
        except aiohttp.ClientConnectorError as exc:
            return Exchange(None, failure="unreachable", detail=f"Cannot reach the {self.target}: {exc}")
        except aiohttp.ClientError as exc:
            return Exchange(None, failure="dropped", detail=f"The connection to the {self.target} was lost "
                                                            f"before it answered ({type(exc).__name__})")


def _last_answer(state: RetryCallState) -> Any:
    """Out of budget: keep the last answer."""
    assert state.outcome is not None  # set by every attempt
    return state.outcome.result()
