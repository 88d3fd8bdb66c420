"""The ways ``edged optimize`` makes a variant of an ONNX model, each writing one file.

Quantisation is ONNX Runtime's (``onnxruntime.quantization``), not edged's: static QDQ
(activations uint8, weights int8 per output channel, the U8S8 format ONNX Runtime's CPU
kernels run fastest) with MinMax, Entropy or Percentile calibration; dynamic (weights int8,
activations quantised at run time); and static MinMax with the nodes ONNX Runtime's own QDQ
debugger (``qdq_loss_debug``) finds noisiest left in float. FP16 is ONNX Runtime's
converter (``onnxruntime.transformers.float16``, the maintained fork of onnxconverter-common's,
shipped in the onnxruntime wheel edged already depends on), with FP32 inputs and outputs
kept so that clients do not change. Pruning edits initializers with ``onnx``;
``prune-channels-*`` removes whole convolution channels (edged.optimize.channels) and
re-fits the convolutions that read them from calibration statistics.
``prune-channels-*+int8-static-minmax`` quantises the pruned model (static QDQ, MinMax)
before it is judged: one variant, one gate. ``fuse-hardswish`` stays float: it rewrites the
hard-swish an older exporter spelled out as ``x * Clip(x + 3, 0, 6) / 6`` into ONNX's
``HardSwish`` (opset 14), which ONNX Runtime fuses into its convolutions.

A method that cannot make its variant raises :class:`Refused` with the reason, which the
report carries; a full-integer LiteRT variant is always refused (see :data:`LITERT_REASON`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, version_converter
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from edged.optimize import channels
from edged.optimize.data import Samples
from edged.optimize.errors import OptimizeError

LITERT_REASON = (
    "not converted: a full-integer LiteRT (.tflite) variant needs an ONNX -> TensorFlow -> "
    "TFLiteConverter chain (onnx2tf and TensorFlow, ~2 GB), which edged does not depend on, "
    "and the Edge TPU's edgetpu_compiler on top; convert with `onnx2tf -oiqt` on a build "
    "machine and bundle the .tflite with edged-fleet"
)
"""Why the ``litert-int8`` method never makes a file."""

WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
"""Node types whose weight initializer magnitude pruning thins."""


class Refused(Exception):  # a result ("refused, because"), not a crash
    """The method cannot make this variant; ``str()`` is the reason the report gives."""


@dataclass(frozen=True)
class Options:
    """How the methods run; bounded defaults."""

    calibration_samples: int = 64
    """At most this many calibration samples feed the calibrators (one run each)."""

    sparsity: float = 0.5
    """Fraction of weights magnitude pruning zeroes in each weight tensor, and of hidden
    units structured pruning removes from each prunable dense layer."""

    exclude_share: float = 0.05
    """The exclusion sweep leaves at most this share of the quantised nodes (at least one)
    in float: those whose activations lose the most signal to quantisation."""

    prune_min_channels: int = 64
    """``prune-channels-*`` leaves channel sets narrower than this alone: narrow layers (a
    MobileNet's 8-32-channel bottlenecks) lose the most accuracy per channel and cost
    little time (ocr_cls, 50 % of the channels of sets >= 64 wide: -0.9 points, 1.35x faster;
    of every set >= 32 wide: -45 points)."""

    sqnr_floor_db: float = 30.0
    """The sweep excludes only nodes whose quantised output's signal-to-noise ratio is below
    this (dB)."""


@dataclass
class Produced:
    """A variant file and what the method found out making it (carried into the report)."""

    path: Path
    notes: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes | Path] = field(default_factory=dict)
    """Other files of the variant's version folder, by name (a head method's head.npz)."""


Method = Callable[[Path, Path, Samples, Options], Produced]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the calibration samples, one sample
    per run (any batch size the model takes, including a fixed 1)."""

    def __init__(self, samples: Samples, limit: int) -> None:
        self._samples = samples.rows(slice(0, max(1, limit)))
        self._iter: Iterator[dict[str, np.ndarray]] = self._samples.batches(1)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._samples.batches(1)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._samples.batches(1)


QDQ_OPSET = 13
"""The oldest default-domain opset whose DequantizeLinear takes ``axis`` (per-channel)."""


def load_model(source: Path) -> onnx.ModelProto:
    """``source`` with every tensor-valued Constant node of the main graph turned into an
    initializer of the same name (exporters such as Paddle2ONNX put all weights in Constant
    nodes, which ONNX Runtime's quantiser and the pruners leave alone)."""
    model = onnx.load(str(source))
    graph = model.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    return model


