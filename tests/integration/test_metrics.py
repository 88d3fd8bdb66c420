"""The Prometheus endpoint of the shared daemon, parsed with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_process import DaemonProcess


def scrape(daemon: DaemonProcess) -> dict[str, list]:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples, name: str, **labels) -> float:
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return 0.0


def test_metrics_follow_requests(daemon: DaemonProcess, onnx_executor: str) -> None:
    before = scrape(daemon)
    with grpcclient.InferenceServerClient(daemon.address) as client:
        good = grpcclient.InferInput("INPUT0", [2, 3], "INT32")
        good.set_data_from_numpy(np.ones((2, 3), np.int32))
        other = grpcclient.InferInput("INPUT1", [2, 3], "INT32")
        other.set_data_from_numpy(np.ones((2, 3), np.int32))
        for _ in range(3):
            client.infer("simple_static", [good, other])
        bad = grpcclient.InferInput("INPUT1", [2, 3], "FP32")
        bad.set_data_from_numpy(np.ones((2, 3), np.float32))
        with pytest.raises(grpcclient.InferenceServerException):
            client.infer("simple_static", [good, bad])
    after = scrape(daemon)
    labels = {"model": "simple_static", "version": "2"}
    assert value(after["edged_request_success"], "edged_request_success_total", **labels) == (
        value(before["edged_request_success"], "edged_request_success_total", **labels) + 3)
    assert value(after["edged_request_failure"], "edged_request_failure_total",
                 code="INVALID_ARGUMENT", **labels) >= 1
    assert value(after["edged_executions"], "edged_executions_total", **labels) >= 3
    assert value(after["edged_batch_size"], "edged_batch_size_count", **labels) >= 3
    assert value(after["edged_request_duration_seconds"],
                 "edged_request_duration_seconds_bucket", le="+Inf", **labels) >= 3
    assert value(after["edged_queue_depth"], "edged_queue_depth", **labels) == 0
    assert value(after["edged_inflight_requests"], "edged_inflight_requests", **labels) == 0
    assert value(after["edged_model_info"], "edged_model_info", executor=onnx_executor,
                 **labels) == 1
