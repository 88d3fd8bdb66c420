"""Candidate cuts of an ONNX graph, and the head and tail models cut at one.

A *cut* is one tensor that separates the graph: in the graph's (topological) node order there
is a point before which that tensor is produced and after which every node needs only it,
initializers and constants. The head computes the cut tensor from the graph inputs; the tail
computes the graph outputs from the cut tensor. Both are extracted with onnx's own
``onnx.utils.Extractor`` (the graph API under ``onnx.utils.extract_model``), after shape
inference so that the cut tensor has a type.

``onnx`` is the ``edged[learn]`` extra: this module is imported by ``edged partition`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edged.core.errors import ConfigError
from edged.partition.planner import ALL_REMOTE
from edged.storage import write_atomic

if TYPE_CHECKING:
    import onnx

#: the name of the cut that sends the graph inputs themselves (no head: all remote)
INPUTS_CUT = ALL_REMOTE

#: where the head and tail of a split model live beside the whole model (a version folder)
HEAD_FILE = "head.onnx"
#: AttributeProto.GRAPH and .GRAPHS: a node carrying a subgraph (If, Loop, Scan)
_GRAPH_ATTRIBUTES = (5, 10)
TAIL_FILE = "tail.onnx"

#: what a cut tensor may be sent as instead of its own datatype (KServe names): an FP32 cut
#: tensor sent as FP16 is cast at the end of the head and back to FP32 at the start of the
#: tail, halving the bytes on the link (``edged partition --wire-dtype FP16``)
WIRE_DTYPES = ("FP16",)


@dataclass(frozen=True)
class Cut:
    """One candidate cut."""

    tensor: str
    """The tensor sent from head to tail (``INPUTS_CUT``: the graph inputs, no head)."""
    position: int
    """Nodes of the graph (in its order) that run in the head."""
    op: str = ""
    """The operator that produces the tensor ("" for the inputs cut)."""


def load(path: Path) -> onnx.ModelProto:
    """``path`` read with onnx, its shapes inferred (so that every cut tensor has a type).

    Raises:
        ConfigError: onnx is not installed, or ``path`` is not an ONNX model.
    """
    try:
        import onnx  # noqa: PLC0415 - the edged[learn] extra, never on the daemon's path
    except ImportError as e:
        raise ConfigError(
            "splitting a model needs the onnx package: pip install 'edged[learn]'"
        ) from e

    try:
        model = onnx.load(str(path))
        return onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise ConfigError(f"{path}: not an ONNX model onnx can read: {e}") from e


def _typed(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return {
        v.name
        for v in (*g.value_info, *g.input, *g.output)
        if v.type.HasField("tensor_type")
        and v.type.tensor_type.elem_type
        and v.type.tensor_type.HasField("shape")  # a server checks the rank it is sent
    }


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in _GRAPH_ATTRIBUTES for a in node.attribute)


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph's inputs that are not initializers (what a caller feeds)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def candidate_cuts(model: onnx.ModelProto) -> list[Cut]:
    """Every single-tensor cut of ``model`` (shapes inferred), in graph order, after the
    inputs cut (all remote). A tensor qualifies when, after the node that produces it, the
    remaining nodes read nothing computed earlier (nor a graph input) but it and constants,
    it has a type and a rank, and it is not itself a graph output. Nodes with subgraphs (If, Loop,
    Scan) are never split across: their implicit inputs are not visible here."""
    g = model.graph
    nodes = list(g.node)
    constant: set[str] = {t.name for t in g.initializer}
    for node in nodes:  # tensors computed from constants alone are free on both sides
        if all(not i or i in constant for i in node.input) and not _has_subgraph(node):
            constant.update(o for o in node.output if o)
    inputs = graph_inputs(model)
    outputs = {o.name for o in g.output}
    typed = _typed(model)
    # last position that reads each tensor; a tensor is live across the cut after position k
    # when it was produced at or before k and is read (or is a graph output) after k
    last_read: dict[str, int] = {}
    has_subgraph: list[bool] = []
    for k, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constant:
                last_read[name] = k
        has_subgraph.append(_has_subgraph(node))
    for name in outputs:
        last_read[name] = len(nodes)
    live: set[str] = {n for n in inputs if last_read.get(n, -1) >= 0}
    cuts: list[Cut] = [Cut(INPUTS_CUT, 0)]
    for k, node in enumerate(nodes[:-1]):
        live.update(o for o in node.output if o and o not in constant)
        live = {n for n in live if last_read.get(n, -1) > k}
        if len(live) != 1 or has_subgraph[k]:
            continue
        (tensor,) = live
        if tensor in outputs or tensor not in typed or tensor in inputs:
            continue
        if cuts[-1].tensor == tensor:
            continue  # the same tensor after constant-only nodes: one cut
        cuts.append(Cut(tensor, k + 1, node.op_type))
    return cuts


@dataclass(frozen=True)
class Split:
    """A model cut in two; ``head`` is None for the inputs cut (nothing runs locally)."""

    cut: Cut
    head: onnx.ModelProto | None
    tail: onnx.ModelProto


def split(model: onnx.ModelProto, tensor: str, wire_dtype: str = "") -> Split:
    """``model`` (shapes inferred, see :func:`load`) cut at ``tensor``; with ``wire_dtype``
    (one of :data:`WIRE_DTYPES`) the tensor is sent in that datatype: the head ends with a
    Cast to it, the tail begins with a Cast back (the tensor keeps its name on the wire).

    Raises:
        ConfigError: ``tensor`` is not one of the candidate cuts (the message lists some), or
            ``wire_dtype`` is not one of :data:`WIRE_DTYPES` or does not apply to this cut.
    """
    import onnx  # noqa: PLC0415

    cuts = {c.tensor: c for c in candidate_cuts(model)}
    cut = cuts.get(tensor)
    if cut is None:
        shown = ", ".join(list(cuts)[:12]) + (", ..." if len(cuts) > 12 else "")
        raise ConfigError(f"tensor '{tensor}' is not a cut of this graph (cuts: {shown})")
    if wire_dtype:
        _check_wire(wire_dtype, model, tensor)
    inputs = graph_inputs(model)
    outputs = [o.name for o in model.graph.output]
    extractor = onnx.utils.Extractor(model)
    if cut.tensor == INPUTS_CUT:
        return Split(cut, None, extractor.extract_model(inputs, outputs))
    head = extractor.extract_model(inputs, [tensor])
    tail = extractor.extract_model([tensor], outputs)
    if wire_dtype:
        _send_as(wire_dtype, tensor, head, tail)
    return Split(cut, head, tail)


def _check_wire(wire_dtype: str, model: onnx.ModelProto, tensor: str) -> None:
    """``wire_dtype`` applies to ``tensor`` of ``model``: a known wire datatype, an FP32 cut.

    Raises:
        ConfigError: naming the datatype or the cut.
    """
    import onnx  # noqa: PLC0415

    if wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"wire datatype {wire_dtype!r}: expected one of {', '.join(WIRE_DTYPES)}")
    if tensor == INPUTS_CUT:
        raise ConfigError(
            f"cut '{INPUTS_CUT}' sends the request's inputs as they are: a wire datatype "
            "applies to the cuts that have a head"
        )
    for value in (*model.graph.output, *model.graph.value_info):
        if value.name == tensor and value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
            raise ConfigError(
                f"cut '{tensor}' is {kind}: wire datatype {wire_dtype} applies to FLOAT cuts"
            )


def _send_as(wire_dtype: str, tensor: str, head: onnx.ModelProto, tail: onnx.ModelProto) -> None:
    """Rewrite ``head`` to make ``tensor`` in ``wire_dtype`` and ``tail`` to take it so, each
    computing in FP32 as before under a private name (``<tensor>.fp32``)."""
    import onnx  # noqa: PLC0415

    wire = onnx.TensorProto.FLOAT16
    taken = {
        n for g in (head.graph, tail.graph) for node in g.node for n in (*node.input, *node.output)
    }
    inner = f"{tensor}.fp32"
    while inner in taken:
        inner += "_"
    for g in (head.graph, tail.graph):
        for node in g.node:
            node.output[:] = [inner if n == tensor else n for n in node.output]
            node.input[:] = [inner if n == tensor else n for n in node.input]
        for value in g.value_info:
            if value.name == tensor:
                value.name = inner
    head.graph.node.append(onnx.helper.make_node("Cast", [inner], [tensor], to=wire))
    for value in head.graph.output:
        if value.name == tensor:
            value.type.tensor_type.elem_type = wire
    tail.graph.node.insert(
        0, onnx.helper.make_node("Cast", [tensor], [inner], to=onnx.TensorProto.FLOAT)
    )
    for value in tail.graph.input:
        if value.name == tensor:
            value.type.tensor_type.elem_type = wire


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path`` (temp file, fsync, rename: never half a model)."""
    data = model.SerializeToString()
    write_atomic(path, lambda f: f.write(data))
