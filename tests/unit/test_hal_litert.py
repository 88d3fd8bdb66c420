"""cpu-litert: the example .tflite models through the executor's public API, checked against
ONNX Runtime on the original digits model and against scikit-learn's labels."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_digits

from edged.core.errors import ExecutorError, InvalidInputError, ModelLoadError
from edged.core.types import DataType, TensorSpec
from hal import ExecutorOptions, ModelArtifact, get_executor
from hal.cpu_litert import LiteRtCpuExecutor, LiteRtModel, load_runtime
from hal.tflite_format import EDGETPU_CUSTOM_OP, NotTfliteError, custom_ops, is_edgetpu_model
from tests.daemon_process import EXAMPLE_MODELS
from tests.tflitegen import DIGITS_INT8, DIGITS_TFLITE, with_custom_op

DIGITS_ONNX = EXAMPLE_MODELS / "digits" / "1" / "model.onnx"


def load(path: Path, threads: int = 1) -> LiteRtModel:
    model = LiteRtCpuExecutor().load(
        ModelArtifact(path, "tflite"), ExecutorOptions(intra_op_threads=threads)
    )
    assert isinstance(model, LiteRtModel)
    return model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_digits().data.astype(np.float32)


@pytest.fixture(scope="module")
def onnx_reference(images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"])
    probs, labels = session.run(["probabilities", "label"], {"input": images})
    return {"probabilities": probs, "label": labels}


def test_registered_under_its_entry_point() -> None:
    assert isinstance(get_executor("cpu-litert"), LiteRtCpuExecutor)


def test_float_signature_is_read_from_the_flatbuffer() -> None:
    model = load(DIGITS_TFLITE)
    assert model.kind == "cpu-litert"
    assert model.signature.inputs == (TensorSpec("input", DataType.FP32, (-1, 64)),)
    assert model.signature.outputs == (
        TensorSpec("probabilities", DataType.FP32, (-1, 10)),
        TensorSpec("label", DataType.INT64, (-1,)),
    )
    assert model.quantization == {}
    model.close()


def test_xnnpack_delegate_is_applied() -> None:
    model = load(DIGITS_TFLITE, threads=2)
    assert model.delegated_nodes >= 1  # LiteRT's default XNNPACK delegate took the graph
    model.close()


def test_float_model_matches_onnx_runtime(
    images: np.ndarray, onnx_reference: dict[str, np.ndarray]
) -> None:
    model = load(DIGITS_TFLITE)
    out = model.infer({"input": images})
    np.testing.assert_allclose(out["probabilities"], onnx_reference["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(out["label"], onnx_reference["label"])
    assert out["label"].dtype == np.int64
    model.close()


def test_batch_size_changes_resize_and_answers_stay_per_row(
    images: np.ndarray, onnx_reference: dict[str, np.ndarray]
) -> None:
    model = load(DIGITS_TFLITE)
    start = 0
    for n in (1, 7, 7, 1, 32, 3):  # grow, repeat (no resize), shrink, grow again
        out = model.infer({"input": images[start : start + n]})
        assert out["probabilities"].shape == (n, 10)
        np.testing.assert_array_equal(out["label"], onnx_reference["label"][start : start + n])
        start += n
    model.close()


def test_outputs_are_not_overwritten_by_the_next_inference(images: np.ndarray) -> None:
    model = load(DIGITS_TFLITE)
    first = model.infer({"input": images[:4]})
    kept = first["probabilities"].copy()
    model.infer({"input": images[4:8]})
    np.testing.assert_array_equal(first["probabilities"], kept)
    model.close()


def test_int8_model_reports_real_dtypes_and_quantization() -> None:
    model = load(DIGITS_INT8)
    assert model.signature.inputs == (TensorSpec("input", DataType.INT8, (-1, 64)),)
    assert model.signature.outputs[0] == TensorSpec("probabilities", DataType.INT8, (-1, 10))
    assert model.quantization["input"] == (0.125, -128)
    assert model.quantization["probabilities"] == (1 / 256, -128)
    assert "label" not in model.quantization
    model.close()


def test_int8_model_is_as_accurate_as_the_float_one(
    images: np.ndarray, onnx_reference: dict[str, np.ndarray]
) -> None:
    target = load_digits().target
    model = load(DIGITS_INT8)
    scale, zero_point = model.quantization["input"]
    q = np.clip(np.round(images / scale) + zero_point, -128, 127).astype(np.int8)
    out = model.infer({"input": q})
    int8_accuracy = float(np.mean(out["label"] == target))
    float_accuracy = float(np.mean(onnx_reference["label"] == target))
    assert int8_accuracy >= float_accuracy - 0.02
    # dequantised probabilities are close to the float model's
    p_scale, p_zero = model.quantization["probabilities"]
    probs = (out["probabilities"].astype(np.float32) - p_zero) * p_scale
    assert float(np.mean(np.abs(probs - onnx_reference["probabilities"]))) < 0.01
    model.close()


def test_wrong_dtype_is_invalid_input(images: np.ndarray) -> None:
    model = load(DIGITS_INT8)
    with pytest.raises(InvalidInputError, match="float32 given, the model takes int8"):
        model.infer({"input": images[:1]})
    model.close()


def test_a_static_axis_cannot_be_resized(images: np.ndarray) -> None:
    model = load(DIGITS_TFLITE)
    with pytest.raises(InvalidInputError, match=r"shape \[2, 63\] does not fit"):
        model.infer({"input": images[:2, :63].copy()})
    # the failed resize leaves the model usable
    assert model.infer({"input": images[:2]})["label"].shape == (2,)
    model.close()


def test_infer_after_close_is_an_executor_error(images: np.ndarray) -> None:
    model = load(DIGITS_TFLITE)
    model.close()
    model.close()  # idempotent
    with pytest.raises(ExecutorError, match="closed"):
        model.infer({"input": images[:1]})


def test_close_waits_for_a_running_inference(images: np.ndarray) -> None:
    model = load(DIGITS_TFLITE)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(200):
                model.infer({"input": images[:16]})
        except ExecutorError:
            pass  # closed between two calls: the documented answer
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    model.close()
    worker.join(30)
    assert not errors


def test_refuses_a_model_compiled_for_the_edge_tpu(tmp_path: Path) -> None:
    marked = with_custom_op(DIGITS_TFLITE, tmp_path / "model.tflite")
    with pytest.raises(ModelLoadError, match=r"compiled for the Edge TPU.*edgetpu-tflite"):
        LiteRtCpuExecutor().load(ModelArtifact(marked, "tflite"), ExecutorOptions())


def test_an_unknown_custom_op_fails_to_load_with_the_runtime_message(tmp_path: Path) -> None:
    marked = with_custom_op(DIGITS_TFLITE, tmp_path / "model.tflite", name="MyOp", used=True)
    with pytest.raises(ModelLoadError, match="unresolved custom op: MyOp"):
        LiteRtCpuExecutor().load(ModelArtifact(marked, "tflite"), ExecutorOptions())


@pytest.mark.parametrize(
    "content", [b"", b"not a model at all", b"\x10\x00\x00\x00TFL3" + b"\xff" * 8]
)
def test_garbage_is_not_a_tflite_model(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a TFLite model"):
        LiteRtCpuExecutor().load(ModelArtifact(path, "tflite"), ExecutorOptions())


def test_wrong_format_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="cannot run format 'onnx'"):
        LiteRtCpuExecutor().load(ModelArtifact(DIGITS_ONNX, "onnx"), ExecutorOptions())


# -- the flatbuffer reader ------------------------------------------------------------------


def test_custom_op_detection(tmp_path: Path) -> None:
    assert custom_ops(DIGITS_TFLITE) == []
    assert not is_edgetpu_model(DIGITS_INT8)
    declared = with_custom_op(DIGITS_INT8, tmp_path / "a.tflite")
    used = with_custom_op(DIGITS_TFLITE, tmp_path / "b.tflite", used=True)
    other = with_custom_op(
        DIGITS_TFLITE, tmp_path / "c.tflite", name="TFLite_Detection_PostProcess"
    )
    assert custom_ops(declared) == [EDGETPU_CUSTOM_OP]
    assert is_edgetpu_model(declared)
    assert is_edgetpu_model(used)
    assert not is_edgetpu_model(other)


def test_truncated_flatbuffer_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "cut.tflite"
    path.write_bytes(DIGITS_TFLITE.read_bytes()[:64])
    with pytest.raises(NotTfliteError):
        is_edgetpu_model(path)


def test_runtime_is_ai_edge_litert() -> None:
    runtime = load_runtime()
    assert runtime.package == "ai-edge-litert"
    assert runtime.builtin_resolver.name == "BUILTIN"


def test_example_tflite_models_are_rebuilt_byte_for_byte() -> None:
    """models/build_tflite.py --check: the committed files are what the build writes (and its
    own checks, ONNX Runtime agreement and int8 accuracy, pass)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(EXAMPLE_MODELS / "build_tflite.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("up to date") == 2
