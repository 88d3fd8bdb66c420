"""Structured channel pruning of convolutional ONNX graphs: whole output channels of a
convolution removed, and the removal carried to every tensor that holds those channels.

A *channel set* is a group of tensors that must keep the same channels: a convolution's
output and everything computed from it channel by channel (BatchNormalization, activations,
elementwise arithmetic with a scalar or per-channel constant, pooling, depthwise
convolutions, Resize by constant scales) up to the convolutions that read it. An elementwise
Add/Mul/Sub/Div of two such tensors (a residual connection, a squeeze-excitation gate)
joins their sets: they are *coupled*, and are pruned together, the same channels from
every convolution that produces into the set. Nothing is pruned in a set that:

- a Concat, Reshape, Flatten, MatMul/Gemm, Split, Transpose or other operator reads or
  writes (the channel index would move, so the set is skipped, with that operator named);
- a graph input or output belongs to (the model's interface does not change);
- a grouped convolution that is neither dense (group 1) nor depthwise reads;
- no convolution produces (its channels come from elsewhere).

With :class:`Moments` of the readers' inputs (calibration statistics), channels are ranked
by the error their removal alone adds to the readers' outputs after the re-fit
(:func:`_data_importance`), and each reading convolution is re-fitted: the removed channels
are replaced by their least-squares fit from the kept ones (:func:`substitution`). Without
them, by the L1 norm of their filters, scaled by the following BatchNormalization's
``|gamma| / sqrt(var + eps)`` where one directly follows (a channel the normalisation shrinks
matters less), summed over the set's producers after dividing each producer's norms by their
mean (so that no producer outweighs the others by its scale). The lowest ``ratio`` of each
set goes (:func:`kept_channels`); at least one channel stays. Every choice is made from the
original weights, in graph order, so the same model gives the same variant.

:func:`prune_channels` rewrites an ``onnx.ModelProto`` in memory and does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edged.optimize.errors import OptimizeError

UNARY = frozenset({
    "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Clip", "Elu",
    "Selu", "Softplus", "Mish", "Gelu", "Identity", "Dropout", "Abs", "Neg", "Sqrt", "Exp",
    "Erf", "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "Cast",
})  # fmt: skip
"""Operators whose first output keeps the channels of their first input, one by one (other
inputs, such as Clip's bounds, are scalars)."""

ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min"})
"""Binary operators that broadcast: a dynamic operand joins the set, a constant one is
sliced where it is per-channel."""


@dataclass
class ChannelSet:
    """Tensors sharing one channel axis, and the nodes to rewrite when it shrinks."""

    tensors: set[str] = field(default_factory=set)
    producers: list[Any] = field(default_factory=list)
    """Dense convolutions (and ConvTransposes) whose output channels these are."""
    readers: list[Any] = field(default_factory=list)
    """Dense convolutions (and ConvTransposes) reading these as input channels."""
    depthwise: list[Any] = field(default_factory=list)
    norms: list[Any] = field(default_factory=list)
    constants: list[tuple[Any, int, int]] = field(default_factory=list)
    """Per-channel constant operands: (node, input index, channel axis of the constant)."""
    blocked: list[str] = field(default_factory=list)
    """Why the set cannot be pruned (empty: it can)."""


@dataclass
class Pruned:
    """What :func:`prune_channels` did: the model and, per set, what happened."""

    model: Any
    pruned: dict[str, tuple[int, int]]
    """By the set's first producer's output: (channels before, after)."""
    skipped: dict[str, str]
    """By the set's first producer's output (or a tensor of it): why it was left alone."""
    params_before: int
    params_after: int
    narrow: int = 0
    """Prunable sets left alone for being narrower than ``min_channels``."""
    refitted: int = 0
    """Reading convolutions re-fitted (the rest were only sliced)."""


class _Sets:
    """Union-find over tensor names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        root = name
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[name] != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def fold_constant_reshapes(model: Any) -> int:
    """Replace every Reshape of an initializer by a constant shape with the reshaped
    initializer (exporters write per-channel biases so); returns how many. Exact."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    kept, folded = [], 0
    for node in graph.node:
        if (
            node.op_type == "Reshape"
            and len(node.input) == 2
            and all(i in inits for i in node.input)
            and not _attr(node, "allowzero", 0)
        ):
            data = numpy_helper.to_array(inits[node.input[0]])
            shape = [int(s) for s in numpy_helper.to_array(inits[node.input[1]])]
            shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            tensor = numpy_helper.from_array(data.reshape(shape), node.output[0])
            graph.initializer.append(tensor)
            inits[tensor.name] = tensor
            folded += 1
        else:
            kept.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
    return folded


def _channels(shape: dict[str, list[int | None]], name: str) -> int | None:
    dims = shape.get(name)
    return dims[1] if dims is not None and len(dims) >= 2 else None


def _shapes(model: Any) -> dict[str, list[int | None]]:
    shape: dict[str, list[int | None]] = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shape[vi.name] = [
                d.dim_value if d.HasField("dim_value") else None
                for d in vi.type.tensor_type.shape.dim
            ]
    return shape


class _Analysis:
    """One walk over the graph's nodes, filing each tensor's role; :meth:`sets` groups them."""

    def __init__(self, model: Any) -> None:
        self.inits = {i.name: i for i in model.graph.initializer}
        self.shape = _shapes(model)
        self.union = _Sets()
        self.producers: dict[str, Any] = {}
        self.readers: dict[str, list[Any]] = {}
        self.depthwise: dict[str, list[Any]] = {}
        self.norms: dict[str, list[Any]] = {}
        self.constants: dict[str, list[tuple[Any, int, int]]] = {}
        self.blocked: dict[str, list[str]] = {}
        self.nodes = list(model.graph.node)
        for node in self.nodes:
            self.visit(node)
        for vi in model.graph.input:
            if vi.name not in self.inits:
                self.block(vi.name, f"graph input {vi.name}")
        for vi in model.graph.output:
            self.block(vi.name, f"graph output {vi.name}")

    def block(self, name: str, why: str) -> None:
        self.blocked.setdefault(name, []).append(why)

    def visit(self, node: Any) -> None:
        op = node.op_type
        dynamic = [i for i in node.input if i and i not in self.inits]
        if op in ("Conv", "ConvTranspose") and node.input[1] in self.inits and len(dynamic) == 1:
            self.conv(node)
        elif op == "BatchNormalization" and all(i in self.inits for i in node.input[1:5]):
            self.union.union(node.input[0], node.output[0])
            self.norms.setdefault(node.input[0], []).append(node)
            for extra in node.output[1:]:
                if extra:
                    self.block(extra, "BatchNormalization training outputs")
        elif (op in UNARY and dynamic == [node.input[0]]) or (
            op == "Resize" and _channel_scale_one(node, self.inits)
        ):
            self.union.union(node.input[0], node.output[0])
        elif op in ELEMENTWISE and len(node.input) == 2 and dynamic:
            self.elementwise(node, dynamic)
        else:
            for name in [*node.input, *node.output]:
                if name and name not in self.inits:
                    self.block(name, f"{op} {node.name or node.output[0]}")

    def conv(self, node: Any) -> None:
        weight = self.inits[node.input[1]].dims
        group = _attr(node, "group", 1)
        if group == 1:
            self.producers[node.output[0]] = node
            self.readers.setdefault(node.input[0], []).append(node)
            self.union.find(node.output[0])
            self.union.find(node.input[0])
        elif node.op_type == "Conv" and group == weight[0] and weight[1] == 1:  # depthwise
            self.union.union(node.input[0], node.output[0])
            self.depthwise.setdefault(node.input[0], []).append(node)
        else:
            why = f"{node.op_type} {node.name or node.output[0]} with group {group}"
            self.block(node.input[0], why)
            self.block(node.output[0], why)

    def elementwise(self, node: Any, dynamic: list[str]) -> None:
        label = f"{node.op_type} {node.name or node.output[0]}"
        out = node.output[0]
        rank = len(self.shape.get(out) or [])
        for index, name in enumerate(node.input):
            if name in self.inits:
                axis = _channel_axis(self.inits[name].dims, rank)
                if axis == -2:
                    self.block(out, f"{label}: constant {name} is neither scalar nor per-channel")
                elif axis >= 0:
                    self.constants.setdefault(out, []).append((node, index, axis))
        if len(dynamic) == 1:
            self.union.union(dynamic[0], out)
            return
        out_c = _channels(self.shape, out)
        widths = [_channels(self.shape, name) for name in dynamic]
        if out_c is None or None in widths:
            for name in [*dynamic, out]:
                self.block(name, f"{label}: channels unknown")
            return
        for name, width in zip(dynamic, widths, strict=True):
            if width == out_c:
                self.union.union(name, out)
            elif width != 1:
                self.block(name, f"{label}: broadcasts {width} channels to {out_c}")
            # width 1: a per-pixel map broadcast over the channels, not in the set

    def sets(self) -> list[ChannelSet]:
        groups: dict[str, ChannelSet] = {}
        # sorted, then ordered by the graph: the same sets, in the same order, every run
        for name in sorted(set(self.union.parent) | set(self.blocked) | set(self.constants)):
            group = groups.setdefault(self.union.find(name), ChannelSet())
            group.tensors.add(name)
            if name in self.producers:
                group.producers.append(self.producers[name])
            group.readers.extend(self.readers.get(name, []))
            group.depthwise.extend(self.depthwise.get(name, []))
            group.norms.extend(self.norms.get(name, []))
            group.constants.extend(self.constants.get(name, []))
            group.blocked.extend(self.blocked.get(name, []))
        for group in groups.values():
            if not group.producers and not group.blocked:
                group.blocked.append("no convolution produces these channels")
            widths = {_out_channels(p, self.inits) for p in group.producers}
            if len(widths) > 1:
                group.blocked.append(f"producers disagree on the channel count: {sorted(widths)}")
        order = {n.output[0]: i for i, n in enumerate(self.nodes)}

        def first(group: ChannelSet) -> tuple[int, str]:
            ranks = [order.get(p.output[0], len(order)) for p in group.producers]
            return (min(ranks, default=len(order)), min(group.tensors))

        for group in groups.values():
            group.producers.sort(key=lambda p: order.get(p.output[0], len(order)))
        return sorted(groups.values(), key=first)


def channel_sets(model: Any) -> list[ChannelSet]:
    """Every channel set of ``model`` (weights in initializers, Constant nodes already
    turned into initializers), each with what blocks it."""
    return _Analysis(model).sets()


def _channel_scale_one(node: Any, inits: dict[str, Any]) -> bool:
    """A Resize by constant scales that leave batch and channels alone (no ``sizes``)."""
    if len(node.input) < 3 or (len(node.input) > 3 and node.input[3]):
        return False
    scales = node.input[2]
    if scales not in inits:
        return False
    values = numpy_helper.to_array(inits[scales])
    return values.size >= 2 and values[0] == 1 and values[1] == 1


def _channel_axis(dims: Iterable[int], rank: int) -> int:
    """For a constant operand of shape ``dims`` broadcast against an NC... tensor of
    ``rank``: -1 scalar-like (size 1), the axis of the constant that runs over channels, or
    -2 when it varies along some other axis (not handled)."""
    dims = list(dims)
    if int(np.prod(dims, dtype=np.int64)) == 1:
        return -1
    if rank < 2 or len(dims) > rank:
        return -2
    axis = len(dims) - (rank - 1)  # where axis 1 of the tensor lands in the constant
    if axis < 0:
        return -2
    others = [d for i, d in enumerate(dims) if i != axis]
    return axis if all(d == 1 for d in others) and dims[axis] > 1 else -2


def _out_channels(node: Any, inits: dict[str, Any]) -> int:
    weight = inits[node.input[1]].dims
    if node.op_type == "ConvTranspose":
        return int(weight[1] * _attr(node, "group", 1))
    return int(weight[0])


def importance(group: ChannelSet, inits: dict[str, Any], consumers: dict[str, list[Any]]) -> Any:
    """Per channel of ``group``: the producers' filter L1 norms (BN-scaled where a
    BatchNormalization alone reads the producer's output), each divided by its mean,
    summed."""
    total: Any = 0
    for node in group.producers:
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        axis = 1 if node.op_type == "ConvTranspose" else 0
        l1 = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).sum(axis=1)
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "BatchNormalization":
            bn = after[0]
            gamma = numpy_helper.to_array(inits[bn.input[1]]).astype(np.float64)
            var = numpy_helper.to_array(inits[bn.input[4]]).astype(np.float64)
            l1 = l1 * np.abs(gamma) / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
        total = total + l1 / max(float(np.mean(l1)), 1e-30)
    return total


