"""edged.logs: native stderr lines as events, journald's stream detection and priority
prefix, and the fd 2 capture (a real pipe on the real file descriptor 2)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator

import pytest
import structlog

from edged import logs


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            "E1204 21:45:50.510669    8205 add_port.cc:83] Failed to add port to server: "
            "Address already in use",
            {
                "source": "grpc",
                "level": "error",
                "message": "Failed to add port to server: Address already in use",
                "where": "add_port.cc:83",
            },
            id="grpc-core",
        ),
        pytest.param(
            "2026-12-04 21:45:50.123456789 [W:onnxruntime:, graph.cc:4285 "
            "CleanUnusedInitializersAndNodeArgs] Removing initializer 'w'.",
            {
                "source": "onnxruntime",
                "level": "warning",
                "message": "Removing initializer 'w'.",
                "where": "graph.cc:4285 CleanUnusedInitializersAndNodeArgs",
            },
            id="onnxruntime",
        ),
        pytest.param(
            "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
            {
                "source": "litert",
                "level": "info",
                "message": "Created TensorFlow Lite XNNPACK delegate for CPU.",
            },
            id="litert",
        ),
        pytest.param(
            "W0000 00:00:1733000000.000000    1234 tensorflow/lite/interpreter.cc:12] careful",
            {
                "source": "litert",
                "level": "warning",
                "message": "careful",
                "where": "tensorflow/lite/interpreter.cc:12",
            },
            id="absl-format-litert-file",
        ),
        pytest.param(
            "something odd happened",
            {"source": "unknown", "level": "warning", "message": "something odd happened"},
            id="unknown",
        ),
    ],
)
def test_classify_native_line(line: str, expected: dict[str, str]) -> None:
    assert logs.classify_native_line(line) == expected


def test_journal_stream_matches_device_and_inode() -> None:
    read_fd, write_fd = os.pipe()
    try:
        st = os.fstat(write_fd)
        assert logs.journal_stream(write_fd, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.journal_stream(write_fd, {"JOURNAL_STREAM": f"{st.st_dev}:1"})
        assert not logs.journal_stream(write_fd, {"JOURNAL_STREAM": "junk"})
        assert not logs.journal_stream(write_fd, {})
    finally:
        os.close(read_fd)
        os.close(write_fd)


@contextlib.contextmanager
def stdout_to(out: io.StringIO) -> Iterator[None]:
    """sys.stdout is ``out`` (inside the test's call: pytest sets its own at each phase)."""
    real = sys.stdout
    sys.stdout = out
    try:
        yield
    finally:
        sys.stdout = real
        structlog.reset_defaults()


def test_priority_prefix_per_level() -> None:
    out = io.StringIO()
    with stdout_to(out):
        logs.configure("debug", journal=True)
        log = structlog.get_logger("test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e"]


def test_no_prefix_off_the_journal() -> None:
    out = io.StringIO()
    with stdout_to(out):
        logs.configure("info", journal=False)
        structlog.get_logger("test").error("e")
    assert json.loads(out.getvalue())["event"] == "e"


def test_native_stderr_capture_turns_fd2_writes_into_events() -> None:
    out = io.StringIO()
    capture = logs.NativeStderr(max_line=64)
    with stdout_to(out):
        logs.configure("info", journal=False)
        capture.start()
        try:
            # what a C library does: write(2, ...) behind Python's back, partial lines too
            os.write(2, b"E1204 21:45:50.510669    8205 server.cc:1] boom\nINFO: hel")
            os.write(2, b"lo\n" + b"x" * 100)  # no newline, longer than max_line
            print("python's own stderr", file=sys.stderr)  # not native: stays raw
        finally:
            capture.stop()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["source"], e["level"], e["message"]) for e in events] == [
        ("native_stderr", "grpc", "error", "boom"),
        ("native_stderr", "litert", "info", "hello"),
        ("native_stderr", "unknown", "warning", "x" * 64),
        ("native_stderr", "unknown", "warning", "x" * 36),
    ]
    # fd 2 is the real stderr again, and a second stop is harmless
    capture.stop()
    assert sys.stderr is not None
