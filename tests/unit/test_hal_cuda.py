"""cuda: without a GPU the executor refuses to load, with the probe's reason; a session that
fell back to the CPU is refused. (benchmarks/gpu_check.py proves the GPU path on a GPU.)

``FakeSession`` below is a boundary simulation: it stands for the object onnxruntime returns,
exposing only ``get_providers()``, which is all the provider check reads.
"""

from __future__ import annotations

import pytest

from edged.core.errors import ModelLoadError
from hal import ExecutorOptions, ModelArtifact, get_executor
from hal.cuda import (
    CPU,
    CUDA,
    TENSORRT,
    CudaExecutor,
    gpu_providers,
    parse_device,
    require_gpu_provider,
)
from hal.probe import HostPaths, probe_cuda
from hal.report import DeviceReport
from tests.daemon_process import EXAMPLE_MODELS

DIGITS = ModelArtifact(EXAMPLE_MODELS / "digits" / "1" / "model.onnx", "onnx")


class FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers


def test_registered_under_its_entry_point() -> None:
    assert isinstance(get_executor("cuda"), CudaExecutor)


def test_refuses_to_load_on_this_host_with_the_probe_reason() -> None:
    reason = probe_cuda(HostPaths()).reason
    if not reason:
        pytest.skip("this host has a usable GPU; benchmarks/gpu_check.py covers it")
    with pytest.raises(ModelLoadError) as err:
        CudaExecutor().load(DIGITS, ExecutorOptions())
    assert str(err.value) == f"cuda: no usable GPU: {reason}"


def test_refusal_happens_before_anything_is_imported_or_allocated() -> None:
    absent = DeviceReport("cuda", False, reason="cuInit failed with CUDA_ERROR_NO_DEVICE (100)")
    with pytest.raises(ModelLoadError, match=r"no usable GPU: cuInit failed .*\(100\)"):
        CudaExecutor(prober=lambda: absent).load(DIGITS, ExecutorOptions())


def test_the_format_is_checked_first() -> None:
    with pytest.raises(ModelLoadError, match="cannot run format 'tflite'"):
        CudaExecutor().load(ModelArtifact(DIGITS.path, "tflite"), ExecutorOptions())


@pytest.mark.parametrize(
    ("in_use", "expected"),
    [
        ([TENSORRT, CUDA, CPU], TENSORRT),
        ([CUDA, CPU], CUDA),
    ],
)
def test_provider_in_use_is_the_gpu(in_use: list[str], expected: str) -> None:
    assert require_gpu_provider(FakeSession(in_use), [CUDA, CPU]) == expected


def test_silent_cpu_fallback_is_a_load_error() -> None:
    requested = gpu_providers([TENSORRT, CUDA, CPU], 0)
    with pytest.raises(ModelLoadError) as err:
        require_gpu_provider(FakeSession([CPU]), requested)
    message = str(err.value)
    assert "runs this model on CPUExecutionProvider, not the GPU" in message
    assert f"asked for {TENSORRT}, {CUDA}, {CPU}" in message


def test_providers_requested_best_first_for_the_device() -> None:
    providers = gpu_providers(["AzureExecutionProvider", TENSORRT, CUDA, CPU], 1)
    assert [p if isinstance(p, str) else p[0] for p in providers] == [TENSORRT, CUDA, CPU]
    assert providers[0][1]["device_id"] == 1  # type: ignore[index]
    assert providers[1][1]["device_id"] == 1  # type: ignore[index]
    cuda_only = gpu_providers([CUDA, CPU], 0)
    assert [p if isinstance(p, str) else p[0] for p in cuda_only] == [CUDA, CPU]


def test_an_onnxruntime_without_gpu_providers_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="neither TensorrtExecutionProvider nor CUDA"):
        gpu_providers(["AzureExecutionProvider", CPU], 0)


@pytest.mark.parametrize(("text", "ordinal"), [("", 0), ("0", 0), ("3", 3), ("cuda:1", 1)])
def test_device_names(text: str, ordinal: int) -> None:
    assert parse_device(text) == ordinal


@pytest.mark.parametrize("text", ["gpu0", "usb:0", "-1", "cuda:x"])
def test_bad_device_names(text: str) -> None:
    with pytest.raises(ModelLoadError, match="not a CUDA ordinal"):
        parse_device(text)