@dataclass(frozen=True)
class Moments:
    """First and second moments of one tensor's channels over every pixel of the
    calibration samples: ``mean`` [C] and ``gram`` [C, C] = E[x x^T]."""

    mean: Any
    gram: Any

    @classmethod
    def of(cls, arrays: Iterable[Any]) -> Moments:
        """Moments over ``arrays``, each [N, C, ...] (axis 1 the channels)."""
        total: Any = 0.0
        outer: Any = 0.0
        count = 0
        for array in arrays:
            x = np.moveaxis(np.asarray(array, np.float64), 1, 0).reshape(array.shape[1], -1)
            total = total + x.sum(axis=1)
            outer = outer + x @ x.T
            count += x.shape[1]
        if not count:
            raise OptimizeError("no samples to take channel moments from")
        return cls(np.asarray(total) / count, np.asarray(outer) / count)


def substitution(moments: Moments, keep: Any, drop: Any, rcond: float = 1e-6) -> tuple[Any, Any]:
    """The least-squares fit ``x[drop] ~= a @ x[keep] + c`` over the pixels ``moments``
    summarise: ``(a, c)``. Directions of the kept channels' covariance with less than
    ``rcond`` of its largest variance (dead or duplicated channels) are left out
    (pseudo-inverse) rather than fitted to noise."""
    cov = moments.gram - np.outer(moments.mean, moments.mean)
    kk = cov[np.ix_(keep, keep)]
    a = (np.linalg.pinv(kk, rcond=rcond, hermitian=True) @ cov[np.ix_(keep, drop)]).T
    c = moments.mean[drop] - a @ moments.mean[keep]
    return a, c


