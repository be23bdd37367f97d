"""Every HTTP route of the sandboxes is described in the README (CONTRACT.md section 8 names only the
rules and the ledger; the capture endpoint the gateway sandbox learns charges from went unsaid)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cancelflow_tools.sandboxes.gateway import build_gateway_app
from cancelflow_tools.sandboxes.vendor import build_vendor_app

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"### {title}\n")
    following = re.search(r"^##+ ", README[start + 4:], flags=re.MULTILINE)
    return README[start:start + 4 + following.start()] if following else README[start:]


def _routes(app) -> set[str]:  # type: ignore[no-untyped-def]
    return {f"{route.method} {route.resource.canonical}" for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None}


@pytest.mark.parametrize("build", [build_vendor_app, build_gateway_app], ids=["vendor", "gateway"])
def test_every_sandbox_route_is_in_the_readme(build) -> None:  # type: ignore[no-untyped-def]
    documented = _section("The sandboxes")
    missing = sorted(route for route in _routes(build()) if f"`{route}`" not in documented)
    assert not missing, f"not described in README.md, 'The sandboxes': {missing}"


def test_the_readme_says_where_the_gateway_sandbox_learns_charges() -> None:
    documented = _section("The sandboxes")
    assert "only through `POST /v1/charges`" in documented and "does not read `payments.charges`" in documented
