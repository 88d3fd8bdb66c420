"""The swap primitive in process (edged.serving.swap): real versions of models/simple_static
loaded on ONNX Runtime beside the served one, real schedulers, no daemon.

simple_static's versions 1 and 2 differ in OUTPUT1, so every answer says which version
computed it. Each test drives ``Swapper.swap`` through its public seam (a planner, a gate, a
persist step) and checks what serves, what answered and what was closed; none times anything.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import EdgedError, ModelLoadError, UnavailableError
from edged.core.types import InferRequest
from edged.core.views import VersionState
from edged.serving.manager import ModelManager
from edged.serving.model import ModelVersion
from edged.serving.repository import ModelSpec, read_model_spec
from edged.serving.swap import (
    Gate,
    Load,
    Plan,
    Planner,
    ServedModel,
    Swapper,
    Unchanged,
    VersionLoader,
)
from edged.serving.versions import read_active
from tests.daemon_process import EXAMPLE_MODELS

ONES = np.ones((2, 3), np.int32)


def _request(version: str = "") -> InferRequest:
    return InferRequest("simple_static", {"INPUT0": ONES, "INPUT1": ONES}, model_version=version)


async def _output1(mv: ModelVersion) -> list[list[int]]:
    result: list[list[int]] = (await mv.infer(_request())).outputs["OUTPUT1"].tolist()
    return result


@dataclass
class Rig:
    repo: Path
    spec: ModelSpec
    swapper: Swapper
    loader: VersionLoader = field(default_factory=lambda: VersionLoader(default_instances=1))
    model: ServedModel = field(default_factory=lambda: ServedModel("simple_static"))
    notified: list[str] = field(default_factory=list)
    v1_answer: list[list[int]] = field(default_factory=list)
    """OUTPUT1 of version 1 for ``_request()``."""

    def load(self, version: int) -> Load:
        return functools.partial(self.loader, self.spec, version, ["cpu-onnx"])

    def plan(self, *versions: int, **keys: object) -> Planner:
        """A planner that serves ``versions``, each loaded fresh."""

        async def planner(current: ServedModel) -> Plan:
            return Plan(
                load={v: self.load(v) for v in versions},
                serve=frozenset(versions),
                spec=self.spec,
                **keys,  # type: ignore[arg-type]
            )

        return planner

    def served(self) -> ModelVersion:
        return self.model.serving[max(self.model.serving)]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    shutil.copytree(EXAMPLE_MODELS / "simple_static", tmp_path / "simple_static")
    spec = read_model_spec(tmp_path / "simple_static")
    notified: list[str] = []
    rig = Rig(tmp_path, spec, Swapper(notified.append), notified=notified)
    await rig.swapper.swap(rig.model, rig.plan(1))
    rig.v1_answer = await _output1(rig.served())
    yield rig
    await rig.swapper.swap(rig.model, _nothing)


async def _nothing(current: ServedModel) -> Plan:
    return Plan(serve=frozenset())


async def test_the_new_version_loads_beside_and_takes_over_at_the_switch(rig: Rig) -> None:
    old = rig.served()
    seen: list[tuple[dict[int, ModelVersion], list[list[int]]]] = []

    async def gate(candidate: ModelVersion, /) -> None:
        # loaded and warmed, answering, but serving nobody yet
        seen.append((dict(rig.model.serving), await _output1(candidate)))

    swapped = await rig.swapper.swap(rig.model, rig.plan(2), gate)
    assert swapped is not None
    assert seen[0][0] == {1: old}
    assert seen[0][1] != rig.v1_answer
    assert list(rig.model.serving) == [2]
    assert rig.model.serving[2] is swapped.fresh[2]
    assert list(swapped.retired) == [old]
    assert rig.model.states[2] == (VersionState.READY, "")
    assert rig.model.states[1] == (VersionState.UNAVAILABLE, "unloaded")
    assert await _output1(rig.served()) == seen[0][1]
    with pytest.raises(UnavailableError):  # the old copy was closed
        await old.infer(_request())
    assert rig.notified.count("simple_static") >= 2


async def test_a_gate_refusal_keeps_the_old_version_serving(rig: Rig) -> None:
    old = rig.served()
    candidates: list[ModelVersion] = []

    async def refuse(candidate: ModelVersion, /) -> None:
        candidates.append(candidate)
        raise ModelLoadError("self-test failed: OUTPUT1 differs")

    persisted: list[bool] = []
    with pytest.raises(ModelLoadError, match="self-test failed"):
        await rig.swapper.swap(
            rig.model, rig.plan(2, persist=lambda: persisted.append(True)), refuse
        )
    assert rig.model.serving == {1: old}
    assert await _output1(old) == rig.v1_answer
    assert persisted == []  # nothing made durable
    assert rig.model.states[2][0] is VersionState.UNAVAILABLE
    assert "self-test failed" in rig.model.states[2][1]
    with pytest.raises(UnavailableError):  # the refused copy was closed
        await candidates[0].infer(_request())


async def test_an_error_while_loading_beside_leaves_the_served_version_untouched(
    rig: Rig,
) -> None:
    old = rig.served()
    broken = rig.repo / "simple_static" / "3"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    gated: list[int] = []

    async def gate(candidate: ModelVersion, /) -> None:
        gated.append(candidate.version)

    with pytest.raises(ModelLoadError, match="version 3"):
        await rig.swapper.swap(rig.model, rig.plan(2, 3), gate)
    assert gated == [2]  # 2 loaded and passed; 3 failed: 2 is closed again, nothing switched
    assert rig.model.serving == {1: old}
    assert await _output1(old) == rig.v1_answer
    assert rig.model.states[3][0] is VersionState.UNAVAILABLE


async def test_persist_runs_after_the_gate_and_a_failure_there_switches_nothing(
    rig: Rig,
) -> None:
    old = rig.served()
    order: list[str] = []

    async def gate(candidate: ModelVersion, /) -> None:
        order.append("gate")

    def persist() -> None:
        order.append(f"persist while serving {sorted(rig.model.serving)}")
        raise ModelLoadError("cannot write ACTIVE: disk full")

    with pytest.raises(ModelLoadError, match="disk full"):
        await rig.swapper.swap(rig.model, rig.plan(2, persist=persist), gate)
    assert order == ["gate", "persist while serving [1]"]
    assert rig.model.serving == {1: old}


async def test_drain_waits_for_requests_in_flight_on_the_old_version(rig: Rig) -> None:
    old = rig.served()
    old.scheduler.pause()  # the request below stays in flight on version 1
    request = asyncio.ensure_future(old.infer(_request()))
    for _ in range(100):
        if old.in_flight:
            break
        await asyncio.sleep(0)
    assert old.in_flight == 1
    await rig.swapper.swap(rig.model, rig.plan(2))
    # closing before the drain would have failed it with UnavailableError ("unloading")
    assert request.done()
    response = request.result()
    assert response.model_version == "1"
    assert response.outputs["OUTPUT1"].tolist() == rig.v1_answer
    assert old.in_flight == 0


async def test_concurrent_swaps_of_one_model_are_serialized(rig: Rig) -> None:
    events: list[str] = []
    release = asyncio.Event()

    def planner(name: str, version: int) -> Planner:
        inner = rig.plan(version, switched=lambda fresh: events.append(f"{name} switched"))

        async def plan(current: ServedModel) -> Plan | None:
            events.append(f"{name} planned, serving {sorted(current.serving)}")
            return await inner(current)

        return plan

    async def held(candidate: ModelVersion, /) -> None:
        events.append("first gated")
        await release.wait()

    first = asyncio.ensure_future(rig.swapper.swap(rig.model, planner("first", 2), held))
    second = asyncio.ensure_future(rig.swapper.swap(rig.model, planner("second", 1)))
    for _ in range(2000):
        if "first gated" in events:
            break
        await asyncio.sleep(0.005)
    for _ in range(50):
        await asyncio.sleep(0)
    assert events == ["first planned, serving [1]", "first gated"]  # second waits its turn
    release.set()
    await asyncio.gather(first, second)
    assert events == [
        "first planned, serving [1]",
        "first gated",
        "first switched",
        "second planned, serving [2]",
        "second switched",
    ]
    assert list(rig.model.serving) == [1]


async def test_a_move_hands_queued_requests_over_to_the_new_copy(rig: Rig) -> None:
    old = rig.served()
    old.scheduler.pause()  # a failover pauses the failing copy: requests queue there
    request = asyncio.ensure_future(old.infer(_request()))
    for _ in range(100):
        if old.scheduler.queue_depth:
            break
        await asyncio.sleep(0)

    async def move(current: ServedModel) -> Plan | None:
        if current.serving.get(1) is not old:
            return None
        return Plan(load={1: rig.load(1)}, hand_over=True)

    swapped = await rig.swapper.swap(rig.model, move)
    assert swapped is not None
    assert swapped.handed_over == 1
    assert rig.model.serving == {1: swapped.fresh[1]}
    assert (await request).model_version == "1"
    # the same plan again is stale: the copy it meant to move no longer serves
    assert await rig.swapper.swap(rig.model, move) is None
    assert rig.model.serving == {1: swapped.fresh[1]}


async def test_a_gate_may_keep_what_serves_without_an_error(rig: Rig) -> None:
    old = rig.served()
    candidates: list[ModelVersion] = []

    async def same(candidate: ModelVersion, /) -> None:
        candidates.append(candidate)
        raise Unchanged

    assert await rig.swapper.swap(rig.model, rig.plan(2), same) is None
    assert rig.model.serving == {1: old}
    with pytest.raises(UnavailableError):
        await candidates[0].infer(_request())


# -- through the manager: ModelManager.serve, OTA's explicit switch ---------------------------


def _check_gate(gate: Gate) -> Gate:
    return gate  # mypy: a plain async function is a Gate


async def test_serve_writes_active_only_once_the_gate_passed(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_MODELS / "simple_static", tmp_path / "simple_static")
    model_dir = tmp_path / "simple_static"
    (model_dir / "ACTIVE").write_text("1\n")
    manager = ModelManager(tmp_path, devices=None)
    try:
        await manager.load("simple_static")
        active_during_gate: list[list[int] | None] = []

        async def refuse(candidate: ModelVersion, /) -> None:
            active_during_gate.append(read_active(model_dir))
            raise ModelLoadError("self-test failed")

        with pytest.raises(ModelLoadError, match="self-test failed"):
            await manager.serve("simple_static", [2], gate=_check_gate(refuse))
        assert read_active(model_dir) == [1]
        assert (await manager.infer(_request())).model_version == "1"

        async def accept(candidate: ModelVersion, /) -> None:
            active_during_gate.append(read_active(model_dir))

        await manager.serve("simple_static", [2], gate=accept)
        assert active_during_gate == [[1], [1]]  # the gate always saw the old ACTIVE
        assert read_active(model_dir) == [2]
        assert (await manager.infer(_request())).model_version == "2"

        await manager.serve("simple_static", None)  # no pin: the policy (latest 1) decides
        assert read_active(model_dir) is None
        assert (await manager.infer(_request())).model_version == "2"

        with pytest.raises(ModelLoadError, match="version 7 has no folder"):
            await manager.serve("simple_static", [7])
        assert read_active(model_dir) is None
    finally:
        await manager.unload_all()


async def test_unload_goes_through_the_swap(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE_MODELS / "simple_static", tmp_path / "simple_static")
    manager = ModelManager(tmp_path, devices=None)
    heard: list[tuple[str, bool]] = []
    manager.on_change(lambda name, ready: heard.append((name, ready)))
    await manager.load("simple_static")
    served = manager.get("simple_static")
    await manager.unload("simple_static")
    assert not manager.is_ready("simple_static")
    assert heard[-1] == ("simple_static", False)
    with pytest.raises(EdgedError):
        await served.infer(_request())
    assert manager.wanted() == []


# -- the one place ----------------------------------------------------------------------------


def test_only_the_swap_assigns_what_is_served() -> None:
    """What is served changes in one place: nothing but edged/serving/swap.py assigns a
    ``.serving`` attribute, and nothing but edged/serving/versions.py names ACTIVE or the
    staging folder (OTA and learn go through them)."""
    root = Path(__file__).resolve().parents[2]
    assigners, namers = set(), set()
    for path in sorted((root / "edged").rglob("*.py")):
        if "_proto" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        relative = str(path.relative_to(root))
        for node in ast.walk(tree):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign | ast.AugAssign)
                else []
            )
            if any(isinstance(t, ast.Attribute) and t.attr == "serving" for t in targets):
                assigners.add(relative)
            if isinstance(node, ast.Constant) and node.value in ("ACTIVE", ".ota-staging"):
                namers.add(relative)
    assert assigners == {"edged/serving/swap.py"}
    assert namers == {"edged/serving/versions.py"}
