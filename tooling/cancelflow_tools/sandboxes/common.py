"""What both sandboxes share: fault rules, the ledger, persistence and the request pipeline.

Every `/v1` call goes through `dispatch`: it is recorded in the ledger, matched against the fault rules
(the oldest matching rule wins) and only then handed to the sandbox's action. Actions are plain functions
of `(state, body) -> Reply` that raise `Reject` for an error answer; they never do I/O, so the in-memory
fakes of the service adapters reuse them and cannot drift from the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cancelflow.http_guard import LOOPBACK, guard

MATCH_FIELDS = ("vendor_subscription_id", "gateway_charge_id", "subscription_id")
DEFAULT_HANG_SECONDS = 30.0

State = dict[str, Any]


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- actions -------------------------------------------------------------------------------------


class Reject(Exception):
    """An error answer from an action; raised before the action changes any state."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


@dataclass
class Reply:
    status: int
    body: dict[str, Any]
    effects: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


Action = Callable[[State, dict[str, Any]], Reply]


def error_reply(status: int, error: str, message: str) -> Reply:
    return Reply(status, {"error": error, "message": message})


def run_action(action: Action, state: State, body: dict[str, Any]) -> Reply:
    """Run an action, turning a rejection or an invalid body into its error reply."""
    try:
        return action(state, body)
    except Reject as rejected:
        return error_reply(rejected.status, rejected.error, rejected.message)
    except ValidationError as invalid:
        return error_reply(422, "invalid_request", _describe(invalid))


def _describe(invalid: ValidationError) -> str:
    parts = (f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in invalid.errors())
    return "; ".join(parts)


# --- rules ---------------------------------------------------------------------------------------


class RuleMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vendor_subscription_id: str | None = None
    gateway_charge_id: str | None = None
    subscription_id: str | None = None

    @model_validator(mode="after")
    def _names_something(self) -> RuleMatch:
        if not self.model_dump(exclude_none=True):
            raise ValueError(f"match needs one of {', '.join(MATCH_FIELDS)}")
        return self


class RespondStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: int = Field(ge=400, le=599)
    error: str = ""


class RespondTimeout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: Literal[True]


class RespondDrop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    succeed_then_drop: Literal[True]


class RuleIn(BaseModel):
    match: RuleMatch
    respond: RespondStatus | RespondTimeout | RespondDrop
    times: int | None = Field(None, ge=1)


def rule_matches(rule: dict[str, Any], values: dict[str, str]) -> bool:
    return all(values.get(name) == wanted for name, wanted in rule["match"].items())


def fault_reply(respond: dict[str, Any]) -> Reply:
    """The answer of a `status` rule: its text as the message, a code a client can branch on."""
    status, text = respond["status"], respond.get("error", "")
    # A rule may name a code outright ("already_canceled"); free text gets the status's own name.
    looks_like_code = re.fullmatch(r"[a-z][a-z0-9_]*", text) is not None
    code = text if looks_like_code else _status_code_name(status)
    return error_reply(status, code, text or HTTPStatus(status).phrase)


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


# --- the sandbox ---------------------------------------------------------------------------------


SAVE_EVERY_S = 1.0


