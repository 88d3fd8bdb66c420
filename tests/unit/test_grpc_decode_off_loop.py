"""ModelInfer is checked and decoded on the gRPC server's handler thread, never on the event
loop that serves every other call (issue #11: 200,000 tiny inputs held the loop ~4.7 s), and
the limits are checked before anything is decoded."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from edged._proto.inference import grpc_service_pb2 as pb
from edged.core.errors import OverloadedError
from edged.core.limits import RequestLimits
from edged.frontends import grpc as grpc_frontend
from edged.frontends import kserve_codec
from edged.serving.dataplane import DataPlane
from edged.serving.manager import ModelManager


def _inference(repo: Path, limits: RequestLimits | None = None) -> grpc_frontend.ThreadInference:
    plane = DataPlane(
        ModelManager(repo, devices=[]), is_ready=lambda: True, limits=limits or RequestLimits()
    )
    return grpc_frontend.ThreadInference(plane)


def _many_inputs(count: int) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="absent")
    for i in range(count):
        message.inputs.add(name=f"i{i}", datatype="UINT8", shape=[1])
        message.raw_input_contents.append(b"\x00")
    return message


def _watch_decoding(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    decode = kserve_codec.request_from_proto

    def watched(*args: Any, **kwargs: Any) -> Any:
        seen["thread"] = threading.current_thread()
        return decode(*args, **kwargs)

    monkeypatch.setattr(kserve_codec, "request_from_proto", watched)
    return seen


def test_large_request_is_decoded_on_the_calling_handler_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _watch_decoding(monkeypatch)
    inference = _inference(tmp_path, RequestLimits(max_inputs=300_000))
    outcome: dict[str, Any] = {}

    def handler() -> None:
        request, _ = inference._decode(_many_inputs(50_000))
        outcome["inputs"] = len(request.inputs)

    thread = threading.Thread(target=handler, name="grpc-handler")
    thread.start()
    thread.join(60)
    assert outcome["inputs"] == 50_000
    assert seen["thread"] is thread
    assert seen["thread"] is not threading.main_thread()


def test_limits_are_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _watch_decoding(monkeypatch)
    with pytest.raises(OverloadedError, match=r"limits\.max_inputs"):
        _inference(tmp_path)._decode(_many_inputs(257))
    assert seen == {}  # never decoded
