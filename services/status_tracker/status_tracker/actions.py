"""What a support operator may do (CONTRACT.md section 11), each action one transaction.

An allowed action commits, in the status service's database, the events it sends (outbox), a claim
that keeps a second click from acting again, and its audit row: the 202 follows the commit, and the
relay publishes. A refused one (403, 400, 404, 409) is audited in a transaction of its own.

The request's own view is not touched here: the tracker folds `OperatorActed` (history, `resolution`)
from the saga topic like every other step, so the view keeps a single writer and its order.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import bindparam, insert, select

from cancelflow.events import (
    CancellationApproved,
    CancellationDeclined,
    CancellationRequested,
    Mode,
    OperatorActed,
    RefundRetryRequested,
    RequestedBy,
    State,
    envelope_for,
    utcnow,
)
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import encode
from cancelflow.messaging.signatures import sign
from cancelflow.messaging.uow import UnitOfWork
from cancelflow.sql import Query
from status_tracker import orm
from status_tracker.operators import Operator
from status_tracker.projection import ReadModel

log = get_logger(__name__)

ADD_AUDIT = Query(insert(orm.audit))
CLAIM = Query(select(orm.claims).where((orm.claims.c.request_id == bindparam("request_id"))
                                       & (orm.claims.c.phase == bindparam("phase"))))
ADD_CLAIM = Query(insert(orm.claims))
PHASE = {"approve": "decision", "decline": "decision", "retry": "resolution", "retry_refund": "resolution",
         "close": "resolution"}
CHANNEL = "bss"  # what an operator's requests and decisions come in as (CONTRACT.md section 4)


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- bodies ---------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoteBody(_Body):
    note: str = Field("", max_length=2000)


class ResolveBody(NoteBody):
    action: str = Field(pattern="^(retry_refund|close)$")


class OnBehalfBody(_Body):
    """POST /cancellations: CancellationRequested without `request_id` and `requested_by`."""

    account_id: str = Field(min_length=1, max_length=100)
    target: str = Field("subscription", pattern="^(subscription|charges)$")
    subscription_id: str | None = Field(None, max_length=100)
    charge_ids: list[str] = Field(default_factory=list)
    mode: Mode = Mode.immediate
    effective_date: date | None = None
    quantity: int | None = Field(None, ge=1)
    reason: str = Field(min_length=1, max_length=2000)
    requires_approval: bool = False
    opt_out_of_emails: bool = False
    retry_of: uuid.UUID | None = None  # section 4 allows it; billing trusts it only for a platform failure

    def model_post_init(self, _context: Any) -> None:
        if not self.reason.strip():
            raise ValueError("reason is required")


def _parse(model: type[_Body], body: Any) -> Any:
    try:
        return model.model_validate(body if body is not None else {})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise Refused(400, problems) from None
    except ValueError as exc:
        raise Refused(400, str(exc)) from None


# --- what a request's state allows -------------------------------------------------------------------


def allowed_actions(view: dict[str, Any]) -> list[str]:
    """The actions a request's view allows (the dashboard shows these buttons, the API checks them)."""
    state, error = view.get("state"), view.get("error") or {}
    if state == State.pending_approval.value:
        return ["approve", "decline"]
    if view.get("resolution"):
        return []  # a finished request is resolved once; the work goes on as its own request
    if state == State.failed.value and error.get("source") in ("vendor", "platform"):
        return ["retry"]
    if state == State.manual_review.value:
        return (["retry_refund"] if error.get("code") == "refund_failed" else []) + ["close"]
    return []


# --- the actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


