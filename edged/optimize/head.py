"""Methods on a model's trainable head (a ``[learn]`` model: a frozen backbone and
``head.npz``, docs/learning.md): structured pruning of the head's hidden units with a short
re-fit, distillation into a smaller student head, and quantisation-aware fine-tuning of the
head. Training is edged.learn's NumPy code (``train_head``, ``distil_head``; QAT's forward
through ONNX Runtime's INT8 head is edged.optimize.qat); the served graph is
``edged.learn.graph.compose`` of the backbone and the new head.

The head trains on the backbone's features of the calibration samples (QAT: on the features
the INT8 backbone gives), with their labels;
without labels, with the original head's predictions (pseudo-labels). A variant's version
folder gets the new ``head.npz``, the backbone, and a fresh ``learn_state.npz`` for the
model's strategy, so it stays a model that learns on the device.
"""

from __future__ import annotations

import io
import math
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edged.core.errors import EdgedError
from edged.learn.graph import compose
from edged.learn.head import Head, init_head, load_head, save_head
from edged.learn.strategies import (
    Hyper,
    cross_entropy,
    distil_head,
    initial_state,
    lwf_loss,
    save_state,
    train_head,
    tuned_hyper,
)
from edged.optimize.data import ModelSource, Samples
from edged.optimize.methods import METHODS as GRAPH_METHODS
from edged.optimize.methods import Options, Produced, Refused, prune_units
from edged.optimize.qat import train_qat
from edged.serving.repository import LearnSpec
from hal import ExecutorOptions, ModelArtifact, get_executor


def distillation_loss(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    alpha: float,
) -> tuple[float, np.ndarray]:
    """Hinton et al.'s loss ``T^2 * KL(softmax(teacher/T) || softmax(student/T)) + alpha *
    CE(softmax(student), labels)``, mean over the rows, and its gradient w.r.t.
    ``student_logits``: edged.learn's LwF term and cross-entropy, which its trainer
    (``distil_head``) minimises as ``CE + (1/alpha) * T^2 * KL``, the same loss over alpha."""
    soft, soft_grad = lwf_loss(student_logits, teacher_logits, temperature, 1.0)
    hard, hard_grad = cross_entropy(student_logits, labels)
    return soft + alpha * hard, soft_grad + np.float32(alpha) * hard_grad


def params(head: Head) -> int:
    """Trainable parameters of ``head`` (weights and biases)."""
    return sum(int(p.size) for p in head.params())


def student_width(teacher: Head, share: float = 0.25) -> int:
    """The widest single hidden layer a student ``in -> h -> classes`` may have to hold at
    most ``share`` of the teacher's parameters.

    Raises:
        Refused: not even one hidden unit fits.
    """
    budget = params(teacher) * share
    # in*h + h + h*classes + classes <= budget
    h = math.floor((budget - teacher.classes) / (teacher.in_dim + 1 + teacher.classes))
    if h < 1:
        raise Refused(f"no student fits in {share:.0%} of the teacher's {params(teacher)} params")
    return h