class StateFile:
    """JSON snapshot of a sandbox, replaced atomically so a crash never leaves half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return orjson.loads(self.path.read_bytes())

    def save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        # orjson: a long run's snapshot is megabytes, and the stdlib encoder took a third of the
        # gateway sandbox's CPU in a benchmark burst.
        tmp.write_bytes(orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS))
        os.replace(tmp, self.path)


class Sandbox:
    """State, rules and ledger of one sandbox; every change is made under `lock` and then saved."""

    def __init__(
        self,
        name: str,
        empty_state: Callable[[], State],
        *,
        state_file: Path | None = None,
        hang_seconds: float = DEFAULT_HANG_SECONDS,
    ) -> None:
        self.name = name
        self.hang_seconds = hang_seconds
        self.lock = asyncio.Lock()
        self._empty_state = empty_state
        self._closing = asyncio.Event()
        self._file = StateFile(state_file) if state_file else None
        self._dirty = False
        self._flush_handle: asyncio.TimerHandle | None = None
        self.data: dict[str, Any] = {
            "state": empty_state(),
            "rules": [],
            "calls": [],
            "effects": [],
            "seq": {},
        }
        loaded = self._file.load() if self._file else None
        if loaded:
            self.data.update(loaded)

    @property
    def state(self) -> State:
        return self.data["state"]

    def next_id(self, prefix: str) -> str:
        counters = self.data["seq"]
        counters[prefix] = counters.get(prefix, 0) + 1
        return f"{prefix}{counters[prefix]}"

    def save(self) -> None:
        """Mark the state changed; it is written at most once a second (and when the app stops).

        Writing the whole snapshot on every call made a long run quadratic (megabytes per call)."""
        if not self._file:
            return
        self._dirty = True
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(SAVE_EVERY_S, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if self._dirty and self._file:
            self._dirty = False
            self._file.save(self.data)

    def reset(self) -> None:
        """Forget calls, effects and state (rules stay: they are cleared on their own)."""
        self.data.update(state=self._empty_state(), calls=[], effects=[])

    def add_rule(self, rule: RuleIn) -> dict[str, Any]:
        stored = {
            "id": self.next_id("rule_"),
            "match": rule.match.model_dump(exclude_none=True),
            "respond": rule.respond.model_dump(),
            "times": rule.times,
            "remaining": rule.times,
            "hits": 0,
            "created_at": rfc3339(utc_now()),
        }
        self.data["rules"].append(stored)
        return stored

    def take_rule(self, values: dict[str, str]) -> dict[str, Any] | None:
        """The oldest rule matching the call, using one of its `times`; spent rules are removed."""
        for rule in self.data["rules"]:
            if rule_matches(rule, values):
                rule["hits"] += 1
                if rule["remaining"] is not None:
                    rule["remaining"] -= 1
                    if rule["remaining"] <= 0:
                        self.data["rules"].remove(rule)
                return rule
        return None

    def record_call(self, request: web.Request, body: Any) -> dict[str, Any]:
        call = {
            "id": self.next_id("call_"),
            "at": rfc3339(utc_now()),
            "method": request.method,
            "path": request.path,
            "body": body or None,
            "idempotency_key": request.headers.get("Idempotency-Key"),
            "response": None,
            "rule_id": None,
        }
        self.data["calls"].append(call)
        return call

    def record_effects(self, effects: list[dict[str, Any]], call: dict[str, Any] | None) -> None:
        for effect in effects:
            effect.setdefault("at", rfc3339(utc_now()))
            self.data["effects"].append({**effect, "call_id": call["id"] if call else None})

    async def hang(self) -> None:
        """Hold a request open; released early when the app shuts down so stopping stays quick."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), self.hang_seconds)

    def release_hanging(self) -> None:
        self._closing.set()


SANDBOX = web.AppKey("sandbox", Sandbox)


# --- request pipeline ----------------------------------------------------------------------------


def json_response(reply: Reply) -> web.Response:
    return web.json_response(reply.body, status=reply.status, headers=reply.headers, dumps=_dumps)


def _dumps(value: Any) -> str:
    # as the standard library's json.dumps(default=str) wrote it: datetimes and dataclasses by str()
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
                        | orjson.OPT_PASSTHROUGH_DATACLASS).decode()


async def _read_body(request: web.Request) -> tuple[Any, bool]:
    """The JSON body (an empty object when there is none) and whether it is usable."""
    text = await request.text()
    if not text.strip():
        return {}, True
    try:
        body = orjson.loads(text)
    except ValueError:
        return text, False
    return body, isinstance(body, dict)


def _match_values(body: Any, path_values: dict[str, str]) -> dict[str, str]:
    found = {name: body[name] for name in MATCH_FIELDS if isinstance(body, dict) and name in body}
    return {name: str(value) for name, value in {**found, **path_values}.items() if value is not None}