class Actions:
    def __init__(self, new_uow: Callable[[], UnitOfWork], signing_key: str | None = None) -> None:
        self._new_uow = new_uow
        # Decisions and on-behalf requests go on an upstream topic: signed as the back office (`bss`)
        # when CANCELFLOW_PRODUCER_KEYS names it (CONTRACT.md section 10).
        self._signing_key = signing_key

    async def on_request(self, operator: Operator, action: str, request_id: str, body: Any) -> Answer:
        """approve | decline | retry | resolve, on an existing request."""
        note = ""
        try:
            if not operator.may_act:
                raise Refused(403, f"{operator.name} is a viewer: actions need the operator role")
            parsed = _parse(ResolveBody if action == "resolve" else NoteBody, body)
            note = parsed.note
            kind = parsed.action if action == "resolve" else action
            _uuid(request_id)
            async with self._new_uow() as uow:
                entry = await ReadModel.entry_in(uow.db, request_id)
                if entry is None:
                    raise Refused(404, "unknown request_id")
                view = entry["view"]
                if kind not in allowed_actions(view):
                    raise Refused(409, _not_now(kind, view))
                await self._claim(uow, request_id, kind, operator)
                new_id = self._emit(uow, operator, kind, request_id, entry, note)
                answer = Answer(202, {"request_id": str(new_id or request_id), "action": kind,
                                      **({"retry_of": request_id} if new_id else {})})
                await self._audit_in(uow, operator, kind, request_id, answer, note, new_id)
                await uow.commit()
            log.info("operator action", operator=operator.name, action=kind, request_id=request_id,
                     new_request_id=str(new_id) if new_id else None)
            return answer
        except Refused as refused:
            answer = Answer(refused.status, {"error": refused.message})
            await self._audit(operator, action if action != "resolve" else _resolve_kind(body), request_id,
                              answer, note)
            return answer

    async def on_behalf(self, operator: Operator, body: Any) -> Answer:
        """POST /cancellations: a cancellation on a customer's behalf (the support runbook)."""
        try:
            if not operator.may_act:
                raise Refused(403, f"{operator.name} is a viewer: actions need the operator role")
            parsed: OnBehalfBody = _parse(OnBehalfBody, body)
            try:
                request = CancellationRequested(
                    request_id=uuid.uuid4(), requested_by=RequestedBy.model_validate(
                        {"user_id": operator.name, "role": "operator", "channel": CHANNEL}),
                    **parsed.model_dump())
            except ValidationError as exc:
                raise Refused(400, "; ".join(e["msg"] for e in exc.errors())) from None
            async with self._new_uow() as uow:
                self._emit_upstream(uow, request)
                answer = Answer(202, {"request_id": str(request.request_id), "action": "cancel"})
                await self._audit_in(uow, operator, "cancel", str(request.request_id), answer, parsed.reason, None)
                await uow.commit()
            log.info("operator action", operator=operator.name, action="cancel", request_id=str(request.request_id))
            return answer
        except Refused as refused:
            answer = Answer(refused.status, {"error": refused.message})
            await self._audit(operator, "cancel", None, answer, (body or {}).get("reason", "")
                              if isinstance(body, dict) else "")
            return answer

    # --- effects -----------------------------------------------------------------------------------

    def _emit(self, uow: UnitOfWork, operator: Operator, kind: str, request_id: str, entry: dict[str, Any],
              note: str) -> uuid.UUID | None:
        view, rid = entry["view"], uuid.UUID(request_id)
        new_id: uuid.UUID | None = None
        if kind == "approve":
            self._emit_upstream(uow, CancellationApproved(request_id=rid, decided_by=operator.name, note=note))
        elif kind == "decline":
            self._emit_upstream(uow, CancellationDeclined(request_id=rid, decided_by=operator.name, note=note))
            return None  # RequestDeclined says it in the history
        elif kind == "retry":
            new_id = uuid.uuid4()
            self._emit_upstream(uow, _repeat(view, entry.get("request") or {}, new_id, operator, note))
        elif kind == "retry_refund":
            new_id = uuid.uuid4()
            uow.emit(RefundRetryRequested(request_id=new_id, retry_of=rid, account_id=view.get("account_id"),
                                          subscription_id=view.get("subscription_id"), operator=operator.name,
                                          note=note), key=str(new_id))
        uow.emit(OperatorActed(request_id=rid, action=kind, operator=operator.name, note=note,
                               new_request_id=new_id), key=request_id)
        return new_id

    def _emit_upstream(self, uow: UnitOfWork,
                       payload: CancellationRequested | CancellationApproved | CancellationDeclined) -> None:
        envelope = envelope_for(payload, producer=CHANNEL, correlation_id=str(payload.request_id),
                                causation_id=None)
        headers = None
        if self._signing_key:
            headers = {"cf-producer": CHANNEL, "cf-signature": sign(encode(envelope), self._signing_key)}
        uow.emit_envelope(envelope, topic=payload.topic, key=payload.record_key(), headers=headers)

    @staticmethod
    async def _claim(uow: UnitOfWork, request_id: str, kind: str, operator: Operator) -> None:
        phase = PHASE[kind]
        held = await uow.db.first(CLAIM, request_id=request_id, phase=phase)
        if held is not None:
            raise Refused(409, f"already {held['action']} by {held['operator']}")
        try:
            await uow.db.run(ADD_CLAIM, request_id=request_id, phase=phase, action=kind, operator=operator.name,
                             at=utcnow())
        except Exception as exc:  # two operators at the same moment (PostgreSQL): the other one won
            if "unique" not in str(exc).lower() and "integrity" not in type(exc).__name__.lower():
                raise
            raise Refused(409, "another operator acted on this request at the same moment") from None

    # --- the audit trail -----------------------------------------------------------------------------

    @staticmethod
    async def _audit_in(uow: UnitOfWork, operator: Operator, action: str, request_id: str | None, answer: Answer,
                        note: str, new_id: uuid.UUID | None) -> None:
        await uow.db.run(ADD_AUDIT, at=utcnow(), operator=operator.name, role=operator.role.value, action=action[:30],
                         request_id=request_id[:64] if request_id else None,
                         new_request_id=str(new_id) if new_id else None,
                         status=answer.status, outcome=answer.body.get("error") or "accepted", note=note or None)

    async def _audit(self, operator: Operator, action: str, request_id: str | None, answer: Answer,
                     note: str) -> None:
        async with self._new_uow() as uow:
            await self._audit_in(uow, operator, action, request_id, answer, note, None)
            await uow.commit()
        log.info("operator action refused", operator=operator.name, action=action, request_id=request_id,
                 status=answer.status, reason=answer.body.get("error"))


