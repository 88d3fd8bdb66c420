"""Build the example trainable model ``digits_learn``: a frozen backbone plus a trainable head.

    .venv/bin/python models/build_trainable.py           # (re)write models/digits_learn/
    .venv/bin/python models/build_trainable.py --check   # rebuild in memory, fail if a file differs

The model knows the digits 0-4 only, so that it has something to learn on the device:

- ``backbone.onnx``: scikit-learn ``MLPClassifier(hidden_layer_sizes=(64,))`` trained on the
  digits 0-4 of ``load_digits``'s training split (the split of ``models/build.py``), its input
  scaling folded into the first layer, exported as ``Gemm -> Relu`` with
  ``edged.learn.graph.mlp_backbone``: input ``input`` FP32 [N, 64] (pixels 0..16), output
  ``features`` FP32 [N, 64].
- ``head.npz``: a head 64 -> 64 -> 10 (``edged.learn.head``) trained with ``train_head`` on the
  backbone's features of the same images; the outputs 5-9 exist but were never trained.
- ``learn_state.npz``: ``initial_state(..., strategy="replay+lwf")``: a replay reservoir of
  200 samples of the training data and a holdout of 100 samples of 0-4 that neither the
  backbone nor the head was trained on (the gate's old data).
- ``model.onnx``: ``compose(backbone, head)``, what is served: ``probabilities`` FP32 [N, 10]
  and ``label`` INT64 [N], like ``models/digits``.
- ``../test_new.npz`` and ``../test_old.npz``: 100 test-split images each (``x`` FP32 [100, 64]
  raw pixels, ``y`` INT64) of the classes 5-9 and 0-4, for the daemon's tests.

Everything is deterministic (fixed seeds, one BLAS thread, npz files with fixed timestamps):
two runs on the same machine write byte-identical files. Before writing, the build checks
the served graph against the NumPy head with onnxruntime, and shows what a fine-tune on half
of ``test_new`` does to the other half (what the end-to-end test relies on).
The ``model.toml`` is written by hand and not touched here.
"""

from __future__ import annotations

import os

# One BLAS thread: the same arithmetic, so the same bytes, on every run (set before numpy).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import hashlib
import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # edged, without installing it

from edged.learn.graph import compose, mlp_backbone
from edged.learn.head import Head, accuracy, init_head, save_head, standardiser, write_npz
from edged.learn.strategies import (
    Hyper,
    LearnState,
    fine_tune,
    initial_state,
    save_state,
    split_validation,
    train_head,
    tuned_hyper,
)

MODELS_DIR = Path(__file__).resolve().parent
SEED = 20240517  # models/build.py's seed: the same train/test split of load_digits
STRATEGY = "replay+lwf"
OLD_CLASSES = 5  # the model is trained on the digits 0..OLD_CLASSES-1
HOLDOUT = 100  # training images of the old classes kept out of all training: the gate's
TEST_SAMPLES = 100  # per test file
NAME = "digits_learn"
T = TypeVar("T")