def reader_inputs(model: Any) -> list[str]:
    """The tensors the dense convolutions of prunable channel sets read: what
    :func:`prune_channels` needs :class:`Moments` of to re-fit them (call it on the model as
    :func:`prune_channels` gets it)."""
    fold_constant_reshapes(model)
    names = {
        node.input[0]
        for group in channel_sets(model)
        if group.producers and not group.blocked
        for node in group.readers
        if node.op_type == "Conv"
    }
    return sorted(names)


def _data_importance(
    group: ChannelSet, inits: dict[str, Any], moments: Mapping[str, Moments], ridge: float = 1e-3
) -> Any:
    """Per channel of ``group``, when every reader is a Conv with :class:`Moments` of its
    input: the squared error that removing that channel alone adds to the readers' outputs
    after the re-fit, ``sum_r ||W_r[:, c]||^2 * var(x_c | other channels)`` (the conditional
    variance is ``1 / (cov^-1)_cc``); each reader's share divided by its mean. None
    otherwise (then :func:`importance` ranks)."""
    if not group.readers or any(
        r.op_type != "Conv" or r.input[0] not in moments for r in group.readers
    ):
        return None
    total: Any = 0
    for node in group.readers:
        stats = moments[node.input[0]]
        cov = stats.gram - np.outer(stats.mean, stats.mean)
        lam = ridge * max(float(np.mean(np.diag(cov))), 1e-12)
        precision = np.linalg.inv(cov + lam * np.eye(cov.shape[0]))
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        energy = np.square(w).sum(axis=(0, 2, 3))
        share = energy / np.diag(precision)
        total = total + share / max(float(np.mean(share)), 1e-30)
    return total


