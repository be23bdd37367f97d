"""Sandbox endpoints and fault hooks are off unless explicitly enabled, and everything binds to
loopback unless told otherwise (production containers opt in with CANCELFLOW_HTTP_HOST=0.0.0.0)."""

from __future__ import annotations

import pytest

from cancelflow.settings import CommonSettings
from cancelflow_tools.services import service_settings
from cancelflow_tools.smtp_sink import DEFAULT_HOST as SMTP_SINK_HOST

HOOK_ENV = ("CANCELFLOW_ENABLE_FAULT_HOOKS", "CANCELFLOW_HTTP_HOST")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HOOK_ENV:
        monkeypatch.delenv(name, raising=False)


def _routes(runtime) -> set[str]:  # type: ignore[no-untyped-def]
    return {route.resource.canonical for route in runtime.http.router.routes()}


def test_settings_default_to_no_hooks_and_loopback(clean_env: None) -> None:
    assert CommonSettings().enable_fault_hooks is False
    assert service_settings("billing").http_host == "127.0.0.1"
    assert SMTP_SINK_HOST == "127.0.0.1"


async def test_billing_has_no_fault_or_clock_hook_unless_enabled(clean_env: None, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from billing.bootstrap import build

    runtime = build()
    assert not {"/_faults", "/_clock"} & _routes(runtime)
    await runtime.producer.client.close()
    monkeypatch.setenv("CANCELFLOW_ENABLE_FAULT_HOOKS", "1")
    enabled = build()
    assert {"/_faults", "/_clock"} <= _routes(enabled)
    await enabled.producer.client.close()


def test_sandboxes_bind_loopback_by_default() -> None:
    from cancelflow_tools.sandboxes.__main__ import _parser as parser

    assert parser().parse_args(["vendor"]).host == "127.0.0.1"
