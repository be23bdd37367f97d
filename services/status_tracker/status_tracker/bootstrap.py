"""Builds the status tracker: the saga folded into each request's view (its own database, with the inbox
and outbox like every service), the single writer of `cancellations.status`, the stuck-request timer,
and the read API, live feed and dashboard on STATUS_HTTP_PORT."""

from __future__ import annotations

from cancelflow import topics
from cancelflow.messaging.dispatch import Route
from cancelflow.service import ServiceRuntime
from status_tracker import fold, gauges, http, orm
from status_tracker.actions import Actions
from status_tracker.feed import StatusFeed
from status_tracker.handlers import TrackerHandlers
from status_tracker.operators import Operators, parse_operators
from status_tracker.projection import ReadModel
from status_tracker.settings import Settings
from status_tracker.stuck import StuckTimer
from status_tracker.subscriptions import SubscriptionViews, owner_urls

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build() -> ServiceRuntime:
    settings = Settings()
    runtime = ServiceRuntime("status_tracker", settings, orm.metadata, orm.messaging)
    read_model = ReadModel(runtime.engine, runtime.sessions)
    handlers = TrackerHandlers(read_model)
    # The tracker owns DLQ duty for the saga topic: it reads every saga event anyway.
    runtime.routes += routes(handlers)
    runtime.stuck = StuckTimer(read_model, runtime.new_uow, lambda: runtime.consumer,  # type: ignore[attr-defined]
                               after_s=settings.stuck_after_s)
    feed = runtime.feed = StatusFeed(settings)  # type: ignore[attr-defined]
    runtime.on_start.append(feed.start)
    runtime.on_stop.append(feed.stop)
    runtime.tasks += [runtime.stuck.run, feed.run, gauges.refresher(runtime.sessions)]  # type: ignore[attr-defined]
    runtime.inflight_reports.append(lambda: gauges.request_counts(runtime.sessions))
    operators = Operators(parse_operators(settings.operators))  # a malformed list stops the start here
    if not operators.enabled and settings.http_host not in LOOPBACK:
        raise ValueError(f"the status service would serve every account's requests on {settings.http_host} "
                         "to anyone: set CANCELFLOW_OPERATORS (docs/security.md)")
    if settings.producer_keys and settings.signing_key("bss") is None:
        # Operators' actions are upstream records signed as `bss`: without its key billing would dead-letter
        # every one of them after the 202 (CONTRACT.md sections 10 and 11).
        raise ValueError("CANCELFLOW_PRODUCER_KEYS has no key for bss, which operators' actions are signed with")
    actions = Actions(runtime.new_uow, signing_key=settings.signing_key("bss"))
    subscriptions = SubscriptionViews(read_model, owner_urls(settings))
    runtime.on_start.append(subscriptions.start)
    runtime.on_stop.append(subscriptions.stop)
    http.install(runtime.http, read_model, feed, operators=operators, actions=actions, sessions=runtime.sessions,
                 subscriptions=subscriptions)
    return runtime


def routes(handlers: TrackerHandlers) -> list[Route]:
    """What the tracker consumes: every saga event a support person can see, one handler for all."""
    return [Route(topics.SAGA, dead_letter=True, batch=True).on_each(fold.SAGA_EVENTS, handlers.saga_event)]
