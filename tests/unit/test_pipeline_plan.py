"""The pure half of pipelines: model.toml's [pipeline] parsed (edged.serving.repository) and
checked against step signatures (edged.serving.pipeline.plan_pipeline), table-tested; every
error names the step and the tensor."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edged.core.errors import ModelLoadError
from edged.core.types import DataType, Signature, TensorSpec
from edged.serving.pipeline import pipeline_toml_text, plan_pipeline
from edged.serving.repository import ModelSpec, parse_model_toml

FP32, INT64 = DataType.FP32, DataType.INT64

#: step model signatures: a classifier (batched), a doubler, an adder of two tensors
CLASSIFY = Signature(
    (TensorSpec("input", FP32, (-1, 64)),),
    (TensorSpec("probabilities", FP32, (-1, 10)), TensorSpec("label", INT64, (-1,))),
    8,
)
DOUBLE = Signature((TensorSpec("x", FP32, (-1, 4)),), (TensorSpec("y", FP32, (-1, 4)),), 8)
ADD = Signature(
    (TensorSpec("a", FP32, (-1, 4)), TensorSpec("b", FP32, (-1, 4))),
    (TensorSpec("sum", FP32, (-1, 4)),),
    8,
)
MODELS = {"classify": CLASSIFY, "double": DOUBLE, "add": ADD}

HEAD = """max_batch_size = 4
[[inputs]]
name = "x"
datatype = "FP32"
dims = [4]
[[outputs]]
name = "out"
"""

#: a diamond: x -> left, right (independent) -> join
DIAMOND = (
    HEAD
    + """
