"""Build the example LiteRT (.tflite) models from models/digits, without TensorFlow.

    .venv/bin/python models/build_tflite.py           # (re)write the .tflite files
    .venv/bin/python models/build_tflite.py --check   # rebuild in memory, fail if a file differs

The weights are read from ``models/digits/1/model.onnx`` (run ``models/build.py`` first) and
written as a TFLite flatbuffer with the schema module LiteRT itself ships
(``ai_edge_litert.schema_py_generated``), so no converter and no TensorFlow are involved:

- ``digits_tflite/1/model.tflite``: float32, the same graph as the ONNX model
  (SUB mean -> DIV scale -> FULLY_CONNECTED+RELU -> FULLY_CONNECTED -> SOFTMAX, ARG_MAX).
- ``digits_int8/1/model.tflite``: full-integer int8. The standardisation is folded into the
  first layer, weights are int8 (symmetric, one scale per tensor), biases int32, activations
  int8 with scales calibrated on the training split of scikit-learn's ``load_digits``.

Both take a dynamic batch (``shape_signature`` -1 on axis 0). Every model is run through the
LiteRT interpreter before it is written: the float model must agree with ONNX Runtime, and the
int8 model's held-out accuracy must stay within two points of the float model's. The output is
deterministic: two runs write byte-identical files (the build prints each SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter
from flatbuffers import Builder
from onnx import numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

MODELS_DIR = Path(__file__).resolve().parent
SEED = 20240517  # models/build.py's seed: the same train/test split of load_digits
DESCRIPTION = "edged models/build_tflite.py"
MAX_INT8_ACCURACY_DROP = 0.02

BO = tfl.BuiltinOperator
OPT = tfl.BuiltinOptions
F32 = np.dtype(np.float32)

_TENSOR_TYPE = {
    np.dtype(np.float32): tfl.TensorType.FLOAT32,
    np.dtype(np.int8): tfl.TensorType.INT8,
    np.dtype(np.int32): tfl.TensorType.INT32,
    np.dtype(np.int64): tfl.TensorType.INT64,
}


class _AlignedBufferT(tfl.BufferT):  # type: ignore[misc]
    """A buffer whose data starts on a 16-byte boundary, as the TFLite converter writes it
    (kernels read weights in place)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw

    def Pack(self, builder: Builder) -> int:  # the flatbuffers object API's method name
        data = None
        if self.raw:
            builder.StartVector(1, len(self.raw), 16)
            builder.head -= len(self.raw)
            builder.Bytes[builder.head : builder.head + len(self.raw)] = self.raw
            data = builder.EndVector()
        tfl.BufferStart(builder)
        if data is not None:
            tfl.BufferAddData(builder, data)
        return int(tfl.BufferEnd(builder))