def _replace(graph: Any, node: Any, index: int, array: Any, inits: dict[str, Any]) -> None:
    """Give ``node``'s input ``index`` a new initializer holding ``array`` (initializers
    shared with other nodes are never edited in place)."""
    name = f"{node.input[index]}__pruned_{node.output[0]}"
    tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
    graph.initializer.append(tensor)
    inits[name] = tensor
    node.input[index] = name


def kept_channels(width: int, ratio: float, align: int) -> int:
    """How many of ``width`` channels stay when ``ratio`` of them go: ``width - round(ratio *
    width)``, at least one; with ``align`` > 1 and ``width`` a multiple of it, rounded to the
    nearest multiple of ``align`` (at least ``align``), so that a CPU kernel that blocks
    channels by ``align`` (ONNX Runtime's NCHWc convolutions on x86: 8 with AVX2, 16 with
    AVX-512) keeps its fast path."""
    kept = max(1, width - round(ratio * width))
    if align > 1 and width % align == 0:
        kept = min(width, max(align, math.floor(kept / align + 0.5) * align))
    return kept


def prune_channels(
    model: Any,
    ratio: float,
    min_channels: int = 4,
    align: int = 1,
    moments: Mapping[str, Moments] | None = None,
) -> Pruned:
    """Remove ``ratio`` of the channels (:func:`kept_channels`) of every prunable channel set
    of ``model`` (edited in place and returned) with at least ``min_channels`` channels.

    With ``moments`` of a reading convolution's input (:func:`reader_inputs`), that
    convolution is re-fitted instead of merely sliced: each removed input channel is
    replaced by its least-squares fit from the kept ones (:func:`substitution`), folded into
    the kept weights and the bias. Exact for a removed channel that is an affine function of
    the kept ones (a constant one included) away from zero-padded borders; the rest of the
    time the best linear stand-in the calibration data allows, with no training.

    Raises:
        OptimizeError: ``ratio`` is not in [0, 1).
    """
    if not 0 <= ratio < 1:
        raise OptimizeError(f"the prune ratio must be in [0, 1), got {ratio}")
    graph = model.graph
    fold_constant_reshapes(model)
    inits = {i.name: i for i in graph.initializer}
    before = _params(model)
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    pruned: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    narrow = refitted = 0
    plan: list[tuple[str, ChannelSet, Any]] = []
    for group in channel_sets(model):  # every choice from the original weights first
        label = group.producers[0].output[0] if group.producers else min(group.tensors)
        if group.blocked:
            if group.producers:
                skipped[label] = "; ".join(sorted(set(group.blocked))[:3])
            continue
        width = _out_channels(group.producers[0], inits)
        drop = width - kept_channels(width, ratio, align)
        if width < min_channels or drop == 0:
            narrow += 1
            continue
        score = _data_importance(group, inits, moments or {})
        if score is None:
            score = importance(group, inits, consumers)
        plan.append((label, group, np.sort(np.argsort(score, kind="stable")[drop:])))
        pruned[label] = (width, int(plan[-1][2].size))
    for _, group, keep in plan:  # then the edits (slicing commutes across sets)
        _apply(graph, group, keep, inits, moments or {})
        refitted += sum(
            r.op_type == "Conv" and r.input[0] in (moments or {}) for r in group.readers
        )
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if pruned:
        del graph.value_info[:]  # widths changed; inferred again below and by ONNX Runtime
    return Pruned(model, pruned, skipped, before, _params(model), narrow, refitted)