[[pipeline.step]]
name = "left"
model = "double"
input_map = { x = "x" }
output_map = { y = "l" }
[[pipeline.step]]
name = "join"
model = "add"
input_map = { a = "l", b = "r" }
output_map = { sum = "out" }
[[pipeline.step]]
name = "right"
model = "double"
input_map = { x = "x" }
output_map = { y = "r" }
"""
)


def spec(text: str, tmp_path: Path) -> ModelSpec:
    return parse_model_toml(tmp_path / "pipe", tomllib.loads(text))


def signatures(s: ModelSpec) -> dict[str, Signature]:
    assert s.pipeline is not None
    return {step.name: MODELS[step.model] for step in s.pipeline.steps}


def test_a_diamond_is_ordered_with_independent_steps_free(tmp_path: Path) -> None:
    s = spec(DIAMOND, tmp_path)
    plan = plan_pipeline(s, signatures(s))
    order = [sp.step.name for sp in plan.steps]
    assert order.index("join") == 2
    needs = {sp.step.name: sp.needs for sp in plan.steps}
    assert needs == {"left": frozenset(), "right": frozenset(), "join": {"left", "right"}}
    assert plan.signature == Signature(
        (TensorSpec("x", FP32, (-1, 4)),), (TensorSpec("out", FP32, (-1, 4)),), 4
    )
    # the completed model.toml reads back to the same pipeline
    again = spec(pipeline_toml_text(s, plan.signature), tmp_path)
    assert again.pipeline == s.pipeline


def _step(model: str, inputs: str, outputs: str, name: str = "s") -> str:
    return (
        f'\n[[pipeline.step]]\nname = "{name}"\nmodel = "{model}"\n'
        f"input_map = {{ {inputs} }}\noutput_map = {{ {outputs} }}\n"
    )


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (_step("double", 'x = "nope"', 'y = "out"'), ["step 's'", "tensor 'nope'"]),
        (_step("double", 'z = "x"', 'y = "out"'), ["step 's'", "no input 'z'"]),
        (_step("double", 'x = "x"', 'w = "out"'), ["step 's'", "no output 'w'"]),
        (_step("add", 'a = "x"', 'sum = "out"'), ["step 's'", "input 'b'", "not in its input_map"]),
        (_step("double", 'x = "x"', 'y = "x"'), ["step 's'", "tensor 'x'", "already made"]),
        (
            _step("classify", 'input = "x"', 'probabilities = "out"'),
            ["step 's'", "input 'input' has shape [-1, 64]", "tensor 'x' has [-1, 4]"],
        ),
        (
            _step("double", 'x = "x"', 'y = "t"', "a")
            + _step("classify", 'input = "t"', 'label = "out"', "b"),
            ["step 'b'", "tensor 't'"],
        ),
        (
            _step("double", 'x = "t2"', 'y = "t1"', "a")
            + _step("double", 'x = "t1"', 'y = "t2"', "b")
            + _step("double", 'x = "t1"', 'y = "out"', "c"),
            ["step 'a'", "a cycle", "tensor 't2'", "made by step 'b'"],
        ),
        (_step("double", 'x = "x"', 'y = "o"'), ["output 'out' is no step's output"]),
    ],
    ids=[
        "unknown-tensor",
        "unknown-input",
        "unknown-output",
        "unmapped-input",
        "made-twice",
        "shape",
        "shape-from-step",
        "cycle",
        "output-unmade",
    ],
)
def test_mapping_errors_name_step_and_tensor(body: str, named: list[str], tmp_path: Path) -> None:
    s = spec(HEAD + body, tmp_path)
    with pytest.raises(ModelLoadError) as failed:
        plan_pipeline(s, signatures(s))
    for words in named:
        assert words in str(failed.value)
    assert "pipeline 'pipe'" in str(failed.value)


def test_datatype_mismatch(tmp_path: Path) -> None:
    text = HEAD.replace('datatype = "FP32"', 'datatype = "INT64"', 1) + _step(
        "double", 'x = "x"', 'y = "out"'
    )
    s = spec(text, tmp_path)
    with pytest.raises(ModelLoadError, match="step 's': input 'x' is FP32 but tensor 'x' is INT64"):
        plan_pipeline(s, signatures(s))


def test_a_declared_output_must_fit_the_step_that_makes_it(tmp_path: Path) -> None:
    text = HEAD.replace('name = "out"\n', 'name = "out"\ndatatype = "INT64"\n') + _step(
        "double", 'x = "x"', 'y = "out"'
    )
    s = spec(text, tmp_path)
    with pytest.raises(ModelLoadError, match="output 'out' is declared INT64 but step 's'"):
        plan_pipeline(s, signatures(s))


def test_batch_size_above_a_step_models(tmp_path: Path) -> None:
    text = HEAD.replace("max_batch_size = 4", "max_batch_size = 16") + _step(
        "double", 'x = "x"', 'y = "out"'
    )
    s = spec(text, tmp_path)
    with pytest.raises(ModelLoadError, match="step 's': the pipeline's max_batch_size 16"):
        plan_pipeline(s, signatures(s))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'format = "onnx"\n' + HEAD + _step("double", 'x = "x"', 'y = "out"'),
            "'format' does not apply",
        ),
        (HEAD + "[pipeline]\nstep = []", "'pipeline.step' must be an array of tables"),
        (HEAD + "[pipeline]\nsteps = 1", "unknown key 'pipeline.steps'"),
        (HEAD + _step("double", 'x = "x"', 'y = "out"') + "batch = 1", "unknown key"),
        (
            HEAD + _step("double", 'x = "x"', 'y = "a"') + _step("double", 'x = "a"', 'y = "b"'),
            "a step is already named 's'",
        ),
        (
            HEAD + '[[pipeline.step]]\nmodel = "double"\ninput_map = { x = "x" }',
            "'pipeline.step[0].output_map' is missing (step 'double')",
        ),
        (
            HEAD + _step("double", 'x = "x"', "y = 3"),
            "'pipeline.step[0].output_map' must be a table",
        ),
        (
            HEAD.replace("dims = [4]\n", "") + _step("double", 'x = "x"', 'y = "out"'),
            "'inputs[0]' ('x') needs a datatype and dims",
        ),
        (
            HEAD + '[[pipeline.step]]\nmodel = "double"\nversion = 0\n'
            'input_map = { x = "x" }\noutput_map = { y = "out" }',
            "'pipeline.step[0].version' must be a version number",
        ),
    ],
    ids=[
        "artifact-key",
        "no-steps",
        "unknown-key",
        "unknown-step-key",
        "duplicate-step",
        "no-output-map",
        "bad-map",
        "input-without-dims",
        "bad-version",
    ],
)
def test_bad_pipeline_toml_is_refused_naming_the_key(
    text: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError) as failed:
        spec(text, tmp_path)
    assert message in str(failed.value)