@dataclass
class GraphWriter:
    """Collects tensors, buffers and operators of a one-subgraph TFLite model."""

    tensors: list[tfl.TensorT] = field(default_factory=list)
    buffers: list[tfl.BufferT] = field(default_factory=lambda: [_AlignedBufferT(b"")])
    opcodes: list[tuple[int, int]] = field(default_factory=list)  # (builtin code, version)
    operators: list[tfl.OperatorT] = field(default_factory=list)

    def tensor(
        self,
        name: str,
        dtype: np.dtype,
        shape: Sequence[int],
        data: np.ndarray | None = None,
        quant: tuple[float, int] | None = None,
    ) -> int:
        """Add a tensor (a constant when ``data`` is given); -1 in ``shape`` is a dynamic axis,
        stored as 1 in ``shape`` and -1 in ``shape_signature``."""
        t = tfl.TensorT()
        t.name = name
        t.type = _TENSOR_TYPE[np.dtype(dtype)]
        t.shape = [1 if d == -1 else d for d in shape]
        if -1 in shape:
            t.shapeSignature = list(shape)
        t.buffer = 0
        if data is not None:
            array = np.ascontiguousarray(data, dtype=dtype)
            if list(array.shape) != list(shape):
                raise ValueError(f"{name}: data shape {array.shape} != {shape}")
            self.buffers.append(
                _AlignedBufferT(array.astype(array.dtype.newbyteorder("<")).tobytes())
            )
            t.buffer = len(self.buffers) - 1
        if quant is not None:
            q = tfl.QuantizationParametersT()
            q.scale = [float(quant[0])]
            q.zeroPoint = [int(quant[1])]
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        version: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int = 0,
        options: object = None,
    ) -> None:
        """Add an operator; its operator code is shared with earlier uses of ``code``."""
        key = (code, version)
        if key not in self.opcodes:
            self.opcodes.append(key)
        o = tfl.OperatorT()
        o.opcodeIndex = self.opcodes.index(key)
        o.inputs = list(inputs)
        o.outputs = list(outputs)
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        self.operators.append(o)

    def finish(self, name: str, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        """The serialised model (file identifier TFL3, schema version 3)."""
        graph = tfl.SubGraphT()
        graph.name = name
        graph.tensors = self.tensors
        graph.inputs = list(inputs)
        graph.outputs = list(outputs)
        graph.operators = self.operators
        signature = tfl.SignatureDefT()
        signature.signatureKey = "serving_default"
        signature.subgraphIndex = 0
        signature.inputs = [self._tensor_map(i) for i in inputs]
        signature.outputs = [self._tensor_map(i) for i in outputs]
        model = tfl.ModelT()
        model.version = 3
        model.description = DESCRIPTION
        model.operatorCodes = []
        for code, version in self.opcodes:
            oc = tfl.OperatorCodeT()
            oc.builtinCode = code
            # The int8 field holds codes < 127; larger ones need builtin_code (schema 3a).
            oc.deprecatedBuiltinCode = min(code, BO.PLACEHOLDER_FOR_GREATER_OP_CODES)
            oc.version = version
            model.operatorCodes.append(oc)
        model.subgraphs = [graph]
        model.buffers = self.buffers
        model.signatureDefs = [signature]
        builder = Builder(4096)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def _tensor_map(self, index: int) -> tfl.TensorMapT:
        m = tfl.TensorMapT()
        m.name = self.tensors[index].name
        m.tensorIndex = index
        return m


def _fc_options(relu: bool) -> tfl.FullyConnectedOptionsT:
    o = tfl.FullyConnectedOptionsT()
    o.fusedActivationFunction = (
        tfl.ActivationFunctionType.RELU if relu else tfl.ActivationFunctionType.NONE
    )
    o.keepNumDims = False
    return o


def _argmax_options() -> tfl.ArgMaxOptionsT:
    o = tfl.ArgMaxOptionsT()
    o.outputType = tfl.TensorType.INT64
    return o


def _softmax_options() -> tfl.SoftmaxOptionsT:
    o = tfl.SoftmaxOptionsT()
    o.beta = 1.0
    return o


# --------------------------------------------------------------------------------------------
# weights and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsWeights:
    mean: np.ndarray  # (64,)
    scale: np.ndarray  # (64,)
    w1: np.ndarray  # (64 in, 64 out), as ONNX Gemm's B
    b1: np.ndarray
    w2: np.ndarray  # (64 in, 10 out)
    b2: np.ndarray


def read_digits_weights(path: Path) -> DigitsWeights:
    """The initializers of models/digits' ONNX graph, checked against the graph's shape."""
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    if ops != ["Sub", "Div", "Gemm", "Relu", "Gemm", "Softmax", "ArgMax"]:
        raise RuntimeError(f"{path}: unexpected graph {ops}; rebuild it with models/build.py")
    for node in model.graph.node:
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("transB", 0):
                raise RuntimeError(f"{path}: Gemm {node.name} transposes an operand")
    init = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    return DigitsWeights(
        mean=init["scaler_mean"],
        scale=init["scaler_scale"],
        w1=init["fc1_weight"],
        b1=init["fc1_bias"],
        w2=init["fc2_weight"],
        b2=init["fc2_bias"],
    )


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """models/build.py's split: 75% train (calibration), 25% held out (accuracy)."""
    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=SEED % (2**32)
    )
    return x_train, x_test, y_train, y_test