def _uuid(request_id: str) -> None:
    try:
        uuid.UUID(request_id)
    except ValueError:
        raise Refused(404, "unknown request_id") from None


def _resolve_kind(body: Any) -> str:
    action = body.get("action") if isinstance(body, dict) else None
    return action if action in ("retry_refund", "close") else "resolve"


def _not_now(kind: str, view: dict[str, Any]) -> str:
    if view.get("resolution"):
        return f"the request was already resolved ({view['resolution']['action']} by {view['resolution']['by']})"
    if kind == "retry_refund":
        return f"no refused refund to retry (state {view.get('state')})"
    return f"{kind} is not allowed in state {view.get('state')}"


def _repeat(view: dict[str, Any], options: dict[str, Any], new_id: uuid.UUID, operator: Operator,
            note: str) -> CancellationRequested:
    """The same target and options as the failed request, as the operator's own (`retry_of`)."""
    mode = Mode(view.get("mode") or Mode.immediate.value)
    return CancellationRequested(
        request_id=new_id, account_id=view["account_id"],
        requested_by={"user_id": operator.name, "role": "operator", "channel": CHANNEL},
        target=view.get("target") or "subscription", subscription_id=view.get("subscription_id"),
        charge_ids=view.get("charge_ids") or options.get("charge_ids") or [], mode=mode,
        effective_date=options.get("effective_date") if mode is Mode.past_dated else None,
        quantity=options.get("quantity"), reason=note or options.get("reason") or "",
        opt_out_of_emails=bool(options.get("opt_out_of_emails")), retry_of=uuid.UUID(view["request_id"]))

