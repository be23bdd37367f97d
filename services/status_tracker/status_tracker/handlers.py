"""The single writer of `cancellations.status`: each saga event in, at most one status record out.

One handler for every saga event a support person can see. In the consume loop's unit of work it reads
the request's entry, folds the event into it (`tracking.track`), and writes, in one transaction:
the read-model row with the new entry, the status record (outbox) and the event id (inbox). So a step is
applied exactly once whatever crashes, and its status record is published after the commit, in order.
"""

from __future__ import annotations

from cancelflow import metrics, topics
from cancelflow.events import SagaEvent
from cancelflow.logging import get_logger
from cancelflow.messaging.codec import Message
from cancelflow.messaging.dispatch import HandlerContext
from status_tracker import tracking
from status_tracker.projection import ReadModel

log = get_logger(__name__)

class TrackerHandlers:
    def __init__(self, read_model: ReadModel) -> None:
        self._read_model = read_model

    async def saga_event(self, message: Message[SagaEvent], uow: HandlerContext) -> None:
        request_id = str(message.payload.request_id)
        before = await self._read_model.entry_in(uow.db, request_id)
        step = tracking.track(before, message)
        if step.duplicate:
            log.info("event already folded")
            return
        if step.entry is None or step.status is None:
            return
        # The partition of the request's saga records: the stuck timer only looks at requests whose
        # partitions this replica reads.
        entry = {**step.entry, "partition": message.partition}
        await self._read_model.write(uow.db, tracking.document(entry, step.status.payload), entry)
        uow.emit_envelope(step.status, topic=topics.STATUS, key=request_id)
        if tracking.is_terminal(entry) and not (before and tracking.is_terminal(before)):
            error = entry["view"]["error"] or {}
            metrics.OUTCOMES.labels(entry["view"]["state"], error.get("source", "")).inc()
