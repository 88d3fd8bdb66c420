"""Rebuild every example model in this model repository, deterministically.

    .venv/bin/python models/build.py           # (re)write models/<name>/<version>/model.onnx
    .venv/bin/python models/build.py --check   # rebuild in memory, fail if a file on disk differs

Every graph is written by hand with ``onnx.helper`` (opset 17, IR version 8, so any
onnxruntime >= 1.17 loads it); no skl2onnx, no downloads. The only data set used is
scikit-learn's bundled ``load_digits``. Seeds are fixed, so two runs on the same machine
produce byte-identical files (the build prints each file's SHA-256 to make that easy to see).

Each model is checked with onnxruntime before it is written: the digits classifier against
scikit-learn's own predictions, the others against numpy reference implementations.

The ``model.toml`` files next to each model are written by hand and are not touched here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

MODELS_DIR = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8
PRODUCER = "edged models/build.py"
SEED = 20240517  # every random choice below derives from this


@dataclass
class Built:
    """One model artifact: where it goes (relative to models/), and what to report about it."""

    relpath: str
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)


def _finish(
    graph: onnx.GraphProto, doc: str, metadata: dict[str, str] | None = None
) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    for key, value in sorted((metadata or {}).items()):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def _serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(_serialize(model), providers=["CPUExecutionProvider"])


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


# --------------------------------------------------------------------------------------------
# digits: MLP classifier trained on scikit-learn's bundled 8x8 digits
# --------------------------------------------------------------------------------------------


def build_digits() -> Built:
    data = load_digits()
    x = data.data.astype(np.float64)  # (1797, 64), pixel values 0..16
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=SEED % (2**32)
    )

    scaler = StandardScaler().fit(x_train)
    clf = MLPClassifier(
        hidden_layer_sizes=(64,),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        learning_rate_init=1e-3,
        max_iter=500,
        tol=1e-4,
        n_iter_no_change=10,
        random_state=SEED % (2**32),
    )
    clf.fit(scaler.transform(x_train), y_train)
    if not np.array_equal(clf.classes_, np.arange(10)):
        raise RuntimeError(f"unexpected classes {clf.classes_}")
    if clf.out_activation_ != "softmax":
        raise RuntimeError(f"unexpected output activation {clf.out_activation_}")

    mean = scaler.mean_.astype(np.float32)
    scale = scaler.scale_.astype(np.float32)  # StandardScaler already maps zero variance to 1
    w1, w2 = (w.astype(np.float32) for w in clf.coefs_)  # (64, 64), (64, 10)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)  # (64,), (10,)

    nodes = [
        helper.make_node("Sub", ["input", "scaler_mean"], ["centered"], name="scaler_sub"),
        helper.make_node("Div", ["centered", "scaler_scale"], ["standardized"], name="scaler_div"),
        helper.make_node("Gemm", ["standardized", "fc1_weight", "fc1_bias"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["hidden"], name="relu1"),
        helper.make_node("Gemm", ["hidden", "fc2_weight", "fc2_bias"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        outputs=[
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            _init("scaler_mean", mean),
            _init("scaler_scale", scale),
            _init("fc1_weight", w1),
            _init("fc1_bias", b1),
            _init("fc2_weight", w2),
            _init("fc2_bias", b2),
        ],
    )
    model = _finish(
        graph,
        "8x8 handwritten digit classifier (scikit-learn load_digits): standardise -> "
        "Gemm(64) -> Relu -> Gemm(10) -> Softmax. Input: 64 pixel values in 0..16, row-major.",
        {"dataset": "sklearn.datasets.load_digits", "classes": ",".join(map(str, range(10)))},
    )

    # Check the exported graph against scikit-learn itself, then measure held-out accuracy.
    sess = _session(model)
    probs, labels = sess.run(None, {"input": x_test.astype(np.float32)})
    sk_probs = clf.predict_proba(scaler.transform(x_test))
    sk_labels = clf.predict(scaler.transform(x_test))
    max_diff = float(np.max(np.abs(probs - sk_probs)))
    if max_diff > 1e-4:
        raise RuntimeError(f"digits: onnx vs sklearn probabilities differ by {max_diff}")
    if not np.array_equal(labels, sk_labels):
        raise RuntimeError("digits: onnx labels differ from sklearn predictions")
    if probs.dtype != np.float32 or labels.dtype != np.int64 or labels.shape != (len(x_test),):
        raise RuntimeError(f"digits: bad output types {probs.dtype} {labels.dtype} {labels.shape}")
    correct = int(np.sum(labels == y_test))
    accuracy = correct / len(y_test)
    if accuracy < 0.93:
        raise RuntimeError(f"digits: held-out accuracy too low: {accuracy:.4f}")
    return Built(
        "digits/1/model.onnx",
        model,
        [
            f"held-out test accuracy {accuracy:.4f} ({correct}/{len(y_test)}),"
            f" train {len(y_train)} / test {len(y_test)}, {clf.n_iter_} epochs",
            f"max |onnx - sklearn| probability difference {max_diff:.2e}",
        ],
    )


# --------------------------------------------------------------------------------------------
# multi_io: several inputs and outputs of different datatypes, batchable on axis 0
# --------------------------------------------------------------------------------------------


def build_multi_io() -> Built:
    vi = helper.make_tensor_value_info
    inputs = [
        vi("x", TensorProto.FLOAT, ["batch", 4]),
        vi("offset", TensorProto.FLOAT16, ["batch", 4]),
        vi("mask", TensorProto.BOOL, ["batch", 4]),
        vi("ids", TensorProto.INT64, ["batch", 3]),
        vi("raw", TensorProto.UINT8, ["batch", 2]),
        vi("text", TensorProto.STRING, ["batch", 1]),
    ]
    outputs = [
        vi("y", TensorProto.FLOAT, ["batch", 4]),
        vi("y_half", TensorProto.FLOAT16, ["batch", 4]),
        vi("masked", TensorProto.INT32, ["batch", 4]),
        vi("ids_sum", TensorProto.INT64, ["batch"]),
        vi("any_mask", TensorProto.BOOL, ["batch"]),
        vi("raw_inv", TensorProto.UINT8, ["batch", 2]),
        vi("text_out", TensorProto.STRING, ["batch", 1]),
    ]
    initializers = [
        _init("two", np.array(2.0, dtype=np.float32)),
        _init("zero_i32", np.array(0, dtype=np.int32)),
        _init("axis1", np.array([1], dtype=np.int64)),
        _init("u8_max", np.array(255, dtype=np.uint8)),
    ]
    make = helper.make_node
    nodes = [
        # y = x * 2 + float(offset); y_half = half(y)
        make("Mul", ["x", "two"], ["x_times_two"], name="x_times_two"),
        make("Cast", ["offset"], ["offset_f32"], name="offset_to_f32", to=TensorProto.FLOAT),
        make("Add", ["x_times_two", "offset_f32"], ["y"], name="y"),
        make("Cast", ["y"], ["y_half"], name="y_to_f16", to=TensorProto.FLOAT16),
        # masked = mask ? int32(x) : 0  (Cast truncates toward zero)
        make("Cast", ["x"], ["x_i32"], name="x_to_i32", to=TensorProto.INT32),
        make("Where", ["mask", "x_i32", "zero_i32"], ["masked"], name="masked"),
        # ids_sum = sum(ids, axis=1); opset 13+ ReduceSum takes axes as an input
        make("ReduceSum", ["ids", "axis1"], ["ids_sum"], name="ids_sum", keepdims=0),
        # any_mask = max(int32(mask), axis=1) > 0; opset 17 ReduceMax still takes an axes attribute
        make("Cast", ["mask"], ["mask_i32"], name="mask_to_i32", to=TensorProto.INT32),
        make("ReduceMax", ["mask_i32"], ["mask_max"], name="mask_max", axes=[1], keepdims=0),
        make("Greater", ["mask_max", "zero_i32"], ["any_mask"], name="any_mask"),
        # raw_inv = 255 - raw
        make("Sub", ["u8_max", "raw"], ["raw_inv"], name="raw_inv"),
        # onnxruntime's StringNormalizer only accepts [C] or [1, C] inputs (and needs the
        # en_US.UTF-8 locale installed), so the string path is a plain Identity.
        make("Identity", ["text"], ["text_out"], name="text_out"),
    ]
    graph = helper.make_graph(nodes, "multi_io", inputs, outputs, initializer=initializers)
    model = _finish(
        graph,
        "Datatype test model: six inputs and seven outputs of different datatypes, "
        "all batchable on axis 0.",
    )

    # Verify every output against numpy for a random batch of 3.
    rng = np.random.default_rng(SEED)
    n = 3
    feeds = {
        "x": rng.uniform(-10, 10, size=(n, 4)).astype(np.float32),
        "offset": rng.uniform(-4, 4, size=(n, 4)).astype(np.float16),
        "mask": np.array([[True, False, True, False], [False] * 4, [False, False, False, True]]),
        "ids": rng.integers(-(2**40), 2**40, size=(n, 3), dtype=np.int64),
        "raw": rng.integers(0, 256, size=(n, 2), dtype=np.uint8),
        "text": np.array([["hello"], ["Grüße, 世界"], [""]], dtype=object),
    }
    got = dict(zip([o.name for o in outputs], _session(model).run(None, feeds), strict=True))
    y_ref = feeds["x"] * np.float32(2) + feeds["offset"].astype(np.float32)
    expected = {
        "y": y_ref,
        "y_half": y_ref.astype(np.float16),
        "masked": np.where(feeds["mask"], np.trunc(feeds["x"]).astype(np.int32), np.int32(0)),
        "ids_sum": feeds["ids"].sum(axis=1),
        "any_mask": feeds["mask"].any(axis=1),
        "raw_inv": (np.uint8(255) - feeds["raw"]).astype(np.uint8),
        "text_out": feeds["text"],
    }
    for name, ref in expected.items():
        out = got[name]
        if out.dtype != ref.dtype or out.shape != ref.shape or not np.array_equal(out, ref):
            raise RuntimeError(
                f"multi_io: output {name!r} wrong: got {out!r} ({out.dtype}), want {ref!r}"
            )
    return Built("multi_io/1/model.onnx", model, ["all 7 outputs match numpy for a batch of 3"])


# --------------------------------------------------------------------------------------------
# simple_static: Triton's classic "simple" add/sub model, without batching, in two versions
# --------------------------------------------------------------------------------------------


def build_simple_static(version: int) -> Built:
    vi = helper.make_tensor_value_info
    make = helper.make_node
    nodes = [make("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add")]
    initializers = []
    if version == 1:
        nodes.append(make("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"))
    else:
        initializers.append(_init("one", np.array(1, dtype=np.int32)))
        nodes.append(make("Sub", ["INPUT0", "INPUT1"], ["difference"], name="sub"))
        nodes.append(make("Add", ["difference", "one"], ["OUTPUT1"], name="plus_one"))
    graph = helper.make_graph(
        nodes,
        f"simple_static_v{version}",
        inputs=[vi("INPUT0", TensorProto.INT32, [2, 3]), vi("INPUT1", TensorProto.INT32, [2, 3])],
        outputs=[
            vi("OUTPUT0", TensorProto.INT32, [2, 3]),
            vi("OUTPUT1", TensorProto.INT32, [2, 3]),
        ],
        initializer=initializers,
    )
    formula = "INPUT0 - INPUT1" if version == 1 else "INPUT0 - INPUT1 + 1"
    model = _finish(
        graph,
        f"Non-batching add/sub model, version {version}: OUTPUT0 = INPUT0 + INPUT1, "
        f"OUTPUT1 = {formula}. Fixed shapes [2, 3], INT32.",
    )

    rng = np.random.default_rng(SEED + version)
    a = rng.integers(-1000, 1000, size=(2, 3), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(2, 3), dtype=np.int32)
    out0, out1 = _session(model).run(None, {"INPUT0": a, "INPUT1": b})
    want1 = a - b + (0 if version == 1 else 1)
    if not (np.array_equal(out0, a + b) and np.array_equal(out1, want1)):
        raise RuntimeError(f"simple_static v{version}: wrong outputs {out0} {out1}")
    if out0.dtype != np.int32 or out1.dtype != np.int32:
        raise RuntimeError(f"simple_static v{version}: wrong dtypes {out0.dtype} {out1.dtype}")
    return Built(f"simple_static/{version}/model.onnx", model, [f"OUTPUT1 = {formula}"])


BUILDERS: list[Callable[[], Built]] = [
    build_digits,
    build_multi_io,
    lambda: build_simple_static(1),
    lambda: build_simple_static(2),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild in memory and compare with the files on disk; write nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=MODELS_DIR,
        help="model repository to write into (default: the directory holding this script)",
    )
    args = parser.parse_args(argv)

    stale: list[str] = []
    for builder in BUILDERS:
        built = builder()
        data = _serialize(built.model)
        target = args.out / built.relpath
        digest = hashlib.sha256(data).hexdigest()
        if args.check:
            same = target.is_file() and target.read_bytes() == data
            if not same:
                stale.append(built.relpath)
            status = "up to date" if same else "DIFFERS"
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            status = "written"
        print(f"{built.relpath}: {status}, {len(data)} bytes, sha256 {digest}")
        for note in built.notes:
            print(f"    {note}")

    # A ready-made request for `edged infer` (what `make serve` suggests): two digit images.
    sample = io.BytesIO()
    np.save(sample, load_digits().data[:2].astype(np.float32), allow_pickle=False)
    target = args.out / "digits" / "sample.npy"
    if args.check:
        if not (target.is_file() and target.read_bytes() == sample.getvalue()):
            stale.append("digits/sample.npy")
    else:
        target.write_bytes(sample.getvalue())
        print(f"digits/sample.npy: written, {len(sample.getvalue())} bytes")

    if stale:
        print(f"out of date: {', '.join(stale)}; run models/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
