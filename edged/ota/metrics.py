"""Prometheus metrics of over-the-air updates (``edged_ota_*``), read at scrape time from the
UpdateManager's in-memory copies; the daemon registers the collector in its own registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edged.ota.state import State
from edged.ota.updater import UpdateManager


class OtaCollector(Collector):
    """Per model: the latest update's state (one series per state, 1 for the current one),
    the committed version, transitions by state, the last swap's duration; and the poller's
    failures and last success."""

    def __init__(self, updates: UpdateManager) -> None:
        self._updates = updates

    def collect(self) -> Iterator[Metric]:
        u = self._updates
        latest, committed = u.latest, u.committed  # replaced, never mutated: safe to read here
        state = GaugeMetricFamily(
            "edged_ota_state",
            "State of the model's latest update (1 for the current state, 0 for the others).",
            labels=["model", "state"],
        )
        for model, record in sorted(latest.items()):
            for s in State:
                state.add_metric([model, s.value], 1.0 if record.state is s else 0.0)
        version = GaugeMetricFamily(
            "edged_ota_committed_version",
            "The committed version: what a restart serves.",
            labels=["model"],
        )
        for model, v in sorted(committed.items()):
            if v is not None:
                version.add_metric([model], v)
        transitions = CounterMetricFamily(
            "edged_ota_transitions",
            "Update state transitions since start-up, by the state entered.",
            labels=["model", "state"],
        )
        for (model, entered), count in sorted(u.transitions_total.items()):
            transitions.add_metric([model, entered], count)
        swap = GaugeMetricFamily(
            "edged_ota_last_swap_seconds",
            "Duration of the last activation: load, warm-up, self-test, switch, drain of the old.",
            labels=["model"],
        )
        for model, seconds in sorted(u.last_swap_seconds.items()):
            swap.add_metric([model], seconds)
        poll_failures = CounterMetricFamily(
            "edged_ota_poll_failures", "Polls of the TUF repository that failed."
        )
        poll_failures.add_metric([], u.poll_failures)
        last_poll = GaugeMetricFamily(
            "edged_ota_last_poll_success_timestamp_seconds",
            "When the TUF repository was last polled successfully (0: never).",
        )
        last_poll.add_metric([], u.last_poll_success)
        yield from (state, version, transitions, swap, poll_failures, last_poll)