def preprocess(source: Path, out: Path) -> Path:
    """The model as ONNX Runtime's quantiser wants it: weights in initializers
    (:func:`load_model`), a default-domain opset below 13 raised
    to 13 (``onnx.version_converter``; per-channel weights need DequantizeLinear's ``axis``),
    then ONNX Runtime's quantisation pre-processing (shape inference and graph optimisation,
    which folds BatchNormalization into Conv). Returns ``out``, or the model before the
    pre-processing step that failed (it is quantised as it is).

    Raises:
        Refused: the opset cannot be raised to 13.
    """
    model = load_model(source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_OPSET:
        try:
            model = version_converter.convert_version(model, QDQ_OPSET)
        except Exception as e:  # the converter raises plain exceptions of many kinds
            raise Refused(
                f"the model's opset {opset} cannot be raised to {QDQ_OPSET} for per-channel "
                f"quantisation: {e}"
            ) from e
    source = out.with_name(f"loaded-{out.name}")
    onnx.save(model, str(source))
    try:
        quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
    except Exception:  # any failure: quantise the model as given
        return source
    return out


ENTROPY_BINS = (2048, 128)
"""Histogram bins and quantised bins of the Entropy calibration: TensorRT's choice. ONNX
Runtime's defaults (128 and 128) leave the KL search a single candidate, the full range, so
its Entropy calibration equals MinMax; ``quantize_static`` does not pass these settings on,
so the ranges are computed with ``create_calibrator`` and handed over as overrides."""


def entropy_ranges(model: Path, tmp: Path, reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    """Per-activation ``rmin``/``rmax`` from ONNX Runtime's Entropy calibrator with
    :data:`ENTROPY_BINS`, as ``quantize_static``'s ``TensorQuantOverrides``. The model's own
    outputs keep their full (MinMax) range: clipping a softmax's top probability would tie
    the classes."""
    outputs = {o.name for o in onnx.load(str(model)).graph.output}
    bins, quantised = ENTROPY_BINS
    calibrator = create_calibrator(
        model,
        [],
        augmented_model_path=str(tmp / "entropy-augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": bins, "num_quantized_bins": quantised},
    )
    try:
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    finally:
        calibrator.clear_collected_data()
    overrides: dict[str, list[dict[str, Any]]] = {}
    for name, data in ranges.items():
        if name in outputs:
            continue
        low, high = data.range_value
        overrides[name] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


def _static(calibrate: str, exclude_sweep: bool = False) -> Method:
    def run(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
        method = getattr(CalibrationMethod, calibrate)
        with tempfile.TemporaryDirectory(prefix="edged-quant-") as tmp:
            model = preprocess(source, Path(tmp) / "pre.onnx")
            notes: dict[str, Any] = {"calibration": calibrate, "per_channel": True}
            excluded: list[str] = []
            extra: dict[str, Any] = {}
            if exclude_sweep:
                try:
                    excluded, sqnr = sensitive_nodes(model, Path(tmp), calibration, options)
                except Exception as e:  # onnxruntime raises plain exceptions of many kinds
                    raise Refused(f"the per-node error sweep failed: {e}") from e
                notes["excluded_nodes"] = excluded
                notes["sqnr_db"] = sqnr
            reader = _Reader(calibration, options.calibration_samples)
            if method == CalibrationMethod.Entropy:
                try:
                    extra["TensorQuantOverrides"] = entropy_ranges(model, Path(tmp), reader)
                except Exception as e:  # onnxruntime raises plain exceptions of many kinds
                    raise Refused(f"entropy calibration failed: {e}") from e
                notes["bins"] = list(ENTROPY_BINS)
                reader.rewind()
                method = CalibrationMethod.MinMax  # the overrides decide every range
            try:
                quantize_static(
                    str(model),
                    str(out),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    calibrate_method=method,
                    nodes_to_exclude=excluded,
                    extra_options=extra,
                )
            except Exception as e:  # onnxruntime raises plain exceptions of many kinds
                raise Refused(f"onnxruntime.quantization.quantize_static failed: {e}") from e
        return Produced(out, notes)

    return run


def sensitive_nodes(
    model: Path, tmp: Path, calibration: Samples, options: Options
) -> tuple[list[str], dict[str, float]]:
    """The per-node error sweep: quantise ``model`` (static, MinMax), run the float and the
    QDQ model with every activation saved (ONNX Runtime's ``qdq_loss_debug``), and rank the
    activations by the signal-to-quantisation-noise ratio of their own quantise/dequantise
    step. Returns the nodes that produce or consume the worst ones below
    ``options.sqnr_floor_db`` (so that those tensors stay float; worst first, until
    ``options.exclude_share`` of the nodes are excluded, at least one tensor's when any is
    below), and each such tensor's SQNR in dB."""

    few = min(4, options.calibration_samples)
    qdq = tmp / "sweep-qdq.onnx"
    quantize_static(
        str(model),
        str(qdq),
        _Reader(calibration, options.calibration_samples),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    float_aug, qdq_aug = tmp / "sweep-float-aug.onnx", tmp / "sweep-qdq-aug.onnx"
    modify_model_output_intermediate_tensors(str(model), str(float_aug))
    modify_model_output_intermediate_tensors(str(qdq), str(qdq_aug))
    matching = create_activation_matching(
        collect_activations(str(qdq_aug), _Reader(calibration, few)),
        collect_activations(str(float_aug), _Reader(calibration, few)),
    )
    errors = compute_activation_error(matching)
    nodes = onnx.load(str(model)).graph.node
    producers = {o: n.name for n in nodes for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n.name)
    ranked = sorted(
        (err["qdq_err"], name)
        for name, err in errors.items()
        if name in producers and math.isfinite(err["qdq_err"])
    )
    limit = max(1, math.floor(len(nodes) * options.exclude_share))
    excluded: list[str] = []
    sqnr: dict[str, float] = {}
    for db, tensor in ranked:
        if db >= options.sqnr_floor_db or len(excluded) >= limit:
            break
        # the tensor stays float only when neither its producer nor a consumer quantises it
        for node in [producers[tensor], *consumers.get(tensor, [])]:
            if node and node not in excluded:
                excluded.append(node)
        sqnr[tensor] = round(db, 2)
    return excluded, sqnr


def int8_dynamic(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
    """Weights int8 per channel; activations quantised at run time (no calibration)."""

    with tempfile.TemporaryDirectory(prefix="edged-quant-") as tmp:
        model = preprocess(source, Path(tmp) / "pre.onnx")
        try:
            quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8, per_channel=True)
        except Exception as e:  # onnxruntime raises plain exceptions of many kinds
            raise Refused(f"onnxruntime.quantization.quantize_dynamic failed: {e}") from e
    return Produced(out, {"per_channel": True})


FP16_MAX = 65504.0
"""The largest finite FP16 value."""

FP16_PROBE_SAMPLES = 4
"""Calibration samples ``fp16`` runs the float model on to find activations FP16 cannot
hold."""


def fp16(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
    """Every float initializer and activation in FP16, inputs and outputs kept FP32: for the
    cuda executor (ONNX Runtime's CPU provider runs few FP16 kernels and casts around the
    rest). Nodes stay FP32 where FP16 cannot hold their numbers (:func:`fp16_blocked`):
    a constant input beyond FP16's range (the converter would clamp it to 65,504: PP-OCR's
    detector has a BatchNormalization variance of 9.8e7, whose clamping made its head's
    outputs 20x off and cost 59.8 points of F1), or, with calibration samples, an
    activation beyond it (the node that makes it and those that read it).
    """

    model = load_model(source)
    for index, node in enumerate(model.graph.node):
        if not node.name:  # the converter blocks nodes by name
            node.name = f"{node.op_type}_{index}"
    blocked = fp16_blocked(model, calibration)
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, node_block_list=sorted(blocked)
        )
    except Exception as e:  # the converter raises plain exceptions of many kinds
        raise Refused(f"onnxruntime.transformers.float16 failed: {e}") from e
    dropped = drop_fp16_round_trips(converted.graph)
    onnx.save(converted, str(out))
    return Produced(out, {"io_types": "float32", "kept_float32": blocked,
                          "fp16_round_trips_dropped": dropped})  # fmt: skip


def drop_fp16_round_trips(graph: Any) -> int:
    """Rewire the readers of ``Cast(Cast(t, to=FLOAT16), to=FLOAT)`` to read ``t`` itself,
    in place, and drop casts nothing reads; returns how many round trips went. The converter
    passes a tensor between two nodes it kept FP32 through FP16, which loses what keeping
    them was for (an activation beyond 65,504 becomes inf)."""
    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(node: Any) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((int(a.i) for a in node.attribute if a.name == "to"), None)

    floats = {  # tensors known to be FP32 without a producer
        v.name for v in graph.input if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    } | {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    rewired: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        source = producer.get(first.input[0])
        if (source is None and first.input[0] in floats) or (
            source is not None and source.op_type != "Cast"
        ):
            rewired[node.output[0]] = first.input[0]
    if not rewired:
        return 0
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rewired:
                node.input[i] = rewired[name]
    while True:  # casts left unread
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            return len(rewired)
        for n in dead:
            graph.node.remove(n)


def fp16_blocked(model: onnx.ModelProto, calibration: Samples) -> dict[str, str]:
    """The nodes of ``model`` (weights as initializers, every node named) that must stay
    FP32, each with why: those reading a float initializer with a magnitude above
    :data:`FP16_MAX`, and, when ``calibration`` has the model's inputs, those making or
    reading an activation above it on the first :data:`FP16_PROBE_SAMPLES` samples."""
    graph = model.graph
    blocked: dict[str, str] = {}
    big = {}
    for init in graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            array = numpy_helper.to_array(init)
            if array.size and float(np.max(np.abs(array))) > FP16_MAX:
                big[init.name] = float(np.max(np.abs(array)))
    for node in graph.node:
        for name in node.input:
            if name in big:
                blocked[node.name] = f"constant {name} reaches {big[name]:.3g} > {FP16_MAX:g}"
    for tensor, peak in _activation_peaks(model, calibration).items():
        if peak <= FP16_MAX:
            continue
        for node in graph.node:
            if tensor in node.output or tensor in node.input:
                blocked.setdefault(node.name, f"activation {tensor} reaches {peak:.3g}")
    return blocked


def _activation_peaks(model: onnx.ModelProto, calibration: Samples) -> dict[str, float]:
    """The largest magnitude of each float intermediate tensor of ``model`` over the first
    :data:`FP16_PROBE_SAMPLES` calibration samples ({} without the model's inputs, or when
    the types cannot be inferred)."""
    names = {i.name for i in model.graph.input}
    if not calibration.inputs or not names <= set(calibration.inputs):
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference raises plain exceptions of many kinds
        return {}
    floats = [
        v.name
        for v in inferred.graph.value_info
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ]
    if not floats:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in floats
    )
    settings = ort.SessionOptions()
    settings.log_severity_level = 3
    peaks = dict.fromkeys(floats, 0.0)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), settings, providers=["CPUExecutionProvider"]
        )
        for inputs in calibration.rows(slice(0, FP16_PROBE_SAMPLES)).batches(1):
            for name, value in zip(floats, session.run(floats, inputs), strict=True):
                if value.size:
                    peaks[name] = max(peaks[name], float(np.max(np.abs(value))))
    except Exception:  # onnxruntime raises plain exceptions of many kinds: constants only
        return {}
    return peaks


HARDSWISH_OPSET = 14
"""The default-domain opset that introduced ``HardSwish``."""


def fuse_hardswish(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
    """Every hard-swish spelled out as ``x * Clip(x + 3, 0, 6) / 6`` (the division, or a
    multiplication by 1/6, before or after the product; what Paddle2ONNX and PyTorch wrote
    below opset 14) becomes one ``HardSwish(x)`` node, the model's opset raised to 14
    (``onnx.version_converter``). The function is the same (float rounding apart); ONNX
    Runtime fuses ``HardSwish`` into the convolution before it, where the four elementwise
    nodes each ran as a pass over memory of their own (PP-OCR's classifier: 1.5x faster on
    x86, docs/optimize-pruning.md).

    Raises:
        Refused: no such chain, or the opset cannot be raised to 14.
    """
    model = load_model(source)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < HARDSWISH_OPSET:
        try:
            model = version_converter.convert_version(model, HARDSWISH_OPSET)
        except Exception as e:  # the converter raises plain exceptions of many kinds
            raise Refused(
                f"the model's opset {opset} cannot be raised to {HARDSWISH_OPSET} (HardSwish): {e}"
            ) from e
    fused = hardswish_chains(model.graph)
    if not fused:
        raise Refused("no hard-swish written as x * Clip(x + 3, 0, 6) / 6 to fuse")
    del model.graph.value_info[:]  # intermediate tensors are gone; ONNX Runtime infers again
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise Refused(f"the rewritten graph does not check: {e}") from e
    onnx.save(model, str(out))
    return Produced(out, {"hardswish_fused": fused, "opset": max(opset, HARDSWISH_OPSET)})


def hardswish_chains(graph: Any) -> int:
    """Replace each ``x * Clip(x + 3, 0, 6) / 6`` chain of ``graph`` (see
    :func:`fuse_hardswish`) by ``HardSwish(x)`` writing the chain's output, in place; returns
    how many. A chain whose inner tensors another node reads, or that are graph outputs, is
    left alone."""
    find = _HardSwishChains(graph)
    gone: set[int] = set()
    made: dict[int, Any] = {}
    for node in graph.node:
        if id(node) in gone or node.op_type not in ("Div", "Mul"):
            continue
        found = find.chain(node)
        if found is None or any(id(n) in gone for n in found[1]):
            continue
        x, nodes = found
        gone.update(id(n) for n in nodes)
        name = f"{node.name or node.output[0]}_hardswish"
        made[id(node)] = onnx.helper.make_node("HardSwish", [x], [node.output[0]], name=name)
    if not made:
        return 0
    kept = [made.get(id(n), n) for n in graph.node if id(n) not in gone or id(n) in made]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return len(made)


class _HardSwishChains:
    """Matches the hard-swish chains :func:`hardswish_chains` replaces."""

    def __init__(self, graph: Any) -> None:
        self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, int] = {}
        for n in graph.node:
            for name in n.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.outputs = {o.name for o in graph.output}

    def scalar(self, name: str, value: float) -> bool:
        v = self.consts.get(name)
        return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - value) < 1e-6

    def inner(self, name: str | None) -> Any:
        """The node making ``name`` when only one node reads it and it is no output."""
        if name is None or self.readers.get(name) != 1 or name in self.outputs:
            return None
        return self.producer.get(name)

    def sixth(self, node: Any) -> str | None:
        """``y`` when ``node`` is ``y / 6`` or ``y * (1/6)``."""
        if node is None:
            return None
        if node.op_type == "Div" and self.scalar(node.input[1], 6.0):
            return str(node.input[0])
        if node.op_type == "Mul":
            for i in (0, 1):
                if self.scalar(node.input[1 - i], 1 / 6):
                    return str(node.input[i])
        return None

    def relu6_of(self, name: str | None) -> tuple[str, list[Any]] | None:
        """``x`` and the nodes when ``name`` is ``Clip(x + 3, 0, 6)``."""
        clip = self.inner(name)
        if clip is None or clip.op_type != "Clip" or len(clip.input) != 3:
            return None
        if not (self.scalar(clip.input[1], 0.0) and self.scalar(clip.input[2], 6.0)):
            return None
        add = self.inner(clip.input[0])
        if add is None or add.op_type != "Add":
            return None
        for i in (0, 1):
            if self.scalar(add.input[1 - i], 3.0) and add.input[i] not in self.consts:
                return str(add.input[i]), [clip, add]
        return None

    def chain(self, last: Any) -> tuple[str, list[Any]] | None:
        """``x`` and the chain's nodes when ``last`` ends a hard-swish of ``x``."""
        mul = self.inner(self.sixth(last))  # (x * relu6(x + 3)) / 6
        if mul is not None and mul.op_type == "Mul":
            for i in (0, 1):
                found = self.relu6_of(mul.input[1 - i])
                if found and found[0] == mul.input[i]:
                    return found[0], [last, mul, *found[1]]
        if last.op_type == "Mul":  # x * (relu6(x + 3) / 6)
            for i in (0, 1):
                scaled = self.inner(last.input[1 - i])
                found = self.relu6_of(self.sixth(scaled))
                if found and found[0] == last.input[i]:
                    return found[0], [last, scaled, *found[1]]
        return None


def litert_int8(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
    """Always refused: see :data:`LITERT_REASON`."""
    raise Refused(LITERT_REASON)


def magnitude_prune(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A copy of ``weights`` with the ``round(sparsity * size)`` smallest-magnitude entries
    set to zero (ties broken by position, so exactly that many)."""
    if not 0 <= sparsity < 1:
        raise OptimizeError(f"--sparsity must be in [0, 1), got {sparsity}")
    flat = np.array(weights, copy=True).reshape(-1)
    k = round(sparsity * flat.size)
    if k:
        flat[np.argsort(np.abs(flat), kind="stable")[:k]] = 0
    return flat.reshape(weights.shape)


def prune_magnitude(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
    """Unstructured magnitude pruning of every Conv/Gemm/MatMul weight initializer: the file
    keeps its size (dense tensors), what shrinks is the compressed bundle (``gzip_bytes``)."""

    model = load_model(source)
    weights = _weight_names(model)
    pruned = 0
    for init in model.graph.initializer:
        if init.name in weights and init.data_type == onnx.TensorProto.FLOAT:
            array = magnitude_prune(numpy_helper.to_array(init), options.sparsity)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            pruned += 1
    if not pruned:
        raise Refused("no float Conv/Gemm/MatMul weight initializer to prune")
    onnx.save(model, str(out))
    return Produced(out, {"sparsity": options.sparsity, "tensors": pruned})


def _weight_names(model: Any) -> set[str]:
    inits = {i.name for i in model.graph.initializer}
    return {
        n.input[1]
        for n in model.graph.node
        if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits
    }


def prune_units(
    w_in: np.ndarray, b_in: np.ndarray, w_out: np.ndarray, share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Structured pruning of one hidden layer ``relu(x @ w_in + b_in) @ w_out``: drops the
    ``round(share * units)`` hidden units (at most all but one) whose incoming weights have
    the smallest L2 norm. Returns the thinner ``w_in``, ``b_in``, ``w_out`` and the kept unit
    indices (ascending)."""
    units = w_in.shape[1]
    drop = min(units - 1, round(share * units))
    norms = np.linalg.norm(w_in, axis=0) + np.abs(b_in)
    keep = np.sort(np.argsort(norms, kind="stable")[drop:])
    return w_in[:, keep], b_in[keep], w_out[keep, :], keep


def prune_structured(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
    """Structured pruning where the graph allows it: every ``Gemm -> Relu -> Gemm`` chain
    (weights as initializers, ``transB`` 0, the Relu's output used by that Gemm alone) loses
    ``options.sparsity`` of its hidden units, so the matrices really shrink."""

    model = load_model(source)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    changed: dict[str, int] = {}
    for first in graph.node:
        chain = _dense_chain(first, consumers, inits, outputs)
        if chain is None:
            continue
        second = chain
        w1 = numpy_helper.to_array(inits[first.input[1]])
        b1 = numpy_helper.to_array(inits[first.input[2]])
        w2 = numpy_helper.to_array(inits[second.input[1]])
        w1, b1, w2, keep = prune_units(w1, b1, w2, options.sparsity)
        for name, array in ((first.input[1], w1), (first.input[2], b1), (second.input[1], w2)):
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        changed[first.name or first.output[0]] = int(keep.size)
    if not changed:
        raise Refused(
            "no prunable dense chain (Gemm -> Relu -> Gemm with initializer weights); "
            "convolutions: prune-channels-25 / prune-channels-50"
        )
    del graph.value_info[:]  # widths changed; ONNX Runtime infers them again
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return Produced(out, {"sparsity": options.sparsity, "hidden_units_kept": changed})


def _dense_chain(
    node: Any, consumers: Mapping[str, list[Any]], inits: Mapping[str, Any], outputs: set[str]
) -> Any:
    """The second Gemm of a prunable ``node -> Relu -> Gemm`` chain, else None."""

    def plain_gemm(n: Any, with_bias: bool) -> bool:
        attrs = {a.name: a.i for a in n.attribute}
        return (
            n.op_type == "Gemm"
            and attrs.get("transA", 0) == 0
            and attrs.get("transB", 0) == 0
            and len(n.input) >= (3 if with_bias else 2)
            and all(name in inits for name in n.input[1 : 3 if with_bias else 2])
        )

    if not plain_gemm(node, True) or node.output[0] in outputs:
        return None
    after = consumers.get(node.output[0], [])
    if len(after) != 1 or after[0].op_type != "Relu" or after[0].output[0] in outputs:
        return None
    nxt = consumers.get(after[0].output[0], [])
    if len(nxt) != 1 or not plain_gemm(nxt[0], False) or nxt[0].input[0] != after[0].output[0]:
        return None
    return nxt[0]


CHANNEL_ALIGN = 8
"""Channel counts left by ``prune-channels-*`` are multiples of this where the layer's
was: ONNX Runtime's x86 NCHWc convolutions block channels by 8 (AVX2) or 16 (AVX-512) and
fall back to slower kernels otherwise (measured on ocr_cls: 25 % of channels removed
unaligned ran 0.8x the original's speed, aligned to 8 1.2x; docs/optimize-pruning.md)."""


def channel_moments(
    model: onnx.ModelProto, names: list[str], calibration: Samples, limit: int
) -> dict[str, channels.Moments]:
    """:class:`channels.Moments` of tensors ``names`` of ``model`` over the first ``limit``
    calibration samples, one run each (ONNX Runtime, CPU)."""
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    rows = calibration.rows(slice(0, max(1, limit)))
    runs = [session.run(names, inputs) for inputs in rows.batches(1)]
    return {
        name: channels.Moments.of(run[index] for run in runs) for index, name in enumerate(names)
    }


def _channel_pruning(ratio: float) -> Method:
    def run(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
        model = load_model(source)
        try:
            names = channels.reader_inputs(model)
            moments = channel_moments(model, names, calibration, options.calibration_samples)
        except Exception as e:  # onnxruntime and shape inference raise many kinds
            raise Refused(f"collecting the channel statistics for the re-fit failed: {e}") from e
        result = channels.prune_channels(
            model,
            ratio,
            min_channels=options.prune_min_channels,
            align=CHANNEL_ALIGN,
            moments=moments,
        )
        if not result.pruned:
            skipped = "; ".join(f"{k}: {v}" for k, v in list(result.skipped.items())[:3])
            narrow = (
                f"; {result.narrow} set(s) narrower than {options.prune_min_channels} channels "
                f"or too narrow to lose {ratio:.0%} in steps of {CHANNEL_ALIGN}"
                if result.narrow
                else ""
            )
            raise Refused(
                "no prunable convolution channel set (dense Conv producers, consumers that "
                "keep channels apart)" + narrow + (f"; skipped {skipped}" if skipped else "")
            )
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise Refused(f"the pruned graph does not check: {e}") from e
        onnx.save(model, str(out))
        before = sum(b for b, _ in result.pruned.values())
        after = sum(a for _, a in result.pruned.values())
        return Produced(out, {
            "ratio": ratio,
            "min_channels": options.prune_min_channels,
            "align": CHANNEL_ALIGN,
            "channel_sets_pruned": len(result.pruned),
            "channels": [before, after],
            "params": [result.params_before, result.params_after],
            "refit_readers": result.refitted,
            "narrow_sets_left": result.narrow,
            "skipped": result.skipped,
        })  # fmt: skip

    return run


def chained(first: Method, second: Method) -> Method:
    """``second`` run on what ``first`` made, with the same calibration samples: one variant,
    gated as one (the intermediate file is never measured or written). The notes hold each
    step's, as ``first`` and ``second``."""

    def run(source: Path, out: Path, calibration: Samples, options: Options) -> Produced:
        middle = out.with_name(f"first-{out.name}")
        try:
            made = first(source, middle, calibration, options)
            final = second(made.path, out, calibration, options)
        finally:
            middle.unlink(missing_ok=True)
        return Produced(final.path, {"first": made.notes, "second": final.notes},
                        {**made.files, **final.files})  # fmt: skip

    return run


METHODS: dict[str, Method] = {
    "int8-static-minmax": _static("MinMax"),
    "int8-static-entropy": _static("Entropy"),
    "int8-static-percentile": _static("Percentile"),
    "int8-static-excluded": _static("MinMax", exclude_sweep=True),
    "int8-dynamic": int8_dynamic,
    "fp16": fp16,
    "fuse-hardswish": fuse_hardswish,
    "litert-int8": litert_int8,
    "prune-magnitude": prune_magnitude,
    "prune-structured": prune_structured,
    "prune-channels-25": _channel_pruning(0.25),
    "prune-channels-50": _channel_pruning(0.5),
    "prune-channels-25+int8-static-minmax": chained(_channel_pruning(0.25), _static("MinMax")),
    "prune-channels-50+int8-static-minmax": chained(_channel_pruning(0.5), _static("MinMax")),
    "fuse-hardswish+prune-channels-50": chained(fuse_hardswish, _channel_pruning(0.5)),
}
"""Every graph method by name (``--methods``); head methods live in edged.optimize.head."""

DEFAULT_METHODS = (
    "int8-static-minmax",
    "int8-static-entropy",
    "int8-static-percentile",
    "int8-static-excluded",
    "int8-dynamic",
    "fp16",
    "litert-int8",
)
"""What runs without ``--methods``."""
