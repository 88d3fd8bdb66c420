"""Structured logging: configured once, in the entry point.

Every event is one JSON line on stdout. When stdout is connected to the journal (systemd sets
``JOURNAL_STREAM`` to the stream's ``device:inode``), each line starts with the sd-daemon
priority prefix ``<N>`` (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug), which
journald strips and records as the entry's PRIORITY (``SyslogLevelPrefix=yes`` is systemd's
default): ``journalctl -u edged -p warning`` then shows warnings and errors, and the message is
the same JSON object. Anywhere else (a terminal, a pipe, a container runtime) the lines carry
no prefix.

Native libraries (ONNX Runtime, LiteRT, gRPC core) write to file descriptor 2 behind Python's
back. :class:`NativeStderr` puts a pipe there and turns each line into a ``native_stderr``
event, with the library guessed from the line's format and the level it gave the line.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import IO, Any

import structlog

_LEVELS = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "error": 40,
}

#: syslog priorities (sd-daemon(3)) of structlog's level names.
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}


def journal_stream(fd: int, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal (``JOURNAL_STREAM`` names
    its device and inode, systemd.exec(5))."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def priority_prefix(level: str) -> str:
    """The sd-daemon prefix of ``level`` ("<3>" for error)."""
    return f"<{PRIORITIES.get(level, 6)}>"


def _with_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    def render(logger: Any, name: str, event_dict: structlog.typing.EventDict) -> str:
        level = str(event_dict.get("level", name))
        return priority_prefix(level) + str(renderer(logger, name, event_dict))

    return render


#: each logging method's level, for the level filter
_METHOD_LEVELS = {
    **_LEVELS,
    "warn": 30,
    "exception": 40,
    "critical": 50,
    "fatal": 50,
    "msg": 20,
}
_threshold = 20


def set_level(level: str) -> None:
    """Log ``level`` and above from now on (SIGHUP applies a changed ``log.level`` this way).

    Raises:
        KeyError: not one of debug, info, warning, error.
    """
    global _threshold  # noqa: PLW0603 - the one setting every logger reads
    _threshold = _LEVELS[level]


def _filter_level(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    if _METHOD_LEVELS.get(method, 20) < _threshold:
        raise structlog.DropEvent
    return event


def configure(level: str = "info", fmt: str = "json", *, journal: bool | None = None) -> None:
    """Render every event as one JSON line on stdout (or readable lines for a terminal), with
    the context variables (model, version, request_id) merged in first; with ``journal``
    (default: stdout is systemd's journal stream), each line starts with its priority."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    if journal is None:
        journal = journal_stream(sys.stdout.fileno()) if _has_fileno(sys.stdout) else False
    if journal:
        renderer = _with_priority(renderer)
    set_level(level)
    structlog.configure(
        processors=[
            _filter_level,  # first: a dropped event costs one call (the level can change)
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(10),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def _has_fileno(stream: IO[str]) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def stderr_prefix(level: str = "error") -> str:
    """The priority prefix for a plain message on stderr ("" unless stderr is the journal),
    so that ``edged: <config error>`` is an error in the journal, not info."""
    return priority_prefix(level) if journal_stream(2) else ""


def quiet_native_libraries(level: str) -> None:
    """Set the native libraries' own log thresholds to match ``level`` (log.level), where they
    have a knob: gRPC core's ``GRPC_VERBOSITY`` (read when gRPC starts, so call this before
    the first channel or server; an operator's own setting wins) and ONNX Runtime's default
    logger (sessions set their own severity in hal.cpu_onnx). LiteRT has none (it ignores
    ``TF_CPP_MIN_LOG_LEVEL``): its "INFO:" lines arrive as info events and the level filter
    drops them below info."""
    os.environ.setdefault("GRPC_VERBOSITY", "INFO" if level == "debug" else "ERROR")
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: PLC0415 - only the daemon needs it, at start

        # 0 verbose, 1 info, 2 warning, 3 error
        onnxruntime.set_default_logger_severity(1 if level == "debug" else 2)


# -- native stderr --------------------------------------------------------------------------

_ORT = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \[(?P<sev>[VIWEF]):onnxruntime:[^,\]]*, "
    r"(?P<where>[^\]]+)\] (?P<text>.*)$"
)
# absl / glog: gRPC core (and other C++ libraries built with absl logging).
_ABSL = re.compile(
    r"^(?P<sev>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ (?P<where>[^\]\s]+:\d+)\] (?P<text>.*)$"
)
# TFLite / LiteRT minimal logging: "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_LITERT = re.compile(r"^(?P<sev>VERBOSE|DEBUG|INFO|WARNING|ERROR|FATAL): (?P<text>.*)$")
_SEVERITY = {
    "V": "debug",
    "VERBOSE": "debug",
    "DEBUG": "debug",
    "I": "info",
    "INFO": "info",
    "W": "warning",
    "WARNING": "warning",
    "E": "error",
    "ERROR": "error",
    "F": "critical",
    "FATAL": "critical",
}
_LITERT_FILES = ("tensorflow", "tflite", "litert", "xnnpack")
_EDGETPU_FILES = ("edgetpu", "darwinn", "usb_")


def classify_native_line(line: str) -> dict[str, str]:
    """A line a native library wrote to stderr, as event fields: ``source`` (a guess from the
    line's format: "onnxruntime", "grpc", "litert", "edgetpu" or "unknown"), ``level`` (the
    severity the library gave it; "warning" when it gave none), ``message`` and, when the
    line names it, ``where`` (source file:line). Pure: no I/O."""
    match = _ORT.match(line)
    if match:
        return {
            "source": "onnxruntime",
            "level": _SEVERITY[match["sev"]],
            "message": match["text"],
            "where": match["where"],
        }
    match = _ABSL.match(line)
    if match:
        where = match["where"]
        lowered = where.lower()
        source = "grpc"
        if any(name in lowered for name in _LITERT_FILES):
            source = "litert"
        elif any(name in lowered for name in _EDGETPU_FILES):
            source = "edgetpu"
        return {
            "source": source,
            "level": _SEVERITY[match["sev"]],
            "message": match["text"],
            "where": where,
        }
    match = _LITERT.match(line)
    if match:
        return {"source": "litert", "level": _SEVERITY[match["sev"]], "message": match["text"]}
    return {"source": "unknown", "level": "warning", "message": line}


class NativeStderr:
    """File descriptor 2 redirected through a pipe that a thread reads, so that what native
    libraries write there becomes ``native_stderr`` events (:func:`classify_native_line`)
    instead of raw lines beside the JSON.

    Python's own ``sys.stderr`` (the CLI's messages, tracebacks, warnings) and
    ``faulthandler``'s crash dumps keep writing to the real stderr: they are not native
    output, and a crash dump must not depend on this thread being alive.

    Deadlocks and shutdown: the reader needs the GIL to log, so a native writer that holds
    the GIL and fills the pipe would wait for it forever; the pipe is enlarged to 1 MiB
    (``F_SETPIPE_SZ``) and the libraries' thresholds are lowered
    (:func:`quiet_native_libraries`), so that takes a megabyte of log lines from one call.
    ``stop()`` puts the real stderr back on fd 2, which closes this process's write end; the
    reader drains what is left, logs it, and ends at end-of-file. A child process that
    inherited fd 2 and still runs keeps the pipe open: ``stop()`` waits ``timeout_s`` for the
    reader, then leaves it (a daemon thread) to the process's exit. Lines are cut at
    ``max_line`` bytes.
    """

    def __init__(self, max_line: int = 16 * 1024, pipe_bytes: int = 1 << 20) -> None:
        self.max_line = max_line
        self.pipe_bytes = pipe_bytes
        self._log = structlog.get_logger("edged.native")
        self._saved: int | None = None
        self._real: IO[str] | None = None
        self._old_stderr: Any = None
        self._thread: threading.Thread | None = None
        self._faulthandler_was_enabled = False

    def start(self) -> None:
        """Redirect fd 2 and start the reader. Idempotent."""
        if self._saved is not None:
            return
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # Linux only; best effort
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, self.pipe_bytes)
        self._saved = os.dup(2)
        os.dup2(write_fd, 2)  # fd 2 stays inheritable: children write into the pipe too
        os.close(write_fd)
        self._real = os.fdopen(
            self._saved, "w", buffering=1, errors="backslashreplace", closefd=False
        )
        self._old_stderr = sys.stderr
        sys.stderr = self._real
        self._faulthandler_was_enabled = faulthandler.is_enabled()
        faulthandler.enable(file=self._real)
        self._thread = threading.Thread(
            target=self._read, args=(read_fd,), name="edged-native-stderr", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Put the real stderr back on fd 2, then let the reader log what is left. Idempotent."""
        if self._saved is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes our write end: the reader sees end-of-file
        faulthandler.disable()
        sys.stderr = self._old_stderr
        if self._faulthandler_was_enabled:
            faulthandler.enable(file=sys.stderr)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._real is not None:
            self._real.close()
        os.close(self._saved)
        self._saved, self._real, self._thread = None, None, None

    def _read(self, fd: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._emit(line)
                while len(pending) > self.max_line:
                    self._emit(pending[: self.max_line])
                    pending = pending[self.max_line :]
            if pending:
                self._emit(pending)
        finally:
            os.close(fd)

    def _emit(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        if not line.strip():
            return
        try:
            fields = classify_native_line(line)
            level = fields.pop("level")
            method = "critical" if level == "critical" else level
            getattr(self._log, method)("native_stderr", **fields)
        except Exception:  # never lose the line: fall back to the real stderr, raw
            real = self._real
            if real is not None:
                with contextlib.suppress(Exception):
                    real.write(json.dumps({"event": "native_stderr", "line": line}) + "\n")


@contextlib.contextmanager
def native_stderr_captured(enabled: bool = True) -> Iterator[None]:
    """Run the body with :class:`NativeStderr` capturing fd 2 (when ``enabled``)."""
    if not enabled:
        yield
        return
    capture = NativeStderr()
    capture.start()
    try:
        yield
    finally:
        capture.stop()