def _onnx_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    write_npz(buffer, arrays)
    return buffer.getvalue()


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _stratified(x: np.ndarray, y: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` samples, the same number per class, deterministic, in class-mixed order."""
    keep, _ = train_test_split(
        np.arange(len(y)), train_size=count, stratify=y, random_state=SEED % (2**32)
    )
    return x[keep].astype(np.float32), y[keep].astype(np.int64)


def build() -> tuple[dict[str, bytes], list[str]]:
    """Every file (path relative to models/) and the notes to print."""
    data = load_digits()
    x = data.data.astype(np.float64)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=SEED % (2**32)
    )
    old = y_train < OLD_CLASSES
    x_old, y_old = x_train[old], y_train[old]
    train_idx, hold_idx = train_test_split(
        np.arange(len(y_old)), test_size=HOLDOUT, stratify=y_old, random_state=SEED % (2**32)
    )
    x_fit, y_fit = x_old[train_idx], y_old[train_idx]

    # The backbone: an MLP on 0-4, its hidden layer (scaler folded in) exported to ONNX.
    scaler = StandardScaler().fit(x_fit)
    clf = MLPClassifier(
        hidden_layer_sizes=(64,),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        learning_rate_init=1e-3,
        max_iter=300,
        random_state=SEED % (2**32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x_fit), y_fit)
    w = clf.coefs_[0] / scaler.scale_[:, None]
    b = clf.intercepts_[0] - (scaler.mean_ / scaler.scale_) @ clf.coefs_[0]
    backbone = mlp_backbone(
        [w.astype(np.float32)],
        [b.astype(np.float32)],
        doc="Frozen backbone of digits_learn: 8x8 digit pixels (0..16) -> 64 ReLU features. "
        "Trained on the digits 0-4 of scikit-learn's load_digits.",
    )
    backbone_bytes = _onnx_bytes(backbone)
    session = _session(backbone_bytes)

    def features(images: np.ndarray) -> np.ndarray:
        (out,) = session.run(["features"], {"input": images.astype(np.float32)})
        return np.asarray(out)

    f_fit = features(x_fit)
    mean, scale = standardiser(f_fit, Hyper().variance_floor)
    head = init_head((64, 64, 10), np.random.default_rng(SEED), mean, scale)
    head = train_head(head, f_fit, y_fit, tuned_hyper("training"), seed=SEED)
    state = initial_state(
        head,
        f_fit,
        y_fit,
        STRATEGY,
        Hyper(),
        seed=SEED,
        holdout=(features(x_old[hold_idx]), y_old[hold_idx]),
    )
    served = compose(
        backbone,
        head,
        doc="8x8 handwritten digit classifier that learns on the device: frozen MLP backbone "
        "-> standardise -> Gemm(64) -> Relu -> Gemm(10) -> Softmax. Input: 64 pixel values in "
        "0..16, row-major. Trained on the digits 0-4 only; 5-9 are to be learnt on the device.",
    )
    served_bytes = _onnx_bytes(served)

    test_new = _stratified(
        x_test[y_test >= OLD_CLASSES], y_test[y_test >= OLD_CLASSES], TEST_SAMPLES
    )
    test_old = _stratified(x_test[y_test < OLD_CLASSES], y_test[y_test < OLD_CLASSES], TEST_SAMPLES)
    notes = _check(served_bytes, head, features, test_new, test_old, state)

    files = {
        f"{NAME}/1/backbone.onnx": backbone_bytes,
        f"{NAME}/1/model.onnx": served_bytes,
        f"{NAME}/1/head.npz": _save(save_head, head),
        f"{NAME}/1/learn_state.npz": _save(save_state, state),
        f"{NAME}/test_new.npz": _npz_bytes({"x": test_new[0], "y": test_new[1]}),
        f"{NAME}/test_old.npz": _npz_bytes({"x": test_old[0], "y": test_old[1]}),
    }
    return files, notes


def _save(save: Callable[[io.BytesIO, T], None], value: T) -> bytes:
    buffer = io.BytesIO()
    save(buffer, value)
    return buffer.getvalue()


def _check(
    served_bytes: bytes,
    head: Head,
    feats: Callable[[np.ndarray], np.ndarray],
    test_new: tuple[np.ndarray, np.ndarray],
    test_old: tuple[np.ndarray, np.ndarray],
    state: LearnState,
) -> list[str]:
    """The served graph computes the head; the head knows 0-4; a fine-tune learns 5-9."""
    served = _session(served_bytes)
    x_all = np.concatenate([test_old[0], test_new[0]])
    probs, labels = served.run(["probabilities", "label"], {"input": x_all})
    reference = head.proba(feats(x_all))
    diff = float(np.max(np.abs(probs - reference)))
    if diff > 1e-5 or not np.array_equal(labels, np.argmax(reference, axis=1)):
        raise RuntimeError(f"model.onnx differs from the numpy head by {diff}")
    f_old, f_new = feats(test_old[0]), feats(test_new[0])
    acc_old = accuracy(head, f_old, test_old[1])
    acc_new = accuracy(head, f_new, test_new[1])
    if acc_old < 0.95:
        raise RuntimeError(f"held-out accuracy on 0-4 too low: {acc_old:.3f}")
    # What the end-to-end test does: learn half of test_new (the store holds out every
    # fifth sample for the gate), then score the other half.
    half = TEST_SAMPLES // 2
    train, val = split_validation(test_new[1][:half], 0.2, seed=0)
    x_half, y_half = f_new[:half], test_new[1][:half]
    candidate, _ = fine_tune(
        head, state, x_half[train], y_half[train], STRATEGY, Hyper(), seed=0,
        validation=(x_half[val], y_half[val]),
    )  # fmt: skip
    after_new = accuracy(candidate, f_new[half:], test_new[1][half:])
    after_old = accuracy(candidate, f_old, test_old[1])
    return [
        f"max |onnx - numpy head| probability difference {diff:.1e}",
        f"test accuracy: digits 0-4 {acc_old:.3f}, digits 5-9 {acc_new:.3f} (never trained)",
        f"a {STRATEGY} fine-tune on {len(train)} samples of 5-9: unseen 5-9 {acc_new:.3f} -> "
        f"{after_new:.3f}, 0-4 {acc_old:.3f} -> {after_old:.3f}",
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
    files, notes = build()
    stale = []
    for relpath, data in files.items():
        target = args.out / relpath
        digest = hashlib.sha256(data).hexdigest()
        if args.check:
            same = target.is_file() and target.read_bytes() == data
            if not same:
                stale.append(relpath)
            status = "up to date" if same else "DIFFERS"
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            status = "written"
        print(f"{relpath}: {status}, {len(data)} bytes, sha256 {digest}")
    for note in notes:
        print(f"    {note}")
    print(f"    total {sum(len(d) for d in files.values())} bytes")
    if stale:
        print(f"out of date: {', '.join(stale)}; run models/build_trainable.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
