"""Prometheus metrics on their own port, from a registry the daemon owns.

Everything is read at scrape time from the data plane's statistics snapshots and executor
views (``edged.serving.dataplane``), so a request pays nothing for metrics it would not pay
anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edged.core.stats import Histogram
from edged.core.views import BREAKER_STATES
from edged.serving.dataplane import DataPlane

LABELS = ["model", "version"]


def _histogram(
    name: str, doc: str, labels: list[str], rows: list[tuple[list[str], Histogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in rows:
        family.add_metric(values, hist.cumulative(), sum_value=hist.total)
    return family


class ServingCollector(Collector):
    """Per model version: requests, failures, items, batches, queue depth, in-flight, and
    histograms of queue time, request time, compute time and batch size."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    def collect(self) -> Iterator[Metric]:
        success = CounterMetricFamily(
            "edged_request_success", "Requests answered successfully.", labels=LABELS
        )
        failure = CounterMetricFamily(
            "edged_request_failure",
            "Requests that failed at the model, by status code.",
            labels=[*LABELS, "code"],
        )
        items = CounterMetricFamily(
            "edged_inference_items", "Items (batch rows) run through the model.", labels=LABELS
        )
        executions = CounterMetricFamily(
            "edged_executions", "Batches run on the model.", labels=LABELS
        )
        depth = GaugeMetricFamily(
            "edged_queue_depth", "Requests waiting for an instance.", labels=LABELS
        )
        in_flight = GaugeMetricFamily(
            "edged_inflight_requests", "Requests queued or running.", labels=LABELS
        )
        info = GaugeMetricFamily(
            "edged_model_info",
            "Where each served model version runs (value 1).",
            labels=[*LABELS, "executor", "instances", "max_batch_size"],
        )
        hists: dict[str, list[tuple[list[str], Histogram]]] = {
            "queue": [],
            "request": [],
            "compute": [],
            "batch": [],
        }
        for mv, stats in self._plane.served():
            labels = [mv.name, str(mv.version)]
            success.add_metric(labels, stats.success.count)
            for code, count in sorted(stats.failures_by_code.items()):
                failure.add_metric([*labels, code], count)
            items.add_metric(labels, stats.inference_count)
            executions.add_metric(labels, stats.execution_count)
            hists["queue"].append((labels, stats.queue_seconds))
            hists["request"].append((labels, stats.request_seconds))
            hists["compute"].append((labels, stats.compute_seconds))
            hists["batch"].append((labels, stats.batch_size))
            depth.add_metric(labels, mv.queue_depth)
            in_flight.add_metric(labels, mv.in_flight)
            info.add_metric([*labels, mv.executor, str(mv.instances), str(mv.max_batch_size)], 1)
        yield from (success, failure, items, executions, depth, in_flight, info)
        yield from self._placement()
        yield _histogram(
            "edged_queue_duration_seconds",
            "Time from arrival to the start of the batch.",
            LABELS,
            hists["queue"],
        )
        yield _histogram(
            "edged_request_duration_seconds",
            "Time from arrival to the answer.",
            LABELS,
            hists["request"],
        )
        yield _histogram(
            "edged_compute_duration_seconds",
            "Time one batch spent in merge, inference and split.",
            LABELS,
            hists["compute"],
        )
        yield _histogram("edged_batch_size", "Items per batch run.", LABELS, hists["batch"])

    def _placement(self) -> Iterator[Metric]:
        """Failover: executor failures, moves away and back, and each breaker's state."""
        moves = [*LABELS, "from", "to"]
        failovers = CounterMetricFamily(
            "edged_executor_failovers",
            "Moves of a model version away from an executor whose breaker opened.",
            labels=moves,
        )
        counters = self._plane.placement_counters()
        for key, count in sorted(counters.failovers.items()):
            failovers.add_metric(list(key), count)
        recoveries = CounterMetricFamily(
            "edged_executor_recoveries",
            "Moves of a model version back to a better executor that recovered.",
            labels=moves,
        )
        for key, count in sorted(counters.recoveries.items()):
            recoveries.add_metric(list(key), count)
        failures = CounterMetricFamily(
            "edged_executor_failures",
            "Batches that failed with an executor error (timeouts included).",
            labels=[*LABELS, "executor"],
        )
        for (model, version, executor), count in sorted(counters.executor_failures.items()):
            failures.add_metric([model, version, executor], count)
        breaker = GaugeMetricFamily(
            "edged_executor_breaker_state",
            "Circuit breaker of each executor a model version has run on: 1 for its current "
            "state (closed, open, half_open), 0 for the others.",
            labels=[*LABELS, "executor", "state"],
        )
        for status in self._plane.breakers():
            for state in BREAKER_STATES:
                breaker.add_metric(
                    [status.model, str(status.version), status.executor, state],
                    int(status.state == state),
                )
        yield from (failovers, recoveries, failures, breaker)
        yield from self._split(counters.replans)

    def _split(self, replans: dict[tuple[str, str, str, str], int]) -> Iterator[Metric]:
        """Split execution: each remote server's measured link, each re-planned model's cut
        and its switches."""
        address = ["address"]
        rtt = GaugeMetricFamily(
            "edged_remote_link_rtt_seconds",
            "Round trip to a remote server, estimated from probes and small calls.",
            labels=address,
        )
        bandwidth = GaugeMetricFamily(
            "edged_remote_link_bandwidth_bits_per_second",
            "Bandwidth to a remote server, estimated from the calls' payloads.",
            labels=address,
        )
        calls = CounterMetricFamily(
            "edged_remote_calls", "Calls made to a remote server (probes included).", labels=address
        )
        sent = CounterMetricFamily(
            "edged_remote_sent_bytes", "Tensor bytes sent to a remote server.", labels=address
        )
        received = CounterMetricFamily(
            "edged_remote_received_bytes",
            "Tensor bytes answered by a remote server.",
            labels=address,
        )
        seconds = CounterMetricFamily(
            "edged_remote_call_seconds", "Time the calls to a remote server took.", labels=address
        )
        for link in self._plane.links():
            values = [link.address]
            if link.rtt_s is not None:
                rtt.add_metric(values, link.rtt_s)
            if link.bandwidth_bps is not None:
                bandwidth.add_metric(values, link.bandwidth_bps)
            calls.add_metric(values, link.calls)
            sent.add_metric(values, link.bytes_sent)
            received.add_metric(values, link.bytes_received)
            seconds.add_metric(values, link.seconds)
        cut = GaugeMetricFamily(
            "edged_partition_cut",
            "The cut a re-planned split model version serves (value 1; <local>: all local).",
            labels=[*LABELS, "cut"],
        )
        for view in self._plane.cuts():
            cut.add_metric([view.model, str(view.version), view.cut], 1)
        switches = CounterMetricFamily(
            "edged_partition_replans",
            "Switches of a split model version's cut as the measured link changed.",
            labels=[*LABELS, "from", "to"],
        )
        for key, count in sorted(replans.items()):
            switches.add_metric(list(key), count)
        yield from (rtt, bandwidth, calls, sent, received, seconds, cut, switches)


class MetricsEndpoint:
    """The daemon's own registry served over HTTP (text exposition format)."""

    def __init__(self, plane: DataPlane) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServingCollector(plane))
        self._server: Any = None
        self._thread: Any = None
        self.port: int | None = None

    def start(self, address: str) -> int:
        """Serve on HOST:PORT (port 0 picks one); return the port."""
        host, _, port = address.rpartition(":")
        self._server, self._thread = start_http_server(int(port), host, self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        """Stop the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
