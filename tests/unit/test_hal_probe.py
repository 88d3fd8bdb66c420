"""hal.probe: one report per executor kind, a precise reason for each absent one, and no
hang or crash whatever the host has.

The fake /sys and /dev trees built here in tmp_path simulate the hardware boundary (the sysfs
attribute files and device nodes the kernel exposes), and the compiled libsim_libcuda.so
simulates the NVIDIA driver library; the probe code itself runs unmodified.
"""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import hal
from hal.cpu_litert import LiteRtCpuExecutor, choose_runtime
from hal.cpu_onnx import OnnxCpuExecutor
from hal.cuda import CudaExecutor
from hal.edgetpu import EdgeTpuExecutor
from hal.probe import (
    KINDS,
    HostPaths,
    format_table,
    list_edge_tpus,
    probe,
    probe_cuda,
    probe_edgetpu,
    probe_pynq,
    pynq_devices,
)
from hal.report import DeviceReport
from tests.native import build_shared

CPU_ONLY_ORT = "CUDAExecutionProvider" not in ort.get_available_providers()

# `hal.probe` is the function hal exports; the module is reached through the import system.
probe_mod = importlib.import_module("hal.probe")


@pytest.fixture
def bare_host(tmp_path: Path) -> HostPaths:
    """A host with empty /sys, /dev and /proc, no XRT and no driver libraries."""
    for name in ("sys", "dev", "proc"):
        (tmp_path / name).mkdir()
    return HostPaths(
        sysfs=tmp_path / "sys",
        dev=tmp_path / "dev",
        proc=tmp_path / "proc",
        xrt=tmp_path / "opt" / "xilinx" / "xrt",
        cuda_library=str(tmp_path / "no" / "libcuda.so.1"),
        edgetpu_library=str(tmp_path / "no" / "libedgetpu.so.1"),
    )


def usb_device(host: HostPaths, name: str, vendor: str, product: str) -> Path:
    device = host.sysfs / "bus" / "usb" / "devices" / name
    device.mkdir(parents=True)
    (device / "idVendor").write_text(vendor + "\n")
    (device / "idProduct").write_text(product + "\n")
    return device


# -- the whole probe ------------------------------------------------------------------------


def test_probe_reports_every_kind_once_on_this_host() -> None:
    reports = hal.probe()
    assert [r.kind for r in reports] == list(KINDS)
    for r in reports:
        assert r.present == (r.reason == ""), r
        assert r.formats, r
        assert r.dtypes, r
    by_kind = {r.kind: r for r in reports}
    # onnxruntime and LiteRT are dependencies of the test environment: both must be found.
    assert by_kind["cpu-onnx"].present
    assert by_kind["cpu-litert"].present
    assert by_kind["cpu-litert"].details["runtime"].startswith("ai-edge-litert ")


def test_capabilities_match_the_executors() -> None:
    executors = {
        "cpu-onnx": OnnxCpuExecutor,
        "cpu-litert": LiteRtCpuExecutor,
        "cuda": CudaExecutor,
        "edgetpu": EdgeTpuExecutor,
    }
    for kind, cls in executors.items():
        assert cls.kind == kind
        assert frozenset(probe_mod.CAPABILITIES[kind][0]) == cls.formats


def test_a_hanging_probe_times_out_and_the_others_still_report() -> None:
    release = threading.Event()

    def hangs(host: HostPaths) -> DeviceReport:
        release.wait(30)  # a dlopen or cuInit that never returns
        return DeviceReport("stuck", True)

    def fine(host: HostPaths) -> DeviceReport:
        return DeviceReport("fine", True, formats=("onnx",))

    try:
        reports = probe(timeout_s=0.3, probes={"stuck": hangs, "fine": fine})
    finally:
        release.set()
    stuck, ok = reports
    assert not stuck.present
    assert "did not finish within 0.3s" in stuck.reason
    assert ok.present


def test_a_probe_that_raises_is_reported_absent_with_the_error() -> None:
    def crashes(host: HostPaths) -> DeviceReport:
        raise PermissionError("/sys/bus/usb: permission denied")

    (report,) = probe(probes={"cuda": crashes})
    assert not report.present
    assert report.reason == "probe failed: PermissionError: /sys/bus/usb: permission denied"
    assert report.formats == ("onnx",)  # what the kind runs is known even when it failed


