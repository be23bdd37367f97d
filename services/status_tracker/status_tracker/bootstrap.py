"""Builds the status tracker: the saga folded by a faust agent into a changelog-backed table, the single
writer of `cancellations.status`, and the read API and dashboard on STATUS_HTTP_PORT."""

from __future__ import annotations

from cancelflow.settings import service_settings
from status_tracker.runtime import TrackerRuntime


def build() -> TrackerRuntime:
    return TrackerRuntime(service_settings("status_tracker"))
