"""TFLite test models derived from the example models, written with the flatbuffer schema
LiteRT ships (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import flatbuffers
from ai_edge_litert import schema_py_generated as tfl

from hal.tflite_format import EDGETPU_CUSTOM_OP
from tests.daemon_process import EXAMPLE_MODELS

DIGITS_TFLITE = EXAMPLE_MODELS / "digits_tflite" / "1" / "model.tflite"
DIGITS_INT8 = EXAMPLE_MODELS / "digits_int8" / "1" / "model.tflite"


def _pack(model: tfl.ModelT) -> bytes:
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def with_custom_op(
    source: Path, target: Path, name: str = EDGETPU_CUSTOM_OP, used: bool = False
) -> Path:
    """``source`` with the custom operator ``name`` declared in its operator codes.

    ``used=False``: the code is declared but no node uses it, so the graph still runs on the
    CPU (how a test carries the Edge TPU marker through a *simulated* delegate that claims no
    node). ``used=True``: a node of that op reads the input and feeds an extra output
    ``custom_out``, as in a real compiled model; only a delegate that takes the node can run it.
    """
    model = tfl.ModelT.InitFromPackedBuf(bytearray(source.read_bytes()), 0)
    code = tfl.OperatorCodeT()
    code.builtinCode = tfl.BuiltinOperator.CUSTOM
    code.deprecatedBuiltinCode = tfl.BuiltinOperator.CUSTOM
    code.customCode = name
    code.version = 1
    model.operatorCodes = [*model.operatorCodes, code]
    if used:
        graph = model.subgraphs[0]
        first_input = graph.tensors[int(graph.inputs[0])]
        out = tfl.TensorT()
        out.name = "custom_out"
        out.type = first_input.type
        out.shape = list(first_input.shape)
        out.shapeSignature = (
            list(first_input.shapeSignature) if first_input.shapeSignature is not None else None
        )
        out.buffer = 0
        graph.tensors = [*graph.tensors, out]
        op = tfl.OperatorT()
        op.opcodeIndex = len(model.operatorCodes) - 1
        op.inputs = [int(graph.inputs[0])]
        op.outputs = [len(graph.tensors) - 1]
        graph.operators = [op, *graph.operators]
        graph.outputs = [*map(int, graph.outputs), len(graph.tensors) - 1]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_pack(model))
    return target
