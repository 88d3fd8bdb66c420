"""Pipelines: a model.toml ``[pipeline]`` whose steps are other models of the repository
(Triton's ensembles). See docs/pipelines.md.

Two halves, as the batcher has. ``plan_pipeline`` is pure: it checks the steps against the
signatures of the models they name (every mapped tensor exists, datatypes and shapes agree,
no tensor is made twice, no cycle) and orders them into a graph, naming the step and the
tensor of every error. ``Pipeline`` runs a plan: each step is an ordinary request to its
model, routed at each request (``ModelManager.get``) and queued on that model's own
scheduler (``ModelVersion.infer``), so a step's requests merge into batches with direct
requests to the same model and run on that model's executor; a step starts as soon as the
tensors it reads exist, so independent steps run at the same time; the first step that
fails fails the request with the step named and cancels the others (a queued step request
whose caller went away is dropped by its scheduler); a cancelled request cancels its steps.

A step whose model is unloaded makes the pipeline unready (as Triton's ensemble becomes
unavailable); a step model swapped to a version with the same tensors is used at once; one
whose tensors changed is refused per request until the pipeline is loaded again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from edged.core.errors import (
    EdgedError,
    ExecutorError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    UnavailableError,
)
from edged.core.types import Array, InferRequest, InferResponse, Signature, TensorSpec
from edged.core.views import PipelineStepView
from edged.serving.model import ModelVersion
from edged.serving.repository import ModelSpec, PipelineStep, TensorDecl
from edged.serving.scheduler import Execution
from edged.serving.stats import ModelStats
from edged.serving.validate import request_options, validate_request

__all__ = ["PIPELINE_VERSION", "Pipeline", "PipelinePlan", "StepPlan", "plan_pipeline"]

log = structlog.get_logger("edged.serving")

#: a pipeline has no version folders: it serves as version 1 (Triton's ensembles have one
#: empty version folder)
PIPELINE_VERSION = 1
#: the platform Triton reports for an ensemble
PIPELINE_PLATFORM = "ensemble"
#: what metadata and config report as a pipeline's executor (its steps run on theirs)
PIPELINE_EXECUTOR = "pipeline"
#: the scheduling parameters a step inherits from the pipeline's request
_STEP_PARAMETERS = ("priority", "timeout")

#: routes (model, version: "" for the highest served) to a live version
Route = Callable[[str, str], ModelVersion]


@dataclass(frozen=True)
class StepPlan:
    """One step, checked: what it reads and makes, and the steps it waits for."""

    step: PipelineStep
    signature: Signature
    """The step model's signature the plan was checked against."""
    needs: frozenset[str]
    """Names of the steps that make the tensors it reads."""


@dataclass(frozen=True)
class PipelinePlan:
    """A pipeline's steps in an order their tensors allow, and what it takes and returns."""

    signature: Signature
    steps: tuple[StepPlan, ...]
    outputs: tuple[tuple[str, str], ...]
    """(pipeline output, the tensor that holds it) in the declared order."""