async def dispatch(
    request: web.Request,
    action: Action,
    path_values: dict[str, str] | None = None,
    *,
    faults: bool = True,
) -> web.StreamResponse:
    """Record the call, apply the first matching fault rule (unless `faults` is off), else run the action."""
    sandbox = request.app[SANDBOX]
    body, usable = await _read_body(request)
    async with sandbox.lock:
        call = sandbox.record_call(request, body)
        rule = sandbox.take_rule(_match_values(body, path_values or {})) if faults else None
        call["rule_id"] = rule["id"] if rule else None
        respond = rule["respond"] if rule else {}
        reply = _answer(sandbox, call, action, body, usable, respond)
        sandbox.save()
    if reply is None:
        # A timeout rule: no effect, and the client's own timeout is expected to fire long before this ends.
        await sandbox.hang()
        return json_response(error_reply(504, "sandbox_timeout", "The sandbox held this call open"))
    if respond.get("succeed_then_drop"):
        return _drop(request)
    return json_response(reply)


def _answer(
    sandbox: Sandbox, call: dict[str, Any], action: Action, body: Any, usable: bool, respond: dict[str, Any]
) -> Reply | None:
    """The reply to send (recording the effects it applied), or None to hold the call open."""
    if respond.get("timeout"):
        call["response"] = "timeout"
        return None
    if "status" in respond:
        reply = fault_reply(respond)  # a fault answer never applies the effect
    elif not usable:
        reply = error_reply(400, "invalid_json", "The request body must be a JSON object")
    else:
        reply = run_action(action, sandbox.state, body)
        sandbox.record_effects(reply.effects, call)
    call["response"] = "dropped" if respond.get("succeed_then_drop") else reply.status
    return reply


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering: the effect happened, the client cannot know it."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # aiohttp treats writing to the closed transport as a client disconnect and sends nothing.
    return web.Response(status=200)


# --- the /_sandbox routes ------------------------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "sandbox": request.app[SANDBOX].name})


async def _add_rule(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    try:
        rule = RuleIn.model_validate(await request.json())
    except ValidationError as invalid:
        return json_response(error_reply(422, "invalid_rule", _describe(invalid)))
    except ValueError:
        return json_response(error_reply(400, "invalid_json", "The request body must be a JSON object"))
    async with sandbox.lock:
        stored = sandbox.add_rule(rule)
        sandbox.save()
    return web.json_response(stored, status=201)


async def _list_rules(request: web.Request) -> web.Response:
    return web.json_response({"rules": request.app[SANDBOX].data["rules"]})


async def _clear_rules(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    async with sandbox.lock:
        cleared = len(sandbox.data["rules"])
        sandbox.data["rules"] = []
        sandbox.save()
    return web.json_response({"cleared": cleared})


async def _ledger(request: web.Request) -> web.Response:
    data = request.app[SANDBOX].data
    return web.json_response({"calls": data["calls"], "effects": data["effects"]}, dumps=_dumps)


async def _reset_ledger(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    async with sandbox.lock:
        sandbox.reset()
        sandbox.save()
    return web.json_response({"reset": True})


async def _release_on_shutdown(app: web.Application) -> None:
    app[SANDBOX].release_hanging()
    app[SANDBOX].flush()


def new_sandbox_app(sandbox: Sandbox) -> web.Application:
    """An app with the health, rule and ledger routes; the caller adds its own `/v1` routes."""
    # No Host check (services reach them by container name); a page elsewhere may not set rules.
    app = web.Application(middlewares=[guard(LOOPBACK, check_host=False)])
    app[SANDBOX] = sandbox
    app.on_shutdown.append(_release_on_shutdown)
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/_sandbox/rules", _add_rule)
    app.router.add_get("/_sandbox/rules", _list_rules)
    app.router.add_delete("/_sandbox/rules", _clear_rules)
    app.router.add_get("/_sandbox/ledger", _ledger)
    app.router.add_delete("/_sandbox/ledger", _reset_ledger)
    return app
