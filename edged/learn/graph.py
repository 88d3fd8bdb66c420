"""ONNX graphs for trainable models: an MLP backbone, and backbone + head as one served graph.

Fine-tuning touches only the :class:`~edged.learn.head.Head`; the model that is served is
:func:`compose` of the frozen backbone and the head, so any executor that runs ONNX serves a
fine-tuned version like any other. Graphs are built with ``onnx.helper`` (opset 17, IR
version 8, loadable by onnxruntime >= 1.17) and serialise to the same bytes for the same
inputs (``SerializeToString(deterministic=True)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edged.learn.head import Head

OPSET = 17
IR_VERSION = 8
PRODUCER = "edged.learn"
PROBABILITIES = "probabilities"
LABEL = "label"
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_MIN_OPSET = 13  # Softmax over the last axis only (earlier opsets flatten to 2-D first)


def mlp_backbone(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    *,
    input_name: str = "input",
    output_name: str = "features",
    doc: str = "",
) -> onnx.ModelProto:
    """A dense + ReLU stack (ReLU after every layer) as an ONNX model: FP32, dynamic batch.

    ``weights[i]`` has shape ``(in_i, out_i)``, ``biases[i]`` shape ``(out_i,)``.

    Raises:
        ValueError: no layers, or shapes that do not chain.
    """
    if not weights or len(weights) != len(biases):
        raise ValueError(
            f"need as many biases as weights, at least one: {len(weights)}, {len(biases)}"
        )
    ws = [np.ascontiguousarray(w, dtype=np.float32) for w in weights]
    bs = [np.ascontiguousarray(b, dtype=np.float32) for b in biases]
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ValueError(f"layer {i}: weight {w.shape} and bias {b.shape} do not match")
        if i and w.shape[0] != ws[i - 1].shape[1]:
            raise ValueError(
                f"layer {i} takes {w.shape[0]} inputs, layer {i - 1} gives {ws[i - 1].shape[1]}"
            )
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = input_name
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        last = i == len(ws) - 1
        dense = f"backbone_fc{i}"
        out = output_name if last else f"backbone_hidden{i}"
        inits += [
            numpy_helper.from_array(w, f"{dense}_weight"),
            numpy_helper.from_array(b, f"{dense}_bias"),
        ]
        nodes.append(
            helper.make_node(
                "Gemm", [current, f"{dense}_weight", f"{dense}_bias"], [dense], name=dense
            )
        )
        nodes.append(helper.make_node("Relu", [dense], [out], name=f"backbone_relu{i}"))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp_backbone",
        inputs=[
            helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", ws[0].shape[0]])
        ],
        outputs=[
            helper.make_tensor_value_info(
                output_name, TensorProto.FLOAT, ["batch", ws[-1].shape[1]]
            )
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def compose(
    backbone: onnx.ModelProto, head: Head, *, features: str = "features", doc: str = ""
) -> onnx.ModelProto:
    """The served graph: the backbone's inputs -> backbone -> standardise -> head -> softmax.

    Outputs, as the digits example model: ``probabilities`` (FP32 ``[batch, classes]``, the
    softmax of the logits) and ``label`` (INT64 ``[batch]``, their argmax). The backbone's
    own outputs are dropped, and nodes and initializers that only fed them are pruned. The
    head's initializers and nodes get a name prefix no backbone name starts with.

    Raises:
        ValueError: the backbone has no value ``features``, its declared width or element
            type does not fit the head, it already uses the name ``probabilities`` or
            ``label``, or its default-domain opset is older than 13.
    """
    graph = backbone.graph
    names = set(_all_names(graph))
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    if features not in produced:
        raise ValueError(f"the backbone has no value named {features!r} to feed the head")
    for taken in (PROBABILITIES, LABEL):
        if taken in names - {o.name for o in graph.output}:
            raise ValueError(f"the backbone already uses the name {taken!r}")
    opset = next((o.version for o in backbone.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < _MIN_OPSET:
        raise ValueError(f"the backbone's opset {opset} is older than {_MIN_OPSET}")
    shape = _declared_shape(graph, features)
    if shape is not None and len(shape) != 2:
        raise ValueError(
            f"the backbone's {features!r} has rank {len(shape)}, the head takes [batch, n]"
        )
    if shape is not None and shape[1] is not None and shape[1] != head.in_dim:
        raise ValueError(
            f"the backbone's {features!r} has {shape[1]} columns, the head takes {head.in_dim}"
        )
    elem = _declared_type(graph, features)
    if elem is not None and elem != TensorProto.FLOAT:
        raise ValueError(
            f"the backbone's {features!r} is {TensorProto.DataType.Name(elem)}, not FLOAT"
        )

    prefix = "head_"
    k = 0
    while any(n.startswith(prefix) for n in names):
        k += 1
        prefix = f"head{k}_"

    def p(name: str) -> str:
        return prefix + name

    inits = [
        numpy_helper.from_array(np.ascontiguousarray(head.mean, np.float32), p("mean")),
        numpy_helper.from_array(np.ascontiguousarray(head.scale, np.float32), p("scale")),
    ]
    nodes = [
        helper.make_node("Sub", [features, p("mean")], [p("centred")], name=p("sub")),
        helper.make_node("Div", [p("centred"), p("scale")], [p("standardised")], name=p("div")),
    ]
    current = p("standardised")
    for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
        last = i == head.layers - 1
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(w, np.float32), p(f"fc{i}_weight")),
            numpy_helper.from_array(np.ascontiguousarray(b, np.float32), p(f"fc{i}_bias")),
        ]
        out = p("logits") if last else p(f"fc{i}")
        nodes.append(
            helper.make_node(
                "Gemm", [current, p(f"fc{i}_weight"), p(f"fc{i}_bias")], [out], name=p(f"fc{i}")
            )
        )
        current = out
        if not last:
            nodes.append(helper.make_node("Relu", [out], [p(f"relu{i}")], name=p(f"relu{i}")))
            current = p(f"relu{i}")
    nodes += [
        helper.make_node("Softmax", [current], [PROBABILITIES], name=p("softmax"), axis=-1),
        helper.make_node("ArgMax", [current], [LABEL], name=p("argmax"), axis=1, keepdims=0),
    ]

    kept_nodes, kept_inits = _prune(graph, {features})
    outputs = [
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", head.classes]),
        helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["batch"]),
    ]
    kept_values = {o for n in kept_nodes for o in n.output}
    value_info = [v for v in graph.value_info if v.name in kept_values]
    value_info += [
        v for v in graph.output if v.name in kept_values and v.name not in {PROBABILITIES, LABEL}
    ]
    served = helper.make_graph(
        [*kept_nodes, *nodes],
        f"{graph.name or 'backbone'}+head",
        inputs=list(graph.input),
        outputs=outputs,
        initializer=[*kept_inits, *inits],
        value_info=value_info,
        sparse_initializer=list(graph.sparse_initializer),
    )
    model = helper.make_model(
        served,
        opset_imports=list(backbone.opset_import),
        ir_version=backbone.ir_version or IR_VERSION,
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    model.functions.extend(backbone.functions)
    for prop in backbone.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    standard = all(o.domain in _STANDARD_DOMAINS for o in model.opset_import)
    onnx.checker.check_model(model, full_check=standard)
    return model


def _prune(
    graph: onnx.GraphProto, needed: set[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (in their order) and initializers the values in ``needed`` depend on."""
    want = set(needed)
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if want.intersection(node.output):
            keep[i] = True
            want.update(_node_inputs(node))
    nodes = [n for n, k in zip(graph.node, keep, strict=True) if k]
    inits = [t for t in graph.initializer if t.name in want]
    return nodes, inits


def _node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """A node's inputs, including the outer values its subgraphs (If, Loop, Scan) read."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                yield from _node_inputs(inner)


def _all_names(graph: onnx.GraphProto) -> Iterator[str]:
    for v in (*graph.input, *graph.output, *graph.value_info):
        yield v.name
    for t in graph.initializer:
        yield t.name
    for node in graph.node:
        yield node.name
        yield from node.input
        yield from node.output
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_names(sub)


def _value(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto | None:
    for v in (*graph.output, *graph.value_info, *graph.input):
        if v.name == name:
            return v
    return None


def _declared_shape(graph: onnx.GraphProto, name: str) -> list[int | None] | None:
    """The declared shape of a value (None per unknown dim), or None if none is declared."""
    v = _value(graph, name)
    if v is None or not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
        return None
    return [
        int(d.dim_value) if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
    ]


def _declared_type(graph: onnx.GraphProto, name: str) -> int | None:
    v = _value(graph, name)
    if v is None or not v.type.HasField("tensor_type"):
        return None
    return int(v.type.tensor_type.elem_type) or None