def _shapes_fit(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def plan_pipeline(spec: ModelSpec, signatures: Mapping[str, Signature]) -> PipelinePlan:
    """Check ``spec``'s pipeline against ``signatures`` (step name -> its model's signature)
    and order the steps. Pure.

    Raises:
        ModelLoadError: naming the step and the tensor: a mapping to a tensor the model
            lacks or that no input or step makes, a model input left unmapped, a tensor made
            twice, a datatype or shape that does not fit, a cycle, an output nothing makes.
    """
    assert spec.pipeline is not None
    where = f"pipeline '{spec.name}'"
    mbs = spec.max_batch_size or 0
    inputs = tuple(
        TensorSpec(d.name, d.datatype, ((-1,) if mbs else ()) + d.dims)
        for d in spec.inputs
        if d.datatype is not None and d.dims is not None
    )
    made = _made(where, spec.pipeline.steps, inputs, signatures)
    needs = {
        step.name: _needs(where, step, signatures[step.name], made, mbs)
        for step in spec.pipeline.steps
    }
    order = _order(where, spec.pipeline.steps, needs, made)
    outputs = tuple(_output(where, decl, made, mbs) for decl in spec.outputs)
    plans = {s.name: StepPlan(s, signatures[s.name], needs[s.name]) for s in spec.pipeline.steps}
    return PipelinePlan(
        Signature(inputs, outputs, mbs),
        tuple(plans[n] for n in order),
        tuple((t.name, t.name) for t in outputs),
    )


#: tensor -> (the step that makes it, "" for the pipeline's inputs; its spec)
_Made = dict[str, tuple[str, TensorSpec]]


def _made(
    where: str,
    steps: tuple[PipelineStep, ...],
    inputs: tuple[TensorSpec, ...],
    signatures: Mapping[str, Signature],
) -> _Made:
    """Every tensor of the pipeline: its inputs, then each step's mapped outputs."""
    made: _Made = {t.name: ("", t) for t in inputs}
    for step in steps:
        sig = signatures[step.name]
        for output, tensor in step.output_map:
            out = sig.output(output)
            if out is None:
                raise ModelLoadError(
                    f"{where} step '{step.name}': model '{step.model}' has no output "
                    f"'{output}' (it returns: {', '.join(t.name for t in sig.outputs)})"
                )
            if tensor in made:
                maker = made[tensor][0]
                by = f"step '{maker}'" if maker else "the pipeline's inputs"
                raise ModelLoadError(
                    f"{where} step '{step.name}': tensor '{tensor}' (output_map of "
                    f"'{output}') is already made by {by}"
                )
            made[tensor] = (step.name, TensorSpec(tensor, out.datatype, out.shape))
    return made


def _needs(where: str, step: PipelineStep, sig: Signature, made: _Made, mbs: int) -> frozenset[str]:
    """The steps ``step`` waits for, once every input of its model is checked against the
    tensor mapped to it."""
    where = f"{where} step '{step.name}'"
    if mbs and sig.max_batch_size and mbs > sig.max_batch_size:
        raise ModelLoadError(
            f"{where}: the pipeline's max_batch_size {mbs} is above model "
            f"'{step.model}''s {sig.max_batch_size}"
        )
    mapped = dict(step.input_map)
    for name in mapped:
        if sig.input(name) is None:
            raise ModelLoadError(
                f"{where}: model '{step.model}' has no input '{name}' (it takes: "
                f"{', '.join(t.name for t in sig.inputs)})"
            )
    waits: set[str] = set()
    for model_input in sig.inputs:
        name, tensor = model_input.name, mapped.get(model_input.name)
        if tensor is None:
            raise ModelLoadError(
                f"{where}: input '{name}' of model '{step.model}' is not in its input_map"
            )
        if tensor not in made:
            raise ModelLoadError(
                f"{where}: input '{name}' maps to tensor '{tensor}', which is neither a "
                "pipeline input nor a step's output"
            )
        maker, have = made[tensor]
        if have.datatype is not model_input.datatype:
            raise ModelLoadError(
                f"{where}: input '{name}' is {model_input.datatype} but tensor '{tensor}' "
                f"is {have.datatype}"
            )
        if not _shapes_fit(have.shape, model_input.shape):
            raise ModelLoadError(
                f"{where}: input '{name}' has shape {list(model_input.shape)} but tensor "
                f"'{tensor}' has {list(have.shape)} (-1: any size)"
            )
        if maker:
            waits.add(maker)
    return frozenset(waits)


def _output(where: str, decl: TensorDecl, made: _Made, mbs: int) -> TensorSpec:
    """A declared output, checked against the step output that makes it."""
    if decl.name not in made or not made[decl.name][0]:
        raise ModelLoadError(
            f"{where}: output '{decl.name}' is no step's output (name a tensor of a step's "
            "output_map)"
        )
    maker, have = made[decl.name]
    if decl.datatype is not None and decl.datatype is not have.datatype:
        raise ModelLoadError(
            f"{where}: output '{decl.name}' is declared {decl.datatype} but step '{maker}' "
            f"makes {have.datatype}"
        )
    if decl.dims is None:
        return have
    declared = ((-1,) if mbs else ()) + decl.dims
    if not _shapes_fit(declared, have.shape):
        raise ModelLoadError(
            f"{where}: output '{decl.name}' is declared with dims {list(decl.dims)} but step "
            f"'{maker}' makes shape {list(have.shape)}"
        )
    return TensorSpec(decl.name, have.datatype, declared)


def _order(
    where: str,
    steps: tuple[PipelineStep, ...],
    needs: Mapping[str, frozenset[str]],
    made: Mapping[str, tuple[str, TensorSpec]],
) -> list[str]:
    """The steps in an order where each comes after those it needs (Kahn's algorithm).

    Raises:
        ModelLoadError: a cycle, naming a step in it and the tensor it waits for.
    """
    order: list[str] = []
    left = [s.name for s in steps]
    while left:
        ready = [n for n in left if needs[n] <= set(order)]
        if not ready:
            stuck = next(s for s in steps if s.name in left)
            tensor = next(t for _, t in stuck.input_map if made[t][0] and made[t][0] not in order)
            raise ModelLoadError(
                f"{where} step '{stuck.name}': a cycle: it reads tensor '{tensor}', made by "
                f"step '{made[tensor][0]}', which (through its own inputs) waits for "
                f"'{stuck.name}' (steps in the cycle: {', '.join(left)})"
            )
        order += ready
        left = [n for n in left if n not in ready]
    return order


def step_views(spec: ModelSpec) -> tuple[PipelineStepView, ...]:
    """The steps as ModelConfig's ensemble_scheduling shows them."""
    assert spec.pipeline is not None
    return tuple(
        PipelineStepView(s.name, s.model, s.version or -1, s.input_map, s.output_map)
        for s in spec.pipeline.steps
    )


@dataclass
class _Run:
    """One request's tensors and the steps started and not finished."""

    tensors: dict[str, Array]
    pending: dict[asyncio.Task[dict[str, Array]], StepPlan] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)


