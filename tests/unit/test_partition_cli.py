"""``edged partition`` as an operator runs it (a real process): list the cuts, write a head
and tail, profile and explain the plan, measure the link to a running daemon."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edged.partition.planner import ALL_LOCAL
from edged.partition.profile import measure_link
from edged.security.client import ClientAuth
from tests.daemon_process import DaemonProcess, run_cli

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models/digits/1/model.onnx"


def test_list_then_cut_writes_a_head_and_tail_that_answer_like_the_whole(tmp_path: Path) -> None:
    listed = run_cli("partition", str(DIGITS), "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    cuts = [c["tensor"] for c in json.loads(listed.stdout)["cuts"]]
    assert "hidden" in cuts
    done = run_cli("partition", str(DIGITS), "--cut", "hidden", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    x = np.random.default_rng(2).random((4, 64), dtype=np.float32) * 16
    head = ort.InferenceSession(str(tmp_path / "head.onnx"))
    tail = ort.InferenceSession(str(tmp_path / "tail.onnx"))
    (hidden,) = head.run(None, {"input": x})
    whole = ort.InferenceSession(str(DIGITS)).run(None, {"input": x})
    for want, got in zip(whole, tail.run(None, {"hidden": hidden}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_several_cuts_are_written_for_re_planning(tmp_path: Path) -> None:
    cuts = ["--cut", "<inputs>", "--cut", "hidden", "--cut", "fc1"]
    done = run_cli("partition", str(DIGITS), *cuts, "--out", str(tmp_path), "--name", "digits")
    assert done.returncode == 0, done.stderr
    table = tomllib.loads(done.stdout)["partition"]["cuts"]
    assert table == {
        "<inputs>": {"model": "digits"},
        "hidden": {"head": "head_hidden.onnx", "model": "digits_hidden"},
        "fc1": {"head": "head_fc1.onnx", "model": "digits_fc1"},
    }
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32) * 16
    whole = ort.InferenceSession(str(DIGITS)).run(None, {"input": x})
    for cut, entry in table.items():
        tail = ort.InferenceSession(str(tmp_path / "server" / entry["model"] / "1" / "model.onnx"))
        feed = {"input": x}
        if "head" in entry:
            head = ort.InferenceSession(str(tmp_path / "device" / entry["head"]))
            feed = {cut: head.run(None, {"input": x})[0]}
        for want, got in zip(whole, tail.run(None, feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_explain_prints_every_cut_and_chooses_the_least_total(tmp_path: Path) -> None:
    profile = tmp_path / "server.json"
    done = run_cli(
        "partition", str(DIGITS), "--profile-out", str(profile), "--threads", "2", "--runs", "3"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(profile.read_text())["threads"] == 2
    args = ["partition", str(DIGITS), "--explain", "--server-profile", str(profile)]
    slow_link = ["--rtt-ms", "500", "--bandwidth-mbit", "1", "--runs", "3"]
    explained = run_cli(*args, *slow_link, "--json")
    assert explained.returncode == 0, explained.stderr
    result = json.loads(explained.stdout)
    rows = {r["cut"]: r for r in result["estimates"]}
    assert set(rows) == {
        "<inputs>",
        "centered",
        "standardized",
        "fc1",
        "hidden",
        "logits",
        ALL_LOCAL,
    }
    assert result["choice"] == min(rows, key=lambda c: rows[c]["total_ms"])
    assert result["choice"] == ALL_LOCAL  # half a second of round trip: nothing remote pays
    assert result["link"] == {"rtt_ms": 500.0, "bandwidth_mbit": 1.0, "source": "given"}
    table = run_cli(*args, *slow_link)
    assert table.returncode == 0, table.stderr
    chosen = [line for line in table.stdout.splitlines() if line.endswith("<- chosen")]
    assert len(chosen) == 1
    assert chosen[0].startswith("<local>")
    assert f"server: profile {profile} (cpu-onnx, 2 threads)" in table.stdout


def test_explain_plans_with_a_profile_taken_before(tmp_path: Path) -> None:
    device = tmp_path / "device.json"
    done = run_cli("partition", str(DIGITS), "--profile-out", str(device), "--runs", "3")
    assert done.returncode == 0, done.stderr
    # made-up costs: the profile file, not a new measurement, is what the plan reads
    data = json.loads(device.read_text())
    data["whole_s"] = 100.0
    for row in data["cuts"]:  # (no --server-profile: its tails stand in for the server's)
        row["head_s"] = row["tail_s"] = 100.0 if row["cut"] != "hidden" else 0.0
        row["head_spread"] = 0.9 if row["cut"] == "fc1" else 0.1
    device.write_text(json.dumps(data))
    link = ["--rtt-ms", "1", "--bandwidth-mbit", "100", "--json"]
    explained = run_cli("partition", str(DIGITS), "--explain", "--profile", str(device), *link)
    assert explained.returncode == 0, explained.stderr
    result = json.loads(explained.stdout)
    rows = {r["cut"]: r for r in result["estimates"]}
    assert rows[ALL_LOCAL]["head_ms"] == 100_000.0
    assert result["choice"] == "hidden"
    assert (result["statistic"], result["noisy_heads"]) == ("wall", ["fc1"])
    # the CPU statistic: the profile's CPU times (measured, untouched) x its wall/CPU ratio
    by_cpu = run_cli(
        "partition", str(DIGITS), "--explain", "--profile", str(device), *link,
        "--statistic", "cpu",
    )  # fmt: skip
    assert by_cpu.returncode == 0, by_cpu.stderr
    rows = {r["cut"]: r for r in json.loads(by_cpu.stdout)["estimates"]}
    want = data["whole_cpu_s"] * data["wall_per_cpu"] * 1000
    assert rows[ALL_LOCAL]["head_ms"] == pytest.approx(want)
    text = run_cli("partition", str(DIGITS), "--explain", "--profile", str(device), *link[:4])
    assert "noisy: 1 heads' runs disagree" in text.stdout
    # the quota statistic: heads at their CPU time, every row bounded by the CPU limit given
    by_quota = run_cli(
        "partition", str(DIGITS), "--explain", "--profile", str(device), *link,
        "--statistic", "quota", "--cpu-limit", "1/8", "--request-cpu-ms", "3",
    )  # fmt: skip
    assert by_quota.returncode == 0, by_quota.stderr
    planned = json.loads(by_quota.stdout)
    assert planned["cpu_limit"] == {"quota_ms": 1.0, "period_ms": 8.0}
    rows = {r["cut"]: r for r in planned["estimates"]}
    local_cpu = 3 + data["whole_cpu_s"] * 1000  # >= 3 ms of CPU: three periods' waits
    assert rows[ALL_LOCAL]["head_ms"] == pytest.approx(data["whole_cpu_s"] * 1000)
    assert rows[ALL_LOCAL]["bound_ms"] == pytest.approx(
        (math.ceil(local_cpu) - 1) * 8 + local_cpu - (math.ceil(local_cpu) - 1)
    )
    assert rows[ALL_LOCAL]["total_ms"] == pytest.approx(rows[ALL_LOCAL]["bound_ms"])
    table = run_cli(
        "partition", str(DIGITS), "--explain", "--profile", str(device), *link[:4],
        "--statistic", "quota", "--cpu-limit", "1/8",
    )  # fmt: skip
    assert "limit ms" in table.stdout.splitlines()[0]
    assert "1 ms of CPU per 8 ms (12.5% of a CPU)" in table.stdout
    for flags, message in (
        (["--profile", str(device)], "--profile is what --explain plans with"),
        (
            ["--explain", "--profile", str(device), "--profile-out", str(device), *link],
            "not both",
        ),
        (["--explain", "--profile", str(tmp_path / "none.json"), *link], "--profile "),
    ):
        refused = run_cli("partition", str(DIGITS), *flags)
        assert refused.returncode == 2, refused.stderr
        assert message in refused.stderr


def test_explain_for_the_devices_cpu(tmp_path: Path) -> None:
    args = ["partition", str(DIGITS), "--explain", "--rtt-ms", "1", "--bandwidth-mbit", "100"]
    # a byte on the wire costs the device 1 ms: only all local sends none
    done = run_cli(
        *args, "--runs", "3", "--objective", "device_cpu", "--byte-cost-ns", "1e6", "--json"
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["objective"] == "device_cpu"
    assert result["choice"] == ALL_LOCAL
    rows = {r["cut"]: r for r in result["estimates"]}
    inputs = rows["<inputs>"]
    # the inputs cut: no head; its CPU cost is its bytes (sent and answered) at 1 ms a byte
    assert inputs["head_ms"] == 0.0
    assert inputs["device_cpu_ms"] > inputs["sent_bytes"]
    assert result["choice_device_cpu_ms"] == rows[ALL_LOCAL]["device_cpu_ms"]
    table = run_cli(*args, "--runs", "3", "--objective", "device_cpu")
    assert table.returncode == 0, table.stderr
    assert "device CPU ms" in table.stdout.splitlines()[0]
    assert "ms of device CPU" in table.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "say what to do"),
        (["--explain", "--objective", "energy"], "invalid choice: 'energy'"),
        (["--cut", "hidden"], "--cut needs --out DIR"),
        (["--cut", "input", "--out", "x"], "tensor 'input' is not a cut"),
        (["--explain"], "--explain needs the link"),
        (["--cut", "hidden", "--wire-dtype", "INT8", "--out", "x"], "invalid choice: 'INT8'"),
        (["--explain", "--rtt-ms", "1", "--bandwidth-mbit", "1", "--margin", "2"], "margin 2.0"),
        (
            [
                "--explain",
                "--rtt-ms",
                "1",
                "--bandwidth-mbit",
                "1",
                "--statistic",
                "quota",
                "--cpu-limit",
                "8",
            ],
            "expected QUOTA_MS/PERIOD_MS",
        ),
        (
            ["--explain", "--rtt-ms", "1", "--bandwidth-mbit", "1", "--request-cpu-ms", "-1"],
            "--request-cpu-ms and --byte-cost-ns must be >= 0",
        ),
    ],
)
def test_bad_requests_are_named(flags: list[str], message: str) -> None:
    done = run_cli("partition", str(DIGITS), *flags)
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.slow
def test_the_link_to_a_running_daemon_is_measured(daemon: DaemonProcess) -> None:
    channel = ClientAuth().channel(daemon.address)
    try:
        link = measure_link(channel, runs=2, max_bytes=256 * 1024)
    finally:
        channel.close()
    assert link.rtt_s > 0
    assert link.bandwidth_bps > 0


def test_cuts_and_profiles_with_fp16_on_the_wire(tmp_path: Path) -> None:
    done = run_cli(
        "partition", str(DIGITS), "--cut", "hidden", "--wire-dtype", "FP16", "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    head = ort.InferenceSession(str(tmp_path / "head.onnx"))
    tail = ort.InferenceSession(str(tmp_path / "tail.onnx"))
    assert [(o.name, o.type) for o in head.get_outputs()] == [("hidden", "tensor(float16)")]
    assert [(i.name, i.type) for i in tail.get_inputs()] == [("hidden", "tensor(float16)")]
    sizes = {}
    for wire in ("", "FP16"):
        out = tmp_path / f"profile{wire}.json"
        flags = ["--wire-dtype", wire] if wire else []
        done = run_cli("partition", str(DIGITS), "--profile-out", str(out), "--runs", "1", *flags)
        assert done.returncode == 0, done.stderr
        sizes[wire] = {c["cut"]: c["sent_bytes"] for c in json.loads(out.read_text())["cuts"]}
    # the inputs cut sends the request's FP32 inputs either way; every other cut half as much
    assert sizes["FP16"]["<inputs>"] == sizes[""]["<inputs>"]
    for cut in set(sizes[""]) - {"<inputs>"}:
        assert sizes["FP16"][cut] * 2 == sizes[""][cut], cut