@dataclass
class HeadModel:
    """A ``[learn]`` model's parts, read from its version folder."""

    spec: LearnSpec
    folder: Path
    backbone: onnx.ModelProto
    head: Head

    @classmethod
    def of(cls, source: ModelSource) -> HeadModel:
        """Raises Refused when ``source`` is no ``[learn]`` model, or its files are unusable."""
        try:
            table = tomllib.loads(source.model_toml).get("learn") if source.model_toml else None
        except tomllib.TOMLDecodeError as e:
            raise Refused(f"model.toml: {e}") from e
        if not isinstance(table, dict):
            raise Refused("a head method needs a model with a [learn] table (backbone + head)")
        known = {k: str(v) for k, v in table.items() if k in LearnSpec.__dataclass_fields__}
        spec = LearnSpec(**known)
        folder = source.path.parent
        try:
            backbone = onnx.load(str(folder / spec.backbone))
            head = load_head(folder / spec.head)
        except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
            raise Refused(f"{folder}: the [learn] files cannot be read: {e}") from e
        return cls(spec, folder, backbone, head)

    def features(self, samples: Samples) -> np.ndarray:
        """The backbone's ``features`` output on ``samples`` (through cpu-onnx), or the
        features they carry (from a learning store)."""
        if samples.features is not None:
            if samples.features.ndim != 2 or samples.features.shape[1] != self.head.in_dim:
                raise Refused(
                    f"the stored samples have features of shape {samples.features.shape[1:]}; "
                    f"the head takes {self.head.in_dim}"
                )
            return samples.features.astype(np.float32)
        path = self.folder / self.spec.backbone
        try:
            loaded = get_executor("cpu-onnx").load(ModelArtifact(path, "onnx"), ExecutorOptions())
        except EdgedError as e:
            raise Refused(f"{path}: {e}") from e
        try:
            parts = [loaded.infer(batch)[self.spec.features] for batch in samples.batches(256)]
        finally:
            loaded.close()
        return np.concatenate(parts).astype(np.float32)

    def targets(self, samples: Samples, features: np.ndarray) -> np.ndarray:
        """The labels, or the original head's predictions where there are none."""
        return samples.labels if samples.labels is not None else self.head.predict(features)

    def produce(
        self, head: Head, out: Path, features: np.ndarray, labels: np.ndarray, notes: dict[str, Any]
    ) -> Produced:
        """Write the served graph (backbone + ``head``) to ``out``; the head, backbone and a
        fresh learning state go with it as the version folder's other files."""
        onnx.save(compose(self.backbone, head, features=self.spec.features), str(out))
        head_bytes, state_bytes = io.BytesIO(), io.BytesIO()
        save_head(head_bytes, head)
        hyper = tuned_hyper(self.spec.strategy)
        state = initial_state(head, features, labels, self.spec.strategy, hyper, seed=0)
        save_state(state_bytes, state)
        files: dict[str, bytes | Path] = {
            self.spec.backbone: self.folder / self.spec.backbone,
            self.spec.head: head_bytes.getvalue(),
            self.spec.state: state_bytes.getvalue(),
        }
        notes["head_params"] = params(head)
        notes["teacher_params"] = params(self.head)
        return Produced(out, notes, files)


def learn_files(source: ModelSource) -> dict[str, bytes | Path]:
    """The ``[learn]`` files beside a learning model's artifact (none for other models): a
    graph method's variant carries them so that its model.toml stays true (a later
    fine-tune then starts from the float head)."""
    try:
        model = HeadModel.of(source)
    except Refused:
        return {}
    names = (model.spec.backbone, model.spec.head, model.spec.state)
    return {n: model.folder / n for n in names if (model.folder / n).is_file()}


def head_prune(source: ModelSource, out: Path, calib: Samples, options: Options) -> Produced:
    """Drop ``options.sparsity`` of every hidden layer's units (smallest incoming weights),
    then re-fit the thinner head for a few epochs on the calibration features."""
    model = HeadModel.of(source)
    if model.head.layers < 2:
        raise Refused("the head has no hidden layer to prune")
    head = model.head.copy()
    for i in range(head.layers - 1):
        w1, b1, w2, _ = prune_units(
            head.weights[i], head.biases[i], head.weights[i + 1], options.sparsity
        )
        head.weights[i], head.biases[i], head.weights[i + 1] = w1, b1, w2
    x = model.features(calib)
    y = model.targets(calib, x)
    refit = train_head(head, x, y, Hyper(epochs=10, lr=0.01), seed=0)
    return model.produce(refit, out, x, y, {"sparsity": options.sparsity, "refit_epochs": 10})


def distil(source: ModelSource, out: Path, calib: Samples, options: Options) -> Produced:
    """A student head with one hidden layer, at most a quarter of the teacher head's
    parameters, trained on the teacher's soft targets (T = 4) and the labels."""
    model = HeadModel.of(source)
    teacher = model.head
    width = student_width(teacher)
    x = model.features(calib)
    y = model.targets(calib, x)
    rng = np.random.default_rng(0)
    student = init_head([teacher.in_dim, width, teacher.classes], rng, teacher.mean, teacher.scale)
    hyper = Hyper(epochs=60, lr=0.03, temperature=4.0, lwf_alpha=1.0, weight_decay=1e-4)
    trained = distil_head(student, teacher, x, y, hyper, seed=0)
    notes = {"temperature": hyper.temperature, "alpha": 1.0 / hyper.lwf_alpha, "width": width}
    return model.produce(trained, out, x, y, notes)