def run_litert(model: bytes, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``model`` once on the whole batch ``inputs`` (resizing the dynamic batch axis)."""
    interpreter = Interpreter(model_content=model, num_threads=1)
    (detail,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(detail["index"], list(inputs.shape), strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], inputs)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


# --------------------------------------------------------------------------------------------
# digits_tflite: float32, op for op the ONNX graph
# --------------------------------------------------------------------------------------------


def build_float(w: DigitsWeights) -> bytes:
    g = GraphWriter()
    x = g.tensor("input", F32, [-1, 64])
    mean = g.tensor("scaler_mean", F32, [64], w.mean)
    scale = g.tensor("scaler_scale", F32, [64], w.scale)
    centered = g.tensor("centered", F32, [-1, 64])
    standardized = g.tensor("standardized", F32, [-1, 64])
    w1 = g.tensor("fc1_weight", F32, [64, 64], w.w1.T)  # TFLite wants [out, in]
    b1 = g.tensor("fc1_bias", F32, [64], w.b1)
    hidden = g.tensor("hidden", F32, [-1, 64])
    w2 = g.tensor("fc2_weight", F32, [10, 64], w.w2.T)
    b2 = g.tensor("fc2_bias", F32, [10], w.b2)
    logits = g.tensor("logits", F32, [-1, 10])
    probabilities = g.tensor("probabilities", F32, [-1, 10])
    axis = g.tensor("argmax_axis", np.dtype(np.int32), [1], np.array([1], np.int32))
    label = g.tensor("label", np.dtype(np.int64), [-1])

    sub = tfl.SubOptionsT()
    g.op(BO.SUB, 1, [x, mean], [centered], OPT.SubOptions, sub)
    g.op(BO.DIV, 1, [centered, scale], [standardized], OPT.DivOptions, tfl.DivOptionsT())
    g.op(BO.FULLY_CONNECTED, 1, [standardized, w1, b1], [hidden], OPT.FullyConnectedOptions,
         _fc_options(relu=True))  # fmt: skip
    g.op(BO.FULLY_CONNECTED, 1, [hidden, w2, b2], [logits], OPT.FullyConnectedOptions,
         _fc_options(relu=False))  # fmt: skip
    g.op(BO.SOFTMAX, 1, [logits], [probabilities], OPT.SoftmaxOptions, _softmax_options())
    g.op(BO.ARG_MAX, 1, [logits, axis], [label], OPT.ArgMaxOptions, _argmax_options())
    return g.finish("digits_mlp", [x], [probabilities, label])


# --------------------------------------------------------------------------------------------
# digits_int8: full-integer quantisation, calibrated on the training split
# --------------------------------------------------------------------------------------------

I8 = np.dtype(np.int8)
I32 = np.dtype(np.int32)

#: Pixels are the integers 0..16: with scale 1/8 and zero point -128 every pixel value (and
#: every half pixel) is exact, so quantising a client's image loses nothing.
INPUT_QUANT = (0.125, -128)
#: LiteRT's int8 SOFTMAX requires exactly this output quantisation.
SOFTMAX_QUANT = (1.0 / 256.0, -128)


def _asymmetric(lo: float, hi: float) -> tuple[float, int]:
    """int8 (scale, zero point) covering [lo, hi] (widened to include 0, as TFLite does)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return float(np.float32(scale)), zero_point


def _calibrated_int8(w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """``w`` ([in, out]) as symmetric per-tensor int8 ([out, in]) and its scale.

    The clipping range is calibrated: of 100 candidates (1% .. 100% of max |w|), the one whose
    quantised layer ``x @ w`` is closest (mean squared error) to the float layer on the
    calibration inputs ``x``. Folding the standardisation into the first layer makes a few
    weights huge (pixels that are almost always 0 have a tiny standard deviation); scaling to
    the plain maximum would waste the int8 range on them and cost half the accuracy.
    """
    reference = x @ w
    peak = float(np.max(np.abs(w)))
    best: tuple[float, float] | None = None
    for percent in range(1, 101):
        scale = float(np.float32(peak * percent / 100.0 / 127.0))
        q = np.clip(np.round(w / scale), -127, 127)
        error = float(np.mean((x @ (q * scale) - reference) ** 2))
        if best is None or error < best[0]:
            best = (error, scale)
    assert best is not None
    scale = best[1]
    return np.clip(np.round(w.T / scale), -127, 127).astype(np.int8), scale


def build_int8(w: DigitsWeights, calibration: np.ndarray) -> tuple[bytes, list[str]]:
    # Fold (x - mean) / scale into the first layer: W1' = W1 / scale (per input row),
    # b1' = b1 - (mean / scale) @ W1, so the int8 model takes raw pixels.
    w1f = (w.w1 / w.scale[:, None]).astype(np.float64)
    b1f = w.b1.astype(np.float64) - (w.mean / w.scale).astype(np.float64) @ w.w1
    w2f = w.w2.astype(np.float64)
    b2f = w.b2.astype(np.float64)

    # Calibrate activation ranges with the float graph on the training images.
    hidden_f = np.maximum(calibration.astype(np.float64) @ w1f + b1f, 0.0)
    logits_f = hidden_f @ w2f + b2f
    hidden_q = _asymmetric(0.0, float(hidden_f.max()))
    logits_q = _asymmetric(float(logits_f.min()), float(logits_f.max()))

    w1q, w1s = _calibrated_int8(w1f, calibration.astype(np.float64))  # [out, in]
    w2q, w2s = _calibrated_int8(w2f, hidden_f)
    b1s = np.float64(np.float32(INPUT_QUANT[0])) * np.float64(np.float32(w1s))
    b2s = np.float64(np.float32(hidden_q[0])) * np.float64(np.float32(w2s))
    b1q = np.round(b1f / b1s).astype(np.int32)
    b2q = np.round(b2f / b2s).astype(np.int32)

    g = GraphWriter()
    x = g.tensor("input", I8, [-1, 64], quant=INPUT_QUANT)
    w1t = g.tensor("fc1_weight", I8, [64, 64], w1q, quant=(w1s, 0))
    b1t = g.tensor("fc1_bias", I32, [64], b1q, quant=(float(b1s), 0))
    hidden = g.tensor("hidden", I8, [-1, 64], quant=hidden_q)
    w2t = g.tensor("fc2_weight", I8, [10, 64], w2q, quant=(w2s, 0))
    b2t = g.tensor("fc2_bias", I32, [10], b2q, quant=(float(b2s), 0))
    logits = g.tensor("logits", I8, [-1, 10], quant=logits_q)
    probabilities = g.tensor("probabilities", I8, [-1, 10], quant=SOFTMAX_QUANT)
    axis = g.tensor("argmax_axis", I32, [1], np.array([1], np.int32))
    label = g.tensor("label", np.dtype(np.int64), [-1])
    # Operator versions are those the TFLite converter writes for int8 kernels.
    g.op(BO.FULLY_CONNECTED, 4, [x, w1t, b1t], [hidden], OPT.FullyConnectedOptions,
         _fc_options(relu=True))  # fmt: skip
    g.op(BO.FULLY_CONNECTED, 4, [hidden, w2t, b2t], [logits], OPT.FullyConnectedOptions,
         _fc_options(relu=False))  # fmt: skip
    g.op(BO.SOFTMAX, 2, [logits], [probabilities], OPT.SoftmaxOptions, _softmax_options())
    g.op(BO.ARG_MAX, 2, [logits, axis], [label], OPT.ArgMaxOptions, _argmax_options())
    notes = [
        f"input scale {INPUT_QUANT[0]} zero point {INPUT_QUANT[1]} (pixels 0..16 exact)",
        f"fc1 weight scale {w1s:.6g}, hidden scale {hidden_q[0]:.6g} zp {hidden_q[1]}",
        f"fc2 weight scale {w2s:.6g}, logits scale {logits_q[0]:.6g} zp {logits_q[1]}",
        f"probabilities scale {SOFTMAX_QUANT[0]} zero point {SOFTMAX_QUANT[1]}",
    ]
    return g.finish("digits_mlp_int8", [x], [probabilities, label]), notes


def quantize_input(x: np.ndarray) -> np.ndarray:
    """Pixels as the int8 model takes them."""
    scale, zero_point = INPUT_QUANT
    return np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)


# --------------------------------------------------------------------------------------------
# build, verify, write
# --------------------------------------------------------------------------------------------


@dataclass
class Built:
    relpath: str
    data: bytes
    notes: list[str]


def build_all() -> list[Built]:
    onnx_path = MODELS_DIR / "digits" / "1" / "model.onnx"
    weights = read_digits_weights(onnx_path)
    x_train, x_test, _, y_test = digits_split()
    x_all = load_digits().data.astype(np.float32)

    # float: must agree with ONNX Runtime on every image of the data set
    float_model = build_float(weights)
    got = run_litert(float_model, x_all)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    want_probs, want_labels = session.run(["probabilities", "label"], {"input": x_all})
    max_diff = float(np.max(np.abs(got["probabilities"] - want_probs)))
    if max_diff > 1e-5 or not np.array_equal(got["label"], want_labels):
        raise RuntimeError(f"digits_tflite differs from the ONNX model (max {max_diff:.2e})")
    float_acc = float(np.mean(run_litert(float_model, x_test)["label"] == y_test))

    int8_model, int8_notes = build_int8(weights, x_train)
    got8 = run_litert(int8_model, quantize_input(x_test))
    int8_acc = float(np.mean(got8["label"] == y_test))
    agree = float(np.mean(got8["label"] == run_litert(float_model, x_test)["label"]))
    if got8["probabilities"].dtype != np.int8 or got8["label"].dtype != np.int64:
        raise RuntimeError("digits_int8: wrong output dtypes")
    if int8_acc < float_acc - MAX_INT8_ACCURACY_DROP:
        raise RuntimeError(f"digits_int8: accuracy {int8_acc:.4f} vs float {float_acc:.4f}")
    n = len(y_test)
    return [
        Built(
            "digits_tflite/1/model.tflite",
            float_model,
            [
                f"held-out test accuracy {float_acc:.4f} ({round(float_acc * n)}/{n})",
                f"max |litert - onnxruntime| probability difference {max_diff:.2e} "
                f"over all {len(x_all)} images; labels identical",
            ],
        ),
        Built(
            "digits_int8/1/model.tflite",
            int8_model,
            [
                f"held-out test accuracy {int8_acc:.4f} ({round(int8_acc * n)}/{n}), "
                f"float model {float_acc:.4f}; labels agree with float on {agree:.2%}",
                *int8_notes,
            ],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with disk; write nothing")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="model repository to write")
    args = parser.parse_args(argv)
    stale = []
    for built in build_all():
        target = args.out / built.relpath
        digest = hashlib.sha256(built.data).hexdigest()
        if args.check:
            same = target.is_file() and target.read_bytes() == built.data
            status = "up to date" if same else "DIFFERS"
            if not same:
                stale.append(built.relpath)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(built.data)
            status = "written"
        print(f"{built.relpath}: {status}, {len(built.data)} bytes, sha256 {digest}")
        for note in built.notes:
            print(f"    {note}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run models/build_tflite.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
