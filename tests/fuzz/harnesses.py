"""Fuzz harnesses: each takes arbitrary bytes, feeds them to one decoder edged runs on client
or fleet input, and fails (raises something other than the decoder's documented errors) only
on a bug. The same functions run under atheris (`make fuzz`, tests/fuzz/run.py) and under
hypothesis with the checked-in seed corpus (tests/fuzz/test_fuzz.py, part of `make test`).

A crash found becomes a seed in tests/fuzz/corpus/<target>/ (so every `make test` replays it)
and, where it names a defect, a regression test beside the code's other tests.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from edged._proto.inference import grpc_service_pb2 as pb
from edged.core.errors import (
    InvalidInputError,
    ModelLoadError,
    OverloadedError,
    UnsupportedError,
)
from edged.core.limits import RequestLimits
from edged.core.tensors import decode_bytes, encode_raw
from edged.frontends import kserve_codec, zmq_wire
from edged.ota import archive, bundle
from edged.ota.errors import BundleError, UnsafeArchiveError
from edged.serving.repository import parse_model_toml

#: the frame separator in a ZeroMQ harness input (ASCII record separator)
FRAME_SEPARATOR = b"\x1e"
#: small limits, so that inputs stay small and the checks are reached
LIMITS = RequestLimits(max_inputs=16, max_outputs=16, max_parameters=16)
ARCHIVE_LIMITS = archive.Limits(max_bytes=1 << 20, max_files=32)

REQUEST_ERRORS = (InvalidInputError, OverloadedError, UnsupportedError)


def kserve_request(data: bytes) -> None:
    """A ModelInferRequest off the wire, decoded as the gRPC frontend does."""
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return  # gRPC's deserializer refuses it before edged sees it
    try:
        kserve_codec.check_limits(message, LIMITS)
        kserve_codec.request_from_proto(message, None)
        kserve_codec.output_spans(message, None)
    except REQUEST_ERRORS:
        return


def zmq_message(data: bytes) -> None:
    """A ZeroMQ message (frames split at FRAME_SEPARATOR), decoded as the ZeroMQ frontend does
    (and as a client decodes a reply)."""
    frames = data.split(FRAME_SEPARATOR)
    try:
        header = zmq_wire.read_header(frames[0])
        zmq_wire.request_id(header)
        zmq_wire.decodes_inline(header)
        zmq_wire.decode_body(header, frames[1:], LIMITS)
    except REQUEST_ERRORS:
        pass
    with contextlib.suppress(*REQUEST_ERRORS):
        zmq_wire.decode_reply(frames)


def bytes_tensor(data: bytes) -> None:
    """BYTES raw contents: the first byte is the element count. What decodes re-encodes to the
    same bytes."""
    if not data:
        return
    count, raw = data[0], data[1:]
    try:
        array = decode_bytes("t", (count,), raw)
    except InvalidInputError:
        return
    assert array.shape == (count,)
    assert encode_raw(array) == raw


def model_toml(data: bytes) -> None:
    """A model.toml as the repository reads it."""
    try:
        parsed = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return
    with contextlib.suppress(ModelLoadError):
        parse_model_toml(Path("/nonexistent/fuzzed"), parsed)


def _archive_file(data: bytes, folder: Path) -> Path:
    path = folder / "bundle.tar.gz"
    path.write_bytes(data)
    return path


def bundle_archive(data: bytes) -> None:
    """A bundle archive as a device checks it (archive rules, then the bundle), and, when it
    passes, unpacked into a scratch folder: nothing may land outside it."""
    with tempfile.TemporaryDirectory(prefix="edged-fuzz-") as scratch:
        folder = Path(scratch)
        path = _archive_file(data, folder)
        try:
            archive.scan(path, ARCHIVE_LIMITS)
        except UnsafeArchiveError:
            return
        with contextlib.suppress(UnsafeArchiveError, BundleError):
            bundle.inspect_bundle(path, ARCHIVE_LIMITS)
        target = folder / "out"
        target.mkdir()
        with contextlib.suppress(UnsafeArchiveError):
            unpacked = archive.extract(path, target, ARCHIVE_LIMITS)
            assert unpacked.resolve().is_relative_to(target.resolve())
        escaped = [p for p in folder.iterdir() if p.name not in ("bundle.tar.gz", "out")]
        assert not escaped, escaped


def tar_of(members: dict[str, bytes]) -> bytes:
    """A gzipped tar of ``members`` (for seeds)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


HARNESSES: dict[str, Callable[[bytes], None]] = {
    "kserve_request": kserve_request,
    "zmq_message": zmq_message,
    "bytes_tensor": bytes_tensor,
    "model_toml": model_toml,
    "bundle_archive": bundle_archive,
}
