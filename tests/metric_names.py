"""Metric names as Prometheus sees them, for the tests that check dashboards and alert rules against
what cancelflow.metrics exports."""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from cancelflow import metrics

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def exported_metric_names() -> set[str]:
    """Every series name a service's /metrics can show for the metrics of cancelflow.metrics."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def metric_names_in(promql: str) -> set[str]:
    """The cancelflow_* metric names a PromQL text uses."""
    return set(re.findall(r"\bcancelflow_[a-z0-9_]+\b", promql))
