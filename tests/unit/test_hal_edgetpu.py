"""edgetpu: the real LiteRT ``load_delegate`` against a *simulated* Edge TPU delegate.

libsim_edgetpu_delegate.so (tests/native/sim_edgetpu_delegate.c) implements LiteRT's external
delegate ABI like libedgetpu.so.1: it refuses when the requested device does not exist, and
otherwise attaches a delegate whose Prepare claims no node, so the CPU runs the graph.

A real compiled model's ``edgetpu-custom-op`` node can only run inside libedgetpu, so the
success path uses a model that *declares* the operator (the marker the executor checks for)
without a node using it: it still runs on the CPU through the attached simulated delegate.
A model whose node does use the op is the failure path of a delegate that takes no node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import ModelLoadError
from hal import ExecutorOptions, ModelArtifact, get_executor
from hal.cpu_litert import LiteRtModel
from hal.edgetpu import LIBRARY_ENV, EdgeTpuExecutor, delegate_library, list_edge_tpus
from tests.native import build_shared
from tests.tflitegen import DIGITS_TFLITE, with_custom_op


@pytest.fixture(scope="module")
def sim_delegate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("sim_edgetpu_delegate.c", tmp_path_factory.mktemp("edgetpu"))


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The simulated delegate's call log."""
    log = tmp_path / "delegate.log"
    monkeypatch.setenv("SIM_EDGETPU_LOG", str(log))
    monkeypatch.delenv("SIM_EDGETPU_DEVICES", raising=False)
    monkeypatch.delenv(LIBRARY_ENV, raising=False)
    return log


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def compiled(tmp_path: Path) -> Path:
    """A model carrying the Edge TPU marker that still runs on the CPU (see module doc)."""
    return with_custom_op(DIGITS_TFLITE, tmp_path / "1" / "model_edgetpu.tflite")


def load(path: Path, library: Path | str, device: str = "") -> LiteRtModel:
    model = EdgeTpuExecutor().load(
        ModelArtifact(path, "edgetpu-tflite"),
        ExecutorOptions(device=device, delegate_library=str(library)),
    )
    assert isinstance(model, LiteRtModel)
    return model


def test_registered_under_its_entry_point() -> None:
    assert isinstance(get_executor("edgetpu"), EdgeTpuExecutor)


def test_attaches_and_runs_when_the_device_exists(
    compiled: Path, sim_delegate: Path, calls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_EDGETPU_DEVICES", "usb:0,pci:0")
    model = load(compiled, sim_delegate, device="pci:0")
    assert model.kind == "edgetpu"
    images = np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17
    cpu = get_executor("cpu-litert").load(ModelArtifact(DIGITS_TFLITE, "tflite"), ExecutorOptions())
    want = cpu.infer({"input": images})
    got = model.infer({"input": images})
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    lines = log_lines(calls)
    assert lines[0] == "create pci:0"  # the device option reached the delegate
    assert "prepare pci:0" in lines  # the interpreter applied the delegate to the graph
    model.close()
    cpu.close()
    assert log_lines(calls)[-1] == "destroy pci:0"  # closing released the delegate


def test_first_device_when_none_is_named(
    compiled: Path, sim_delegate: Path, calls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_EDGETPU_DEVICES", "usb:0")
    load(compiled, sim_delegate).close()
    assert log_lines(calls)[:2] == ["create (first)", "prepare usb:0"]


def test_refused_when_there_is_no_device(compiled: Path, sim_delegate: Path, calls: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load(compiled, sim_delegate)
    message = str(err.value)
    assert "could not open an Edge TPU" in message
    assert "simulated Edge TPU: failed to open device '(first)': no such device" in message
    assert "Edge TPUs seen: none (no /dev/apex_*" in message  # this host has none either
    assert log_lines(calls) == ["create (first)"]


def test_refused_when_the_named_device_does_not_exist(
    compiled: Path, sim_delegate: Path, calls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_EDGETPU_DEVICES", "usb:0")
    with pytest.raises(ModelLoadError, match="could not open Edge TPU 'usb:1'"):
        load(compiled, sim_delegate, device="usb:1")


def test_a_delegate_that_takes_no_node_cannot_run_a_compiled_graph(
    tmp_path: Path, sim_delegate: Path, calls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_EDGETPU_DEVICES", "usb:0")
    real = with_custom_op(DIGITS_TFLITE, tmp_path / "model_edgetpu.tflite", used=True)
    with pytest.raises(ModelLoadError, match=r"unresolved custom op: edgetpu-custom-op.*took no"):
        load(real, sim_delegate)
    assert log_lines(calls)[-1] == "destroy usb:0"  # the delegate is released on failure


def test_missing_library(compiled: Path, tmp_path: Path) -> None:
    missing = tmp_path / "libedgetpu.so.1"
    with pytest.raises(ModelLoadError, match=r"cannot load the Edge TPU runtime .*libedgetpu1-std"):
        load(compiled, missing)


def test_a_library_that_is_not_a_delegate(compiled: Path, tmp_path: Path) -> None:
    not_a_delegate = build_shared("sim_libcuda.c", tmp_path)
    with pytest.raises(ModelLoadError, match="is not a LiteRT external delegate"):
        load(compiled, not_a_delegate)


def test_refuses_a_model_not_compiled_for_the_edge_tpu(sim_delegate: Path, calls: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no 'edgetpu-custom-op' operator.*edgetpu_compiler"):
        load(DIGITS_TFLITE, sim_delegate)
    assert log_lines(calls) == []  # refused before any delegate was loaded


def test_library_comes_from_options_then_environment_then_default() -> None:
    assert delegate_library(ExecutorOptions(delegate_library="/opt/a.so"), {LIBRARY_ENV: "b"}) == (
        "/opt/a.so"
    )
    assert delegate_library(ExecutorOptions(), {LIBRARY_ENV: "/opt/b.so"}) == "/opt/b.so"
    assert delegate_library(ExecutorOptions(), {}) == "libedgetpu.so.1"


def test_environment_variable_selects_the_library(
    compiled: Path, sim_delegate: Path, calls: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIBRARY_ENV, str(sim_delegate))
    monkeypatch.setenv("SIM_EDGETPU_DEVICES", "pci:0")
    model = EdgeTpuExecutor().load(ModelArtifact(compiled, "edgetpu-tflite"), ExecutorOptions())
    model.close()
    assert log_lines(calls)[0] == "create (first)"


def test_enumeration_is_reexported() -> None:
    assert list_edge_tpus(Path("/nonexistent/sys"), Path("/nonexistent/dev")) == []