def _retrieve(task: asyncio.Task[dict[str, Array]]) -> None:
    # a step cancelled after another failed may still end in an error: nobody awaits it
    if not task.cancelled():
        task.exception()


class Pipeline:
    """A served pipeline: runs its plan's steps as requests to their models."""

    def __init__(self, spec: ModelSpec, plan: PipelinePlan, route: Route) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = PIPELINE_VERSION
        self.plan = plan
        self.signature = plan.signature
        self.stats = ModelStats()
        self.in_flight = 0
        """Requests running (on the event loop)."""
        self._route = route
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def models(self) -> frozenset[str]:
        """The models its steps run."""
        return frozenset(s.step.model for s in self.plan.steps)

    def unready(self) -> str:
        """Why a request would fail now ("" when every step's model serves the tensors the
        plan was checked against)."""
        for sp in self.plan.steps:
            try:
                self._step_version(sp)
            except EdgedError as e:
                return f"step '{sp.step.name}': {e}"
        return ""

    def _step_version(self, sp: StepPlan) -> ModelVersion:
        step = sp.step
        mv = self._route(step.model, str(step.version or ""))
        if mv.signature != sp.signature:
            raise ModelNotReadyError(
                f"model '{step.model}' version {mv.version} takes or returns other tensors "
                "than when the pipeline was loaded; load the pipeline again"
            )
        return mv

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run every step; answer with the declared outputs (those requested).

        Raises:
            InvalidInputError: the request does not fit the pipeline's inputs.
            EdgedError: the first step that failed, of the type it failed with (a step
                whose model is missing: ModelNotReadyError), its message naming the step.
        """
        start = time.monotonic_ns()
        self.in_flight += 1
        self._idle.clear()
        try:
            size = validate_request(request, self.signature)
            request_options(request.parameters)
            tensors = await self._run(request)
        except EdgedError as e:
            self.stats.record_failure(time.monotonic_ns() - start, type(e))
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
        total = time.monotonic_ns() - start
        self.stats.record_execution(Execution(size, start, 0, total, 0))
        self.stats.record_success(total, 0, 0, total, 0)
        wanted = request.requested_outputs or tuple(t.name for t in self.signature.outputs)
        return InferResponse(
            self.name, str(self.version), {n: tensors[n] for n in wanted}, request.id
        )

    async def _run(self, request: InferRequest) -> dict[str, Array]:
        run = _Run(dict(request.inputs))
        params = {k: request.parameters[k] for k in _STEP_PARAMETERS if k in request.parameters}
        left = list(self.plan.steps)
        try:
            while left or run.pending:
                for sp in [s for s in left if s.needs <= run.done]:
                    left.remove(sp)
                    task = asyncio.ensure_future(self._step(sp, run.tensors, request, params))
                    run.pending[task] = sp
                finished, _ = await asyncio.wait(
                    set(run.pending), return_when=asyncio.FIRST_COMPLETED
                )
                for task in finished:
                    sp = run.pending.pop(task)
                    outputs = task.result()  # the step's error, named, fails the request
                    for output, tensor in sp.step.output_map:
                        run.tensors[tensor] = outputs[output]
                    run.done.add(sp.step.name)
        except asyncio.CancelledError:
            log.info(
                "pipeline_cancelled",
                model=self.name,
                request_id=request.id,
                cancelled_steps=sorted(sp.step.name for sp in run.pending.values()),
            )
            raise
        finally:
            for task in run.pending:
                task.cancel()
                task.add_done_callback(_retrieve)
        return run.tensors

    async def _step(
        self,
        sp: StepPlan,
        tensors: Mapping[str, Array],
        request: InferRequest,
        params: Mapping[str, object],
    ) -> dict[str, Array]:
        step = sp.step
        try:
            mv = self._step_version(sp)
            response = await mv.infer(
                InferRequest(
                    step.model,
                    {name: tensors[tensor] for name, tensor in step.input_map},
                    str(step.version or ""),
                    request.id,
                    tuple(output for output, _ in step.output_map),
                    params,
                )
            )
        except EdgedError as e:
            kind = ModelNotReadyError if isinstance(e, ModelNotFoundError) else type(e)
            raise kind(
                f"pipeline '{self.name}' step '{step.name}' (model '{step.model}'): {e}"
            ) from e
        return response.outputs

    def submit(
        self,
        request: InferRequest,
        reply: Callable[[InferResponse | EdgedError], None],
    ) -> Callable[[], bool]:
        """``infer`` for a caller on another thread (the ZeroMQ I/O thread, gRPC's handler
        threads): runs on the event loop; ``reply`` is called once, on the loop's thread.
        Returns ``withdraw`` (``DataPlane.submit``'s contract): called when the caller went
        away, it cancels the request's steps if it has not finished (True; ``reply`` is then
        never called)."""
        withdrawn = False

        def done(future: concurrent.futures.Future[InferResponse]) -> None:
            if future.cancelled():
                if withdrawn:
                    return
                reply(UnavailableError(f"pipeline '{self.name}': the request was cancelled"))
                return
            error = future.exception()
            if error is None:
                reply(future.result())
            elif isinstance(error, EdgedError):
                reply(error)
            else:  # pragma: no cover - a bug: logged, answered as an internal failure
                log.error("pipeline_failed", model=self.name, error=repr(error))
                reply(ExecutorError(f"pipeline '{self.name}' failed: {error!r}"))

        running = asyncio.run_coroutine_threadsafe(self.infer(request), self._loop)
        running.add_done_callback(done)

        def withdraw() -> bool:
            nonlocal withdrawn
            withdrawn = True
            if running.cancel():
                return True
            withdrawn = False  # it finished first: ``reply`` was (or is being) called
            return False

        return withdraw

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request runs here; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def pipeline_toml_text(spec: ModelSpec, signature: Signature) -> str:
    """The completed model.toml of a served pipeline (ModelConfig's ``model_toml``)."""
    assert spec.pipeline is not None

    def q(value: str) -> str:
        return json.dumps(value, ensure_ascii=True)  # valid TOML basic-string escapes

    lines = ["# completed by edged (a pipeline)", f"name = {q(spec.name)}"]
    lines.append(f"max_batch_size = {signature.max_batch_size}")
    for key, tensors in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        for t in tensors:
            dims = ", ".join(str(d) for d in signature.config_dims(t))
            lines += ["", f"[[{key}]]", f"name = {q(t.name)}"]
            lines += [f"datatype = {q(t.datatype.value)}", f"dims = [{dims}]"]
    for step in spec.pipeline.steps:
        lines += ["", "[[pipeline.step]]", f"name = {q(step.name)}", f"model = {q(step.model)}"]
        if step.version is not None:
            lines.append(f"version = {step.version}")
        for key, pairs in (("input_map", step.input_map), ("output_map", step.output_map)):
            body = ", ".join(f"{q(a)} = {q(b)}" for a, b in pairs)
            lines.append(f"{key} = {{ {body} }}")
    return "\n".join(lines) + "\n"
