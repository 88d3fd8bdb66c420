"""Variants of models/digits for OTA tests, free of pytest: its sample, its version-1 ONNX
bytes and model.toml, what ONNX Runtime answers, a bundle of any digits graph, and a version
that passes its self-test but fails requests in its health window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edged.fleet import build
from tests.daemon_process import EXAMPLE_MODELS

SAMPLE = np.load(EXAMPLE_MODELS / "digits" / "sample.npy")  # (2, 64), values 0..16
DIGITS_V1 = (EXAMPLE_MODELS / "digits" / "1" / "model.onnx").read_bytes()
MODEL_TOML = (EXAMPLE_MODELS / "digits" / "model.toml").read_text()


def run_onnx(onnx_bytes: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """What ONNX Runtime (CPU) answers to digits input ``x``."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x}), strict=True))


def write_digits_bundle(
    path: Path,
    version: int,
    onnx_bytes: bytes = DIGITS_V1,
    *,
    selftest_input: np.ndarray | None = None,
    expected: dict[str, np.ndarray] | None = None,
) -> Path:
    """Bundle ``onnx_bytes`` as digits ``version`` at ``path`` with the fleet's builder; the
    self-test expects what the model itself computes unless ``expected`` says otherwise."""
    x = SAMPLE if selftest_input is None else selftest_input
    return build.write_bundle(
        path,
        name="digits",
        version=version,
        fmt="onnx",
        artifacts={"model.onnx": onnx_bytes},
        model_toml=MODEL_TOML,
        inputs={"input": x},
        outputs=expected if expected is not None else run_onnx(onnx_bytes, x),
    )


def poisoned_digits_model() -> bytes:
    """digits v1 that fails inside ONNX Runtime on any row whose first pixel is 64 or more
    (it indexes a 64-entry table with it); digits' pixels are 0..16, so it passes its
    self-test and serves real digits correctly."""
    model = onnx.load_from_string(DIGITS_V1)
    graph = model.graph
    (output,) = [o for o in graph.output if o.name == "probabilities"]
    for node in graph.node:
        node.output[:] = ["probs_raw" if n == "probabilities" else n for n in node.output]
        node.input[:] = ["probs_raw" if n == "probabilities" else n for n in node.input]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(64, np.float32), "table"),
            numpy_helper.from_array(np.array([0], np.int64), "first"),
            numpy_helper.from_array(np.array([1], np.int64), "second"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Slice", ["input", "first", "second", "second"], ["pixel0"]),
            helper.make_node("Cast", ["pixel0"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["zeros"]),  # [N, 1]
            helper.make_node("Add", ["probs_raw", "zeros"], [output.name]),
        ]
    )
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def poisoned(i: int) -> np.ndarray:
    x = SAMPLE[:1].copy()
    x[0, 0] = 100.0
    return x
