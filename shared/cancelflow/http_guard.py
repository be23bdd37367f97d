"""Who may talk to our HTTP ports from a browser: a check of `Origin` and `Host` on every app.

A web page open while the stack runs can send a "simple" cross-origin request (a `text/plain` POST)
to 127.0.0.1, or rebind its own name to 127.0.0.1 and read the answers. So:

- a request that changes something (anything but GET, HEAD, OPTIONS) with an `Origin` header is taken
  only from a page this port served under an allowed name (browsers send `Origin` on such requests;
  the CLI, the tests and the services' own clients send none);
- with `check_host`, every request but the operations routes (probes and Prometheus, which address a
  service by its name or pod IP) must name an allowed `Host` (no DNS rebinding).

Allowed: loopback names, the address the port is bound to (unless a wildcard), and
`CANCELFLOW_ALLOWED_HOSTS` (comma-separated names; `*` allows any host, e.g. behind a proxy that checks).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
OPERATIONS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY = "*"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_hosts(bind_host: str, configured: str | None = None) -> frozenset[str]:
    names = {name.strip().lower() for name in (configured or "").split(",") if name.strip()}
    if bind_host not in WILDCARDS:
        names.add(bind_host.lower())
    return LOOPBACK | names


def _hostname(netloc: str) -> str:
    """`example.com:8080` -> `example.com`, `[::1]:8080` -> `::1` (lower case)."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


def _forbidden(error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=403)


def guard(allowed: frozenset[str], *, check_host: bool = True) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The aiohttp middleware for `allowed` hosts."""
    any_host = ANY in allowed

    @web.middleware
    async def origin_and_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        if check_host and not any_host and request.path not in OPERATIONS_PATHS:
            host = _hostname(request.headers.get("Host", ""))
            if host not in allowed:
                return _forbidden("host_not_allowed", f"Host {host[:100]!r} is not one this service answers to "
                                                      "(CANCELFLOW_ALLOWED_HOSTS)")
        origin = request.headers.get("Origin")
        if origin is not None and request.method not in SAFE_METHODS and not _same_allowed_origin(origin, request):
            return _forbidden("origin_not_allowed", f"Requests from {origin[:100]!r} are not accepted")
        return await handler(request)

    def _same_allowed_origin(origin: str, request: web.Request) -> bool:
        """The page that sent it was served by this port (our own dashboard), under an allowed name."""
        _, sep, netloc = origin.partition("://")
        if not sep or netloc.lower() != request.headers.get("Host", "").lower():
            return False
        return any_host or _hostname(netloc) in allowed

    return origin_and_host
