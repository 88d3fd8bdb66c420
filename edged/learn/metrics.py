"""Prometheus metrics of on-device learning (``edged_learn_*``), read at scrape time; the
daemon registers the collector in its own registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edged.learn.jobs import LearnManager


class LearnCollector(Collector):
    """Per model: samples stored and waiting, the store's bytes, jobs by state entered, and
    the running job's progress."""

    def __init__(self, learn: LearnManager) -> None:
        self._learn = learn

    def collect(self) -> Iterator[Metric]:
        learn = self._learn
        counts = learn.store.counts_all()  # the store's own lock; a few indexed counts
        samples = GaugeMetricFamily(
            "edged_learn_samples",
            "Samples in the sample store (status: pending = waiting for a fine-tune, stored = "
            "all).",
            labels=["model", "status"],
        )
        size = GaugeMetricFamily(
            "edged_learn_store_bytes",
            "Bytes of stored backbone features.",
            labels=["model"],
        )
        for c in counts:
            samples.add_metric([c.model, "pending"], c.pending)
            samples.add_metric([c.model, "stored"], c.stored)
            size.add_metric([c.model], c.stored_bytes)
        jobs = CounterMetricFamily(
            "edged_learn_jobs",
            "Fine-tune job states entered since start-up.",
            labels=["model", "state"],
        )
        for (model, state), count in sorted(learn.jobs_total.items()):
            jobs.add_metric([model, state], count)
        progress = GaugeMetricFamily(
            "edged_learn_job_progress",
            "Progress (0 to 1) of the model's running fine-tune job.",
            labels=["model"],
        )
        for model, running in sorted(learn.running_jobs().items()):
            progress.add_metric([model], running)
        yield from (samples, size, jobs, progress)