def qat(source: ModelSource, out: Path, calib: Samples, options: Options) -> Produced:
    """Quantisation-aware fine-tuning of the head against the INT8 graph ONNX Runtime will
    run (edged.optimize.qat): the served graph is first quantised as ``int8-static-minmax``
    does, the head is then fine-tuned on the features that INT8 backbone gives, through the
    head's own int8 quantisers (weights per channel, uint8 activations at the ranges MinMax
    calibration finds on the first ``options.calibration_samples`` rows), and the graph
    with the tuned head is quantised the same way: the INT8 model whose head learnt to live
    with what ONNX Runtime computes. Epochs and learning rate are those edged.learn tuned
    for fine-tuning with the model's strategy (``tuned_hyper``)."""
    model = HeadModel.of(source)
    x = model.features(calib)
    y = model.targets(calib, x)
    with tempfile.TemporaryDirectory(prefix="edged-qat-") as tmp:
        seen = int8_features(model, calib, options, Path(tmp))
    ranges_from = x[: options.calibration_samples]
    tuned_for = tuned_hyper(model.spec.strategy)
    hyper = Hyper(epochs=tuned_for.epochs, lr=tuned_for.lr)
    tuned = train_qat(model.head, seen, y, ranges_from, hyper, seed=0)
    float_path = out.with_name(f"qat-float-{out.name}")
    notes: dict[str, Any] = {"qat_epochs": hyper.epochs, "qat_lr": hyper.lr}
    produced = model.produce(tuned, float_path, x, y, notes)
    try:
        quantised = GRAPH_METHODS["int8-static-minmax"](float_path, out, calib, options)
    finally:
        float_path.unlink(missing_ok=True)
    produced.path = out
    produced.notes.update(quantised.notes)
    return produced


def int8_features(model: HeadModel, calib: Samples, options: Options, tmp: Path) -> np.ndarray:
    """The features the head receives in the ``int8-static-minmax`` graph of ``model`` on
    ``calib`` (the backbone quantised; the head's input, read where its standardisation
    starts).

    Raises:
        Refused: the graph cannot be quantised or run, or has no head input to read.
    """
    float_path, int8_path = tmp / "float.onnx", tmp / "int8.onnx"
    onnx.save(compose(model.backbone, model.head, features=model.spec.features), str(float_path))
    GRAPH_METHODS["int8-static-minmax"](float_path, int8_path, calib, options)
    graph = onnx.load(str(int8_path))
    mean = next(
        (t.name for t in graph.graph.initializer
         if t.name.endswith("mean") and t.dims == [model.head.in_dim]
         and np.array_equal(numpy_helper.to_array(t), model.head.mean)),
        None,
    )  # fmt: skip
    sub = next((n for n in graph.graph.node if n.op_type == "Sub" and n.input[1] == mean), None)
    if sub is None:
        raise Refused("the INT8 graph has no head standardisation (Sub) to read features at")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(sub.input[0], 1, None))
    onnx.save(graph, str(int8_path))
    try:
        loaded = get_executor("cpu-onnx").load(ModelArtifact(int8_path, "onnx"), ExecutorOptions())
    except EdgedError as e:
        raise Refused(f"the INT8 graph does not load: {e}") from e
    try:
        parts = [loaded.infer(batch)[sub.input[0]] for batch in calib.batches(256)]
    finally:
        loaded.close()
    return np.concatenate(parts).astype(np.float32)


METHODS: Mapping[str, Callable[[ModelSource, Path, Samples, Options], Produced]] = {
    "head-prune": head_prune,
    "distil": distil,
    "qat": qat,
}
"""The head methods by name (``--methods``)."""
