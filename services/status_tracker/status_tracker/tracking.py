"""What the tracker keeps per request, and how one saga event moves it on. Pure: no I/O.

An `Entry` is kept in the request's read-model row (`projection.py`): the folded view of
CONTRACT.md section 6, its `version`, the event ids already folded (redelivered events are dropped by
them), and what the dashboard shows besides the contract view (emails sent, every error seen).

`track(entry, message)` returns a `Step`: the entry to store and the status record to publish, both
None when the event changes nothing. The status record is deterministic (its event_id derives from
request_id and version, its times from the saga events), so a record re-published after a crash is the
same event and consumers drop the copy by event_id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cancelflow.events import (
    TERMINAL_STATES,
    CancellationReceived,
    CancellationStatusChanged,
    EmailSent,
    Envelope,
    Failed,
    RequestStuck,
    SagaEvent,
    State,
    VendorCancellationFailed,
)
from cancelflow.messaging.codec import Message
from status_tracker import fold, guidance

Entry = dict[str, Any]

PRODUCER = "status_tracker"
MAX_APPLIED = 256  # event ids kept per request: far more than a request's whole story
# States that should move on by themselves. `scheduled` waits for the end of the term and
# `pending_approval` for an operator: neither is stuck however long it waits.
STUCK_STATES = frozenset({State.received.value, State.in_progress.value})
_STATUS_IDS = uuid.UUID("b6a7c0de-5a1e-4c0f-9d5e-7a7c4e11f10e")


@dataclass(frozen=True)
class Step:
    entry: Entry | None = None
    status: Envelope | None = None
    duplicate: bool = False


def new_entry(request_id: str, at: datetime) -> Entry:
    return {"view": fold.empty_view(request_id), "version": 0, "created_at": at.isoformat(),
            "updated_at": at.isoformat(), "applied": [], "emails": [], "errors": []}


def track(entry: Entry | None, message: Message[SagaEvent]) -> Step:
    payload = message.payload
    request_id = str(payload.request_id)
    at = message.envelope.occurred_at
    current = entry or new_entry(request_id, at)
    if message.event_id in current["applied"]:
        return Step(duplicate=True)
    if isinstance(payload, RequestStuck) and datetime.fromisoformat(current["updated_at"]) > payload.since:
        return Step()  # the request moved on after the timer looked: not stuck after all
    view = fold.apply(current["view"], payload, at)
    if view is None or view["state"] is None:
        return Step()  # nothing changed, or a step of a request whose first record we never saw
    updated = max(datetime.fromisoformat(current["updated_at"]), at)
    new = {
        **current,
        "view": view,
        "version": current["version"] + 1,
        "updated_at": updated.isoformat(),
        "applied": [*current["applied"], message.event_id][-MAX_APPLIED:],
        "emails": current["emails"] + _emails(message, at),
        "errors": current["errors"] + _errors(message, view, at),
        "request": _options(message) or current.get("request"),
    }
    return Step(new, status_envelope(new, causation_id=message.event_id))


def status_envelope(entry: Entry, *, causation_id: str | None) -> Envelope:
    """The `cancellations.status` record of an entry's current version."""
    request_id = entry["view"]["request_id"]
    updated_at = datetime.fromisoformat(entry["updated_at"])
    payload = CancellationStatusChanged.model_validate(
        {**entry["view"], "version": entry["version"], "updated_at": updated_at})
    return Envelope(
        event_id=uuid.uuid5(_STATUS_IDS, f"{request_id}:{entry['version']}"),
        event_type=payload.event_type, schema_version=payload.schema_version, occurred_at=updated_at,
        correlation_id=request_id, causation_id=causation_id, producer=PRODUCER,
        payload=payload.model_dump(mode="json", by_alias=True),
    )


def document(entry: Entry, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the read API and the dashboard show: the status record's fields, when the request came in,
    the emails sent, and each error with what the operator should do about it. `status` is the
    payload of the entry's status record when the caller has built it already."""
    if status is None:
        status = status_envelope(entry, causation_id=None).payload
    error = status["error"]
    return {
        **status,
        "created_at": entry["created_at"],
        "error_help": guidance.for_error(error["source"], error["code"]) if error else None,
        "emails": entry["emails"],
        "errors": [{**e, "help": guidance.for_error(e["source"], e["code"])} for e in entry["errors"]],
    }


def is_terminal(entry: Entry) -> bool:
    state = entry["view"]["state"]
    return state is not None and State(state) in TERMINAL_STATES


def overdue(entries: Iterable[Entry], now: datetime, after_s: float) -> list[RequestStuck]:
    """The open requests that have not changed for `after_s` seconds, as `RequestStuck` events."""
    found = []
    for entry in entries:
        view = entry["view"]
        since = datetime.fromisoformat(entry["updated_at"])
        waited = (now - since).total_seconds()
        if view["state"] in STUCK_STATES and waited >= after_s:
            found.append(RequestStuck(request_id=view["request_id"], stage=view["stage"] or "unknown",
                                      since=since, stuck_for_seconds=round(waited, 1)))
    return found


def _options(message: Message) -> dict[str, Any] | None:
    """What an operator's retry repeats besides the view's fields (CONTRACT.md section 11)."""
    e = message.payload
    if not isinstance(e, CancellationReceived):
        return None
    return {"quantity": e.quantity, "effective_date": e.effective_date.isoformat() if e.effective_date else None,
            "reason": e.reason, "opt_out_of_emails": e.opt_out_of_emails, "charge_ids": list(e.charge_ids)}


def _emails(message: Message, at: datetime) -> list[dict[str, Any]]:
    e = message.payload
    if not isinstance(e, EmailSent):
        return []
    return [{"at": at.isoformat(), "kind": e.kind, "audience": e.audience, "subject": e.subject}]


def _errors(message: Message, view: fold.View, at: datetime) -> list[dict[str, Any]]:
    e = message.payload
    if isinstance(e, VendorCancellationFailed):
        return [{"at": at.isoformat(), "source": "vendor", "code": e.code, "message": e.message,
                 "retryable": e.retryable}]
    if isinstance(e, Failed):
        return [{"at": at.isoformat(), "source": e.source.value, "code": e.code, "message": e.message,
                 "retryable": e.retryable}]
    if isinstance(e, RequestStuck) and view["error"] and view["error"]["code"] == "timeout":
        return [{"at": at.isoformat(), **view["error"], "retryable": False}]
    return []