def _apply(
    graph: Any, group: ChannelSet, keep: Any, inits: dict[str, Any], moments: Mapping[str, Moments]
) -> None:
    def array(name: str) -> Any:
        return numpy_helper.to_array(inits[name])

    width = _out_channels(group.producers[0], inits)
    drop = np.setdiff1d(np.arange(width), keep)

    for node in group.producers:
        axis = 1 if node.op_type == "ConvTranspose" else 0
        _replace(graph, node, 1, np.take(array(node.input[1]), keep, axis=axis), inits)
        if len(node.input) > 2 and node.input[2]:
            _replace(graph, node, 2, array(node.input[2])[keep], inits)
    for node in group.readers:
        _refit_reader(graph, node, keep, drop, inits, moments.get(node.input[0]))
    for node in group.depthwise:
        _replace(graph, node, 1, array(node.input[1])[keep], inits)
        if len(node.input) > 2 and node.input[2]:
            _replace(graph, node, 2, array(node.input[2])[keep], inits)
        for a in node.attribute:
            if a.name == "group":
                a.i = int(keep.size)
    for node in group.norms:
        for index in range(1, 5):
            _replace(graph, node, index, array(node.input[index])[keep], inits)
    for node, index, axis in group.constants:
        _replace(graph, node, index, np.take(array(node.input[index]), keep, axis=axis), inits)


def _refit_reader(
    graph: Any, node: Any, keep: Any, drop: Any, inits: dict[str, Any], stats: Moments | None
) -> None:
    """Slice the input channels of reading convolution ``node`` to ``keep``; with ``stats``
    of its input, fold the fit of the dropped channels (:func:`substitution`) in."""
    weight = numpy_helper.to_array(inits[node.input[1]])
    if node.op_type == "ConvTranspose":  # input channels on axis 0; sliced, not re-fitted
        _replace(graph, node, 1, weight[keep], inits)
        return
    if stats is None:
        _replace(graph, node, 1, weight[:, keep], inits)
        return
    a, c = substitution(stats, keep, drop)
    w = weight.astype(np.float64)
    kept = w[:, keep] + np.einsum("odhw,dk->okhw", w[:, drop], a)
    shift = np.einsum("odhw,d->o", w[:, drop], c)
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) + shift
        _replace(graph, node, 2, bias.astype(weight.dtype), inits)
    else:
        name = f"{node.output[0]}__refit_bias"
        tensor = numpy_helper.from_array(shift.astype(weight.dtype), name)
        graph.initializer.append(tensor)
        inits[name] = tensor
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    _replace(graph, node, 1, kept.astype(weight.dtype), inits)


def _params(model: Any) -> int:
    return sum(int(np.prod(i.dims, dtype=np.int64)) for i in model.graph.initializer)
