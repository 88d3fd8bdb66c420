"""A large ModelInferRequest is decoded on a worker thread: the event loop that serves every
other client keeps turning meanwhile (issue #11: 200,000 tiny inputs held it ~4.7 s)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from edged._proto.inference import grpc_service_pb2 as pb
from edged.core.errors import ModelNotFoundError, OverloadedError
from edged.core.limits import RequestLimits
from edged.frontends import grpc as grpc_frontend
from edged.frontends import kserve_codec
from edged.serving.dataplane import DataPlane
from edged.serving.manager import ModelManager


def _servicer(repo: Path) -> grpc_frontend.InferenceServicer:
    return grpc_frontend.InferenceServicer(
        DataPlane(
            ModelManager(repo, devices=[]),
            is_ready=lambda: True,
            limits=RequestLimits(max_inputs=300_000),
        )
    )


def _many_inputs(count: int) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="absent")
    for i in range(count):
        message.inputs.add(name=f"i{i}", datatype="UINT8", shape=[1])
        message.raw_input_contents.append(b"\x00")
    return message


def _watch_decoding(monkeypatch: pytest.MonkeyPatch, ticks: list[int]) -> dict[str, Any]:
    """Record which thread decodes and how far the loop's ticker got meanwhile."""
    seen: dict[str, Any] = {}
    decode = kserve_codec.request_from_proto

    def watched(*args: Any, **kwargs: Any) -> Any:
        seen["on_loop_thread"] = threading.current_thread() is threading.main_thread()
        seen["ticks_before"] = ticks[0]
        try:
            return decode(*args, **kwargs)
        finally:
            seen["ticks_after"] = ticks[0]

    monkeypatch.setattr(kserve_codec, "request_from_proto", watched)
    return seen


async def _infer_with_ticker(
    servicer: grpc_frontend.InferenceServicer, message: pb.ModelInferRequest, ticks: list[int]
) -> None:
    async def ticker() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0.001)

    running = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    try:
        with pytest.raises(ModelNotFoundError):
            await servicer._infer(message)
    finally:
        running.cancel()


def test_large_request_is_decoded_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = [0]
    seen = _watch_decoding(monkeypatch, ticks)
    asyncio.run(_infer_with_ticker(_servicer(tmp_path), _many_inputs(50_000), ticks))
    assert seen["on_loop_thread"] is False
    assert seen["ticks_after"] > seen["ticks_before"]  # other work ran while it decoded


def test_small_request_is_decoded_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = [0]
    seen = _watch_decoding(monkeypatch, ticks)
    asyncio.run(_infer_with_ticker(_servicer(tmp_path), _many_inputs(2), ticks))
    assert seen["on_loop_thread"] is True


def test_limits_are_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _watch_decoding(monkeypatch, [0])
    servicer = grpc_frontend.InferenceServicer(
        DataPlane(ModelManager(tmp_path, devices=[]), is_ready=lambda: True)
    )
    with pytest.raises(OverloadedError, match=r"limits\.max_inputs"):
        asyncio.run(servicer._infer(_many_inputs(257)))
    assert seen == {}  # never decoded