def test_reports_serialise_and_tabulate() -> None:
    reports = [
        DeviceReport("cpu-onnx", True, {"name": "cpu"}, "", ("onnx",), ()),
        DeviceReport("cuda", False, {}, "libcuda.so.1 not loadable", ("onnx",), ()),
    ]
    json.dumps([r.to_dict() for r in reports])
    table = format_table(reports).splitlines()
    assert table[0].split()[:3] == ["kind", "present", "formats"]
    assert table[1].split()[:4] == ["cpu-onnx", "yes", "onnx", "name=cpu"]
    assert table[2].endswith("libcuda.so.1 not loadable")


# -- Edge TPU -------------------------------------------------------------------------------


def test_edge_tpus_are_found_by_usb_id_and_apex_nodes(bare_host: HostPaths) -> None:
    usb_device(bare_host, "1-1", "1d6b", "0002")  # a root hub: not a TPU
    usb_device(bare_host, "2-1", "18d1", "9302")  # Coral USB, firmware loaded
    usb_device(bare_host, "10-2", "1a6e", "089a")  # Coral USB, still in its bootloader
    (bare_host.dev / "apex_1").touch()
    (bare_host.dev / "apex_0").touch()
    found = list_edge_tpus(bare_host.sysfs, bare_host.dev)
    assert [(d.type, d.name, Path(d.path).name, d.usb_id) for d in found] == [
        ("usb", "usb:0", "2-1", "18d1:9302"),
        ("usb", "usb:1", "10-2", "1a6e:089a"),
        ("pci", "pci:0", "apex_0", ""),
        ("pci", "pci:1", "apex_1", ""),
    ]


def test_edgetpu_absent_says_no_device_and_no_library(bare_host: HostPaths) -> None:
    usb_device(bare_host, "1-1", "1d6b", "0002")
    report = probe_edgetpu(bare_host)
    assert not report.present
    assert f"no {bare_host.dev}/apex_* device node" in report.reason
    assert "1a6e:089a or 18d1:9302" in report.reason
    assert f"{bare_host.edgetpu_library} not loadable" in report.reason
    assert report.formats == ("edgetpu-tflite",)


def test_edgetpu_present_with_a_device_and_a_loadable_library(
    bare_host: HostPaths, tmp_path: Path
) -> None:
    # the simulated delegate stands in for libedgetpu.so.1: it is a loadable shared library
    library = build_shared("sim_edgetpu_delegate.c", tmp_path)
    usb_device(bare_host, "2-1", "18d1", "9302")
    report = probe_edgetpu(replace(bare_host, edgetpu_library=str(library)))
    assert report.present, report.reason
    assert report.details["usb:0"].endswith("2-1 (18d1:9302)")
    assert report.details["library"] == str(library)


# -- CUDA -----------------------------------------------------------------------------------


def test_cuda_without_a_driver_names_the_library_and_the_packages(bare_host: HostPaths) -> None:
    report = probe_cuda(bare_host)
    assert not report.present
    assert report.reason.startswith(f"{bare_host.cuda_library} not loadable (no NVIDIA driver)")
    if not CPU_ONLY_ORT:  # a GPU host with the cuda extra: only the driver is missing here
        return
    assert "lacks CUDAExecutionProvider" in report.reason  # the CPU onnxruntime wheel
    # the CPU wheel must go before the GPU one comes: both install the onnxruntime module
    hint = report.reason.split("lacks CUDAExecutionProvider", 1)[1]
    assert hint.index("pip uninstall -y onnxruntime") < hint.index("pip install 'onnxruntime-gpu")


@pytest.fixture(scope="module")
def sim_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("sim_libcuda.c", tmp_path_factory.mktemp("libcuda"))


@pytest.mark.parametrize(
    ("init_result", "expected"),
    [
        ("100", "cuInit failed with CUDA_ERROR_NO_DEVICE (100)"),
        ("999", "cuInit failed with CUDA_ERROR_UNKNOWN (999)"),
        ("35", "cuInit failed with CUDA_ERROR_INSUFFICIENT_DRIVER (35)"),  # no name from driver
    ],
)
def test_cuda_init_failure_reports_the_cuda_error(
    bare_host: HostPaths,
    sim_libcuda: Path,
    monkeypatch: pytest.MonkeyPatch,
    init_result: str,
    expected: str,
) -> None:
    monkeypatch.setenv("SIM_CUDA_INIT_RESULT", init_result)
    report = probe_cuda(replace(bare_host, cuda_library=str(sim_libcuda)))
    assert not report.present
    assert report.reason.split("; ")[0] == expected


