"""A subscription as the services that own it see it (the support runbook's step 7: "double check
that the billing has been cancelled"), for `GET /subscriptions/{id}` and its dashboard page.

Each part comes from its owner's read-only HTTP view, never from another service's database: billing
(status, provisioning status, history, billings), provisioning (vendor operations), payment-gateway
(charges and refunds), and the tracker's own requests. A part whose owner does not answer says so;
the rest is still shown."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from cancelflow.logging import get_logger
from cancelflow.settings import CommonSettings
from status_tracker.projection import Query, ReadModel

log = get_logger(__name__)
# The services whose read-only views make a subscription's page: (env prefix, default HTTP port).
OWNERS = {"billing": ("BILLING", 8081), "provisioning": ("PROVISIONING", 8082),
          "payment_gateway": ("PAYMENT_GATEWAY", 8083)}
TIMEOUT_S = 5.0


def owner_urls(settings: CommonSettings, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`<SERVICE>_API_URL` (e.g. `http://billing:8081` in a cluster), else the service's HTTP port on
    this host (the embedded stack)."""
    env = os.environ if env is None else env
    urls = {}
    for service, (prefix, port) in OWNERS.items():
        given = getattr(settings, f"{service}_api_url")
        urls[service] = (given or f"http://127.0.0.1:{env.get(f'{prefix}_HTTP_PORT', port)}").rstrip("/")
    return urls


class SubscriptionViews:
    def __init__(self, read_model: ReadModel, urls: dict[str, str]) -> None:
        self._read_model = read_model
        self._urls = urls
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S), trust_env=False)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def view(self, subscription_id: str) -> dict[str, Any]:
        sid = quote(subscription_id, safe="")
        billing, provisioning, payments = await asyncio.gather(
            self._get("billing", f"/subscriptions/{sid}"),
            self._get("provisioning", f"/subscriptions/{sid}/operations"),
            self._get("payment_gateway", f"/subscriptions/{sid}/charges"))
        requests, _ = await self._read_model.search(Query(subscription_id=subscription_id, limit=100))
        return {
            "subscription_id": subscription_id,
            "billing": billing, "provisioning": provisioning, "payments": payments,
            "requests": [{k: r.get(k) for k in ("request_id", "state", "mode", "created_at", "updated_at",
                                                "retry_of", "resolution", "refund", "error")} for r in requests],
        }

    async def _get(self, service: str, path: str) -> dict[str, Any]:
        """The owner's answer, `{"unknown": true}` on 404, or `{"unavailable": "<why>"}`."""
        assert self._http is not None, "not started"
        try:
            async with self._http.get(self._urls[service] + path) as response:
                if response.status == 404:
                    return {"unknown": True}
                if response.status != 200:
                    return {"unavailable": f"HTTP {response.status}"}
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("a subscription view's owner did not answer", service=service, error=repr(exc))
            return {"unavailable": type(exc).__name__}
