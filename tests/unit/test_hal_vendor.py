"""A vendor's executor kind, registered through the ``edged.executors`` entry points: how
``hal.probe()`` asks it whether its device is present (``Executor.probe()``), and what it
reports when the vendor's code is broken. The entry points are real
``importlib.metadata.EntryPoint`` objects naming classes in this module."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint
from typing import ClassVar

import pytest

from edged.core.types import Array
from hal import registry
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.probe import KINDS, installed_probes, probe, probe_entry_point
from hal.report import DeviceReport


class _Unused(Executor):
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        raise NotImplementedError


class Silent(_Unused):
    """Declares no probe(): the contract's default."""

    kind: ClassVar[str] = "npu"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx", "tflite"})


class Unplugged(_Unused):
    kind: ClassVar[str] = "usb-npu"

    @classmethod
    def probe(cls) -> DeviceReport:
        return DeviceReport(cls.kind, False, reason="no USB NPU attached", formats=("onnx",))


class Misnamed(_Unused):
    kind: ClassVar[str] = "internal-name"

    @classmethod
    def probe(cls) -> DeviceReport:
        return DeviceReport("internal-name", True, formats=("onnx",))


class Confused(_Unused):
    kind: ClassVar[str] = "confused"

    @classmethod
    def probe(cls) -> DeviceReport:
        return "yes"  # type: ignore[return-value]


class Crashing(_Unused):
    kind: ClassVar[str] = "crashing"

    @classmethod
    def probe(cls) -> DeviceReport:
        raise OSError("/dev/npu0: permission denied")


class NotAnExecutor:
    def infer(self, inputs: Mapping[str, Array]) -> None: ...


VENDOR = {
    "npu": "Silent",
    "usb-npu": "Unplugged",
    "renamed": "Misnamed",
    "confused": "Confused",
    "crashing": "Crashing",
    "bogus": "NotAnExecutor",
}


@pytest.fixture
def vendor_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in entry points plus the vendor kinds above, and one whose module is gone."""
    found = dict(registry._entry_points())
    for kind, name in VENDOR.items():
        found[kind] = EntryPoint(kind, f"{__name__}:{name}", registry.ENTRY_POINT_GROUP)
    found["gone"] = EntryPoint("gone", "vendor_npu_sdk:Executor", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: found)


def test_the_default_probe_reports_the_kind_present_with_its_formats() -> None:
    report = Silent.probe()
    assert report.present
    assert report.kind == "npu"
    assert report.formats == ("onnx", "tflite")
    assert report.reason == ""


@pytest.mark.usefixtures("vendor_kinds")
def test_probe_asks_every_registered_kind_after_the_built_in_ones() -> None:
    reports = probe()
    kinds = [r.kind for r in reports]
    assert kinds[: len(KINDS)] == list(KINDS)
    assert sorted(kinds[len(KINDS) :]) == sorted([*VENDOR, "gone"])
    by_kind = {r.kind: r for r in reports}
    assert by_kind["npu"].present
    assert by_kind["npu"].formats == ("onnx", "tflite")
    assert not by_kind["usb-npu"].present
    assert by_kind["usb-npu"].reason == "no USB NPU attached"
    assert by_kind["renamed"].present  # named by its entry point, as model.toml names it
    assert by_kind["confused"].reason == "Confused.probe() returned str, not a DeviceReport"
    assert by_kind["crashing"].reason == ("probe failed: OSError: /dev/npu0: permission denied")
    assert by_kind["bogus"].reason == "executor 'bogus' entry point is not an Executor subclass"
    assert by_kind["gone"].reason.startswith("executor 'gone' failed to import: ")
    for r in reports:
        assert r.present == (r.reason == ""), r


@pytest.mark.usefixtures("vendor_kinds")
def test_built_in_kinds_keep_their_own_checks() -> None:
    probes = installed_probes()
    assert list(probes)[: len(KINDS)] == list(KINDS)
    assert probe_entry_point("npu", None).kind == "npu"  # type: ignore[arg-type]