def test_cuda_device_details_come_from_the_driver(
    bare_host: HostPaths, sim_libcuda: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_CUDA_DEVICES", "2")
    report = probe_cuda(replace(bare_host, cuda_library=str(sim_libcuda)))
    assert report.details["name"] == "Simulated GPU"
    assert report.details["memory"] == "8.0 GiB"
    assert report.details["compute_capability"] == "8.6"
    assert report.details["gpu1.name"] == "Simulated GPU"
    assert report.details["devices"] == "2"
    assert report.details["driver_cuda"] == "12.4"
    assert "not loadable" not in report.reason
    if CPU_ONLY_ORT:  # the driver is fine, but this onnxruntime has no CUDA provider
        assert not report.present
        assert "lacks CUDAExecutionProvider" in report.reason


def test_cuda_driver_with_no_device(
    bare_host: HostPaths, sim_libcuda: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_CUDA_DEVICES", "0")
    report = probe_cuda(replace(bare_host, cuda_library=str(sim_libcuda)))
    assert "cuInit succeeded but the driver reports no CUDA device" in report.reason


# -- PYNQ -----------------------------------------------------------------------------------


def test_pynq_finds_a_zynq_fpga_manager_and_its_part(bare_host: HostPaths) -> None:
    manager = bare_host.sysfs / "class" / "fpga_manager" / "fpga0"
    manager.mkdir(parents=True)
    (manager / "name").write_text("Xilinx ZynqMP FPGA Manager\n")
    (manager / "state").write_text("operating\n")
    tree = bare_host.sysfs / "firmware" / "devicetree" / "base"
    tree.mkdir(parents=True)
    (tree / "compatible").write_bytes(b"xlnx,zynqmp-zcu104-revC\x00xlnx,zynqmp\x00")
    devices, details = pynq_devices(bare_host.sysfs, bare_host.dev, bare_host.xrt)
    assert [(d.type, Path(d.path).name, d.description) for d in devices] == [
        ("fpga_manager", "fpga0", "Xilinx ZynqMP FPGA Manager, operating")
    ]
    assert details == {"part": "xlnx,zynqmp-zcu104-revC"}


def test_pynq_finds_xrt_cards(bare_host: HostPaths) -> None:
    (bare_host.sysfs / "bus" / "pci" / "drivers" / "xocl" / "0000:65:00.1").mkdir(parents=True)
    (bare_host.dev / "xclmgmt25856").touch()
    bare_host.xrt.mkdir(parents=True)
    devices, details = pynq_devices(bare_host.sysfs, bare_host.dev, bare_host.xrt)
    assert [(d.type, Path(d.path).name) for d in devices] == [
        ("xrt", "0000:65:00.1"),
        ("xrt", "xclmgmt25856"),
    ]
    assert details["xrt"] == str(bare_host.xrt)


def test_pynq_absent_without_fpga(bare_host: HostPaths) -> None:
    report = probe_pynq(bare_host)
    assert not report.present
    assert f"no FPGA: no {bare_host.sysfs}/class/fpga_manager/*" in report.reason


def test_pynq_absent_without_the_package(
    bare_host: HostPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = probe_mod.importlib.util.find_spec
    monkeypatch.setattr(
        probe_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pynq" else real_find_spec(name, *a),
    )
    (bare_host.sysfs / "class" / "fpga_manager" / "fpga0").mkdir(parents=True)
    report = probe_pynq(bare_host)
    assert report.reason == f"pynq is not installed ({probe_mod.PYNQ_INSTALL_HINT})"
    # the hint keeps edged's numpy 2 and grpcio: pynq itself goes in without its pins
    assert "pip install --no-deps pynq==4.0.0 pynqutils==0.1.3" in report.reason
    assert "'edged[pynq]'" in report.reason


# -- LiteRT runtime choice ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "numpy_version", "package", "reason_part"),
    [
        ({"ai-edge-litert": "2.3.0"}, "2.4.6", "ai-edge-litert", ""),
        ({"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}, "2.4.6", "ai-edge-litert", ""),
        ({"tflite-runtime": "2.14.0"}, "1.26.4", "tflite-runtime", ""),
        ({"tflite-runtime": "2.14.0"}, "2.4.6", None, "built for NumPy 1.x and breaks under"),
        ({}, "2.4.6", None, "ai-edge-litert is not installed (pip install ai-edge-litert)"),
    ],
)
def test_choose_litert_runtime(
    installed: dict[str, str], numpy_version: str, package: str | None, reason_part: str
) -> None:
    chosen, reason = choose_runtime(installed, numpy_version)
    assert chosen == package
    assert reason_part in reason
    assert (reason == "") == (package is not None)


def test_this_environment_runs_litert_under_numpy_2() -> None:
    assert int(np.__version__.split(".")[0]) >= 2
    assert choose_runtime({"ai-edge-litert": "2.3.0"}, np.__version__)[0] == "ai-edge-litert"
