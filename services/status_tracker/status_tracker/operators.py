"""Who may use the status service (CONTRACT.md section 11): operators from CANCELFLOW_OPERATORS.

`name:role:token,...`, role `viewer` (reads) or `operator` (reads and acts). Unset, the service is open
(the embedded default before `cancelflow up` made an operator; tests of the read API).

A request proves who it is with `Authorization: Bearer <token>`. A browser cannot set that header on a
page load or an EventSource, so signing in (`POST /session` with the header) also sets an HttpOnly,
SameSite=Strict session cookie holding the token, which is accepted for reads (GET) only: an action
always needs the header, so a page of another site cannot act through the cookie. Tokens are compared
in constant time and never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web

COOKIE = "cf_session"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/inflight", "/metrics"})  # probes and the stop's drain: counts only


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"


@dataclass(frozen=True)
class Operator:
    name: str
    role: Role
    token: str

    def __repr__(self) -> str:  # never the token, whatever prints it
        return f"Operator(name={self.name!r}, role={self.role.value!r})"

    @property
    def may_act(self) -> bool:
        return self.role is Role.operator


# Where the middleware leaves the signed-in operator on the request.
OPERATOR_KEY = web.RequestKey("cf_operator", Operator)

# What an action is attributed to when no operators are configured (an open, embedded service).
ANONYMOUS = Operator("anonymous", Role.operator, "")


def parse_operators(value: str | None) -> list[Operator]:
    """`name:role:token,...`; raises ValueError (without echoing a token) on a malformed list."""
    operators: list[Operator] = []
    for number, item in enumerate((value or "").split(","), start=1):
        if not item.strip():
            continue
        parts = item.strip().split(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[2]:
            raise ValueError(f"CANCELFLOW_OPERATORS entry {number} is not name:role:token")
        name, role, token = parts
        if len(name) > 100:
            raise ValueError(f"CANCELFLOW_OPERATORS entry {number}: the name is longer than 100 characters")
        if role not in Role.__members__:
            raise ValueError(f"CANCELFLOW_OPERATORS entry {number} ({name}): role must be viewer or operator")
        if len(token) < 16:
            raise ValueError(f"CANCELFLOW_OPERATORS entry {number} ({name}): the token is shorter than 16 characters")
        if any(o.name == name for o in operators):
            raise ValueError(f"CANCELFLOW_OPERATORS names {name} twice")
        operators.append(Operator(name, Role(role), token))
    return operators


class Operators:
    def __init__(self, operators: list[Operator]) -> None:
        self._operators = operators

    @property
    def enabled(self) -> bool:
        return bool(self._operators)

    def by_token(self, token: str) -> Operator | None:
        """The operator holding `token`. Every configured token is compared, in constant time each, so
        the answer's timing says nothing about which one (or how much of one) matched."""
        found = None
        for operator in self._operators:
            if hmac.compare_digest(operator.token.encode(), token.encode()):
                found = operator
        return found

    def from_request(self, request: web.Request) -> Operator | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return self.by_token(token.strip())
        if request.method in ("GET", "HEAD") and (cookie := request.cookies.get(COOKIE)):
            return self.by_token(cookie)
        return None


def operator_of(request: web.Request) -> Operator:
    """The signed-in operator (ANONYMOUS when the service is open)."""
    return request.get(OPERATOR_KEY, ANONYMOUS)
