"""Pipelines: a model.toml ``[pipeline]`` whose steps are other models of the repository
(Triton's ensembles). See docs/pipelines.md.

Two halves, as the batcher has. ``plan_pipeline`` is pure: it checks the steps against the
signatures of the models they name (every mapped tensor exists, datatypes and shapes agree,
no tensor is made twice, no cycle) and orders them into a graph, naming the step and the
tensor of every error. ``Pipeline`` runs a plan: each step is an ordinary request to its
model, routed at each request (``ModelManager.get``) and queued on that model's own
scheduler (``ModelVersion.submit``), so a step's requests merge into batches with direct
requests to the same model and run on that model's executor. A step is posted as soon as
the tensors it reads exist, from the reply of the step that made the last of them, on the
thread that answered it (``inline``: a step whose model is idle runs right there), so a
request takes no event loop hop between steps; independent steps run at the same time (all
but one go to their models' workers). The first step that fails fails the request with the
step named and withdraws the queued others (``Scheduler.withdraw``); a caller that goes away
withdraws them all.

A step whose model is unloaded makes the pipeline unready (as Triton's ensemble becomes
unavailable); a step model swapped to a version with the same tensors is used at once; one
whose tensors changed is refused per request until the pipeline is loaded again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from edged.core.errors import (
    EdgedError,
    ExecutorError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from edged.core.types import Array, InferRequest, InferResponse, Signature, TensorSpec
from edged.core.views import PipelineStepView
from edged.serving.model import ModelVersion
from edged.serving.repository import ModelSpec, PipelineStep, TensorDecl
from edged.serving.scheduler import Execution, settle
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


class _Chain:
    """One request running: the tensors made so far and its steps, guarded by ``lock``
    (step replies come on whichever thread answered them)."""

    __slots__ = (
        "done",
        "finished",
        "left",
        "lock",
        "params",
        "reply",
        "request",
        "running",
        "size",
        "start",
        "tensors",
    )

    def __init__(
        self,
        request: InferRequest,
        size: int,
        start: int,
        steps: tuple[StepPlan, ...],
        reply: Callable[[InferResponse | EdgedError], None],
    ) -> None:
        self.lock = threading.Lock()
        self.request = request
        self.size = size
        self.start = start
        self.reply = reply
        self.params = {
            k: request.parameters[k] for k in _STEP_PARAMETERS if k in request.parameters
        }
        self.tensors: dict[str, Array] = dict(request.inputs)
        self.left = list(steps)
        """Steps not posted yet."""
        self.running: dict[str, Callable[[], bool] | None] = {}
        """Steps posted and not answered: their ``withdraw`` (None while being posted)."""
        self.done: set[str] = set()
        self.finished = False
        """Answered, failed or withdrawn: later step replies are dropped."""


def _answered_already() -> bool:
    """``withdraw`` of a request answered before ``submit`` returned."""
    return False


class Pipeline:
    """A served pipeline: runs its plan's steps as requests to their models, each step
    posted from the previous one's reply on the thread that answered it."""

    def __init__(self, spec: ModelSpec, plan: PipelinePlan, route: Route) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = PIPELINE_VERSION
        self.plan = plan
        self.signature = plan.signature
        self.stats = ModelStats()
        self.in_flight = 0
        """Requests running (any thread: under ``_counting``)."""
        self._route = route
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._counting = threading.Lock()
        self._drained: list[asyncio.Future[None]] = []

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

    # -- counting requests in and out (any thread) ------------------------------------------

    def _enter(self) -> None:
        with self._counting:
            self.in_flight += 1

    def _leave(self) -> None:
        with self._counting:
            self.in_flight -= 1
            if self.in_flight or not self._drained:
                return
            waiters, self._drained = self._drained, []
        for future in waiters:
            self._loop.call_soon_threadsafe(_wake, future)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request runs here; False if ``timeout_s`` passed first."""
        with self._counting:
            if not self.in_flight:
                return True
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drained.append(future)
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return False
        return True

    # -- the two faces ---------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run every step; answer with the declared outputs (those requested). A cancelled
        caller withdraws the request (``submit``'s ``withdraw``).

        Raises:
            InvalidInputError: the request does not fit the pipeline's inputs.
            EdgedError: the first step that failed, of the type it failed with (a step
                whose model is missing: ModelNotReadyError), its message naming the step.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InferResponse] = loop.create_future()

        def reply(outcome: InferResponse | EdgedError) -> None:
            loop.call_soon_threadsafe(settle, future, outcome)

        withdraw = self.submit(request, reply)
        try:
            return await future
        except asyncio.CancelledError:
            withdraw()
            raise

    def submit(
        self,
        request: InferRequest,
        reply: Callable[[InferResponse | EdgedError], None],
        *,
        inline: bool = False,
    ) -> Callable[[], bool]:
        """``infer`` for a caller on any thread (``DataPlane.submit``'s contract): the first
        steps are posted to their models' schedulers from here (with ``inline``, one may run
        on this thread, see ``Scheduler.post``); each later step is posted from the reply of
        the step it waits for, on the thread that answered it, ``inline`` there (it runs on
        that thread when its model is idle). ``reply`` is called once, on whichever thread
        settled the request. Returns ``withdraw``: called when the caller went away, it
        withdraws the request's queued steps if it has not finished (True; ``reply`` is
        then never called)."""
        start = time.monotonic_ns()
        self._enter()
        try:
            size = validate_request(request, self.signature)
            request_options(request.parameters)
        except EdgedError as e:
            self.stats.record_failure(time.monotonic_ns() - start, type(e))
            self._leave()
            reply(e)
            return _answered_already
        chain = _Chain(request, size, start, self.plan.steps, reply)
        self._advance(chain, inline=inline)
        return functools.partial(self._withdraw, chain)

    # -- running a request -----------------------------------------------------------------

    def _advance(self, chain: _Chain, *, inline: bool) -> None:
        """Post every step whose tensors exist now; answer once every step is done."""
        with chain.lock:
            if chain.finished:
                return
            ready = [sp for sp in chain.left if sp.needs <= chain.done]
            posts = []
            for sp in ready:
                chain.left.remove(sp)
                chain.running[sp.step.name] = None
                step = sp.step
                inputs = {name: chain.tensors[tensor] for name, tensor in step.input_map}
                posts.append((sp, inputs))
            complete = not chain.left and not chain.running
            if complete:
                chain.finished = True
        if complete:
            self._succeed(chain)
            return
        for i, (sp, inputs) in enumerate(posts):
            # independent steps run at once: all but the last go to their models' workers,
            # the last may run here
            self._post(chain, sp, inputs, inline=inline and i == len(posts) - 1)

    def _post(self, chain: _Chain, sp: StepPlan, inputs: dict[str, Array], *, inline: bool) -> None:
        step = sp.step
        try:
            mv = self._step_version(sp)
            if not mv.enter():  # a swap is draining it: the version that replaced it
                mv = self._step_version(sp)
                mv.enter(force=True)
        except EdgedError as e:
            self._stepped(chain, sp, e)
            return
        try:
            withdraw = mv.submit(
                InferRequest(
                    step.model,
                    inputs,
                    str(step.version or ""),
                    chain.request.id,
                    tuple(output for output, _ in step.output_map),
                    chain.params,
                ),
                functools.partial(self._stepped, chain, sp),
                inline=inline,
            )
        except Exception as e:  # pragma: no cover - a bug: the request fails, serving goes on
            log.exception("pipeline_step_failed", model=self.name, step=step.name)
            self._stepped(chain, sp, ExecutorError(f"{e!r}"))
            return
        with chain.lock:
            if step.name not in chain.running:
                return  # answered already
            chain.running[step.name] = withdraw
            if not chain.finished:
                return
        withdraw()  # the request failed or was withdrawn while this step was being posted

    def _stepped(self, chain: _Chain, sp: StepPlan, outcome: InferResponse | EdgedError) -> None:
        """A step's reply (any thread): keep its outputs and post what waited for them, or
        fail the request naming the step."""
        step = sp.step
        with chain.lock:
            chain.running.pop(step.name, None)
            if chain.finished:
                return  # the request failed or was withdrawn meanwhile
            if isinstance(outcome, EdgedError):
                chain.finished = True
                others = [w for w in chain.running.values() if w is not None]
            else:
                for output, tensor in step.output_map:
                    chain.tensors[tensor] = outcome.outputs[output]
                chain.done.add(step.name)
        if not isinstance(outcome, EdgedError):
            # posted from here: inline on a worker thread, never on the event loop
            self._advance(chain, inline=threading.get_ident() != self._loop_thread)
            return
        for withdraw in others:
            withdraw()
        kind = ModelNotReadyError if isinstance(outcome, ModelNotFoundError) else type(outcome)
        error = kind(f"pipeline '{self.name}' step '{step.name}' (model '{step.model}'): {outcome}")
        error.__cause__ = outcome
        self.stats.record_failure(time.monotonic_ns() - chain.start, kind)
        self._leave()
        self._answer(chain, error)

    def _succeed(self, chain: _Chain) -> None:
        request = chain.request
        total = time.monotonic_ns() - chain.start
        self.stats.record_execution(Execution(chain.size, chain.start, 0, total, 0))
        self.stats.record_success(total, 0, 0, total, 0)
        wanted = request.requested_outputs or tuple(t.name for t in self.signature.outputs)
        response = InferResponse(
            self.name, str(self.version), {n: chain.tensors[n] for n in wanted}, request.id
        )
        self._leave()
        self._answer(chain, response)

    def _answer(self, chain: _Chain, outcome: InferResponse | EdgedError) -> None:
        try:
            chain.reply(outcome)
        except Exception:  # the caller's bug must not take a worker thread down
            log.exception("reply_failed", model=self.name)

    def _withdraw(self, chain: _Chain) -> bool:
        """The caller went away: withdraw the steps still queued (a running one finishes,
        its reply dropped). True if the request had not finished."""
        with chain.lock:
            if chain.finished:
                return False
            chain.finished = True
            pending = dict(chain.running)
        log.info(
            "pipeline_cancelled",
            model=self.name,
            request_id=chain.request.id,
            cancelled_steps=sorted(pending),
        )
        for withdraw in pending.values():
            if withdraw is not None:
                withdraw()
        self._leave()
        return True


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
