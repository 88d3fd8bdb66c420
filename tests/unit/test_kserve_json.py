"""The KServe v2 REST codec: JSON and binary tensors round-trip for every datatype, bad bodies
are refused naming the field, and a large body is decoded off the event loop."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edged.core.errors import InvalidInputError, ModelNotFoundError, UnsupportedError
from edged.core.tensors import encode_raw
from edged.core.types import DataType, InferResponse
from edged.frontends import http as http_frontend
from edged.frontends import kserve_json
from edged.security.access import Credentials
from edged.serving.dataplane import DataPlane
from edged.serving.manager import ModelManager

NUMERIC = [dt for dt in DataType if dt not in (DataType.BYTES,)]


def _binary_request(name: str, array: np.ndarray) -> tuple[dict[str, Any], memoryview]:
    data = encode_raw(array)
    header = {
        "inputs": [
            {
                "name": name,
                "datatype": DataType.from_numpy(array.dtype).value,
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(data)},
            }
        ]
    }
    return header, memoryview(data)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), datatype=st.sampled_from(NUMERIC))
def test_binary_and_json_inputs_decode_to_the_same_array(data: Any, datatype: DataType) -> None:
    dtype = datatype.numpy_dtype
    array = data.draw(
        hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))
        .filter(lambda a: dtype.kind != "f" or bool(np.isfinite(a).all()))
    )
    header, binary = _binary_request("x", array)
    got, _, _ = kserve_json.request_from_json("m", "", header, binary)
    np.testing.assert_array_equal(got.inputs["x"], array)
    as_json = {
        "inputs": [
            {
                "name": "x",
                "datatype": datatype.value,
                "shape": list(array.shape),
                "data": array.tolist(),
            }
        ]
    }
    got, _, _ = kserve_json.request_from_json("m", "", as_json, memoryview(b""))
    assert got.inputs["x"].dtype == dtype
    np.testing.assert_array_equal(got.inputs["x"], array)


def test_response_binary_and_json_bodies() -> None:
    outputs = {
        "a": np.arange(6, dtype=np.float16).reshape(2, 3),
        "s": np.array([b"x", "ü".encode()], dtype=object),
    }
    response = InferResponse("m", "1", outputs, "id-1")
    body, length = kserve_json.response_to_body(response, set(), all_binary=False)
    assert length is None
    head = json.loads(body)
    assert head["id"] == "id-1"
    assert head["outputs"][1]["data"] == ["x", "ü"]
    body, length = kserve_json.response_to_body(response, {"a"}, all_binary=False)
    assert length is not None
    head = json.loads(body[:length])
    size = head["outputs"][0]["parameters"]["binary_data_size"]
    assert body[length : length + size] == outputs["a"].tobytes()
    assert head["outputs"][1]["data"] == ["x", "ü"]


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}, "range"),
        ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1.5]}]}, "integers"),
        ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}, "true or"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]}, "strings"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}, "no data"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "inputs[0] has no name"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": "1", "data": [1]}]}, "shape"),
        ({"id": 3, "inputs": []}, "'id'"),
    ],
)
def test_bad_tensors_name_the_field(header: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(needle)):
        kserve_json.request_from_json("m", "", header, memoryview(b""))


def test_shared_memory_and_classification_are_grpc_only() -> None:
    shm = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1],
                "parameters": {"shared_memory_region": "r"},
            }
        ]
    }
    with pytest.raises(UnsupportedError, match="gRPC only"):
        kserve_json.request_from_json("m", "", shm, memoryview(b""))
    cls = {"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 3}}]}
    with pytest.raises(UnsupportedError, match="classification"):
        kserve_json.request_from_json("m", "", cls, memoryview(b""))


def test_a_large_body_is_decoded_on_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, bool] = {}
    decode = kserve_json.request_from_json

    def watched(*args: Any) -> Any:
        seen["on_loop_thread"] = threading.current_thread() is threading.main_thread()
        return decode(*args)

    monkeypatch.setattr(kserve_json, "request_from_json", watched)
    plane = DataPlane(ModelManager(tmp_path, devices=[]), is_ready=lambda: True)
    frontend = http_frontend.HttpFrontend(plane, "127.0.0.1:0")
    values = list(range(100_000))
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "INT32", "shape": [len(values)], "data": values}]}
    ).encode()
    request = http_frontend._Request(
        "POST", ["v2", "models", "absent", "infer"], {}, body, Credentials("http", "", True)
    )
    with pytest.raises(ModelNotFoundError):
        asyncio.run(frontend._infer(request, ["absent", ""]))
    assert seen == {"on_loop_thread": False}
