"""Prometheus metrics, one registry per app: request latency (measured here), and job figures read from the
database at scrape time, so they are right whichever process (web or ``retrogen worker``) ran the jobs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from ..core.db import Database
from ..crud import jobs


class JobCollector:
    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        depth = GaugeMetricFamily("retrogen_queue_depth", "Jobs queued or running", labels=["kind", "state"])
        counts = jobs.queue_depth(self.db)
        for kind in ("retrieval", "generation"):
            for state in jobs.ACTIVE:
                depth.add_metric([kind, state], counts.get((kind, state), 0))
        yield depth
        durations = SummaryMetricFamily("retrogen_job_duration_seconds", "Wall time of finished jobs",
                                        labels=["kind", "method", "state"])
        images = CounterMetricFamily("retrogen_images_produced", "Images returned by succeeded jobs",
                                     labels=["method"])
        per_method: dict[str, int] = {}
        for kind, method, state, count, total_s, n in jobs.finished_stats(self.db):
            durations.add_metric([kind, method, state], count_value=count, sum_value=total_s)
            if state == "succeeded":
                per_method[method] = per_method.get(method, 0) + n
        for method, n in sorted(per_method.items()):
            images.add_metric([method], n)
        yield durations
        yield images


class Metrics:
    def __init__(self, db: Database):
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "retrogen_request_duration_seconds", "HTTP request latency", ["method", "route", "status"],
            registry=self.registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.registry.register(JobCollector(db))
