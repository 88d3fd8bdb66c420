"""Which executors this host can run, and why the others cannot.

``probe()`` returns one :class:`DeviceReport` per executor kind. Each check runs on its own
daemon thread with a deadline and catches everything, so a native library that hangs in
``dlopen`` or a driver stuck in ``cuInit`` costs the caller ``timeout_s`` at most, never a hung
or crashed daemon (the stuck thread is abandoned; being a daemon thread, it does not hold up
exit). An absent kind carries the precise reason: the package that is not installed, the
library that does not load, the driver call that failed with its error code, the device node
that is missing.

Where the checks look is a :class:`HostPaths`: the real ``/sys``, ``/dev`` and ``/proc`` by
default. Tests point it at fake trees in a temporary directory, a simulation of the hardware
boundary (sysfs attribute files and device nodes), not of the code under test.

    python -m hal               # the table for this host
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edged.core.errors import ModelLoadError
from edged.core.types import DataType
from hal.cpu_litert import choose_runtime, installed_runtimes, load_runtime
from hal.registry import available_kinds, executor_class
from hal.report import DeviceReport

KINDS = ("cpu-onnx", "cpu-litert", "cuda", "edgetpu", "pynq", "remote")
DEFAULT_TIMEOUT_S = 5.0

_D = DataType
_ONNX_DTYPES = (
    _D.BOOL, _D.UINT8, _D.UINT16, _D.UINT32, _D.UINT64, _D.INT8, _D.INT16, _D.INT32, _D.INT64,
    _D.FP16, _D.FP32, _D.FP64,
)  # fmt: skip

#: What each kind runs (artifact formats, tensor datatypes), present or not.
CAPABILITIES: dict[str, tuple[tuple[str, ...], tuple[DataType, ...]]] = {
    "cpu-onnx": (("onnx",), (*_ONNX_DTYPES, _D.BYTES)),
    "cpu-litert": (
        ("tflite",),
        (_D.BOOL, _D.UINT8, _D.INT8, _D.INT16, _D.INT32, _D.INT64, _D.FP16, _D.FP32),
    ),
    "cuda": (("onnx",), _ONNX_DTYPES),
    "edgetpu": (("edgetpu-tflite",), (_D.UINT8, _D.INT8, _D.FP32)),
    "pynq": (("pynq-bundle",), (_D.UINT8, _D.INT8, _D.INT16, _D.INT32, _D.FP32)),
    # what KServe v2 carries; the server decides what its model takes
    "remote": (("onnx",), tuple(DataType)),
}

#: Coral USB Accelerator: before its firmware is loaded (Global Unichip) and after (Google).
EDGETPU_USB_IDS = (("1a6e", "089a"), ("18d1", "9302"))
CUDA_LIBRARY = "libcuda.so.1"
EDGETPU_LIBRARY = "libedgetpu.so.1"
XRT_DIR = Path(os.environ.get("XILINX_XRT", "/opt/xilinx/xrt"))

#: CUresult names, for drivers too old to have cuGetErrorName.
CUDA_ERRORS = {
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    34: "CUDA_ERROR_STUB_LIBRARY",
    35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
    46: "CUDA_ERROR_DEVICES_UNAVAILABLE",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    999: "CUDA_ERROR_UNKNOWN",
}
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


@dataclass(frozen=True)
class HostPaths:
    """Where the probes look. Defaults are the real host; tests substitute fake trees."""

    sysfs: Path = Path("/sys")
    dev: Path = Path("/dev")
    proc: Path = Path("/proc")
    xrt: Path = XRT_DIR
    """Where the Xilinx runtime (XRT) is installed."""
    cuda_library: str = CUDA_LIBRARY
    edgetpu_library: str = EDGETPU_LIBRARY


ProbeFn = Callable[[HostPaths], DeviceReport]


def _report(kind: str, reasons: list[str], details: dict[str, str] | None = None) -> DeviceReport:
    formats, dtypes = CAPABILITIES[kind]
    return DeviceReport(
        kind=kind,
        present=not reasons,
        details=details or {},
        reason="; ".join(reasons),
        formats=formats,
        dtypes=dtypes,
    )


def _read(path: Path) -> str:
    """A sysfs/procfs attribute, stripped ("" when unreadable)."""
    try:
        return path.read_text(errors="replace").strip().strip("\x00")
    except OSError:
        return ""


def _natural(path: Path) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


# -- CPU ------------------------------------------------------------------------------------


def cpu_details(host: HostPaths) -> dict[str, str]:
    """CPU model, usable cores, memory and architecture."""
    details = {"arch": platform.machine()}
    cpuinfo = _read(host.proc / "cpuinfo")
    for key in ("model name", "Hardware", "Model", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match:
            details["name"] = match.group(1).strip()
            break
    try:
        details["cores"] = str(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        details["cores"] = str(os.cpu_count() or 1)
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read(host.proc / "meminfo"), re.MULTILINE)
    if match:
        details["memory"] = _gib(int(match.group(1)) * 1024)
    return details


def probe_cpu_onnx(host: HostPaths) -> DeviceReport:
    """ONNX Runtime with its CPU execution provider."""
    details = cpu_details(host)
    if importlib.util.find_spec("onnxruntime") is None:
        reason = "onnxruntime is not installed (pip install onnxruntime)"
        return _report("cpu-onnx", [reason], details)
    ort = importlib.import_module("onnxruntime")
    details["runtime"] = f"onnxruntime {ort.__version__}"
    providers = list(ort.get_available_providers())
    if "CPUExecutionProvider" not in providers:
        return _report(
            "cpu-onnx", [f"onnxruntime lacks CPUExecutionProvider (has {providers})"], details
        )
    return _report("cpu-onnx", [], details)


def probe_cpu_litert(host: HostPaths) -> DeviceReport:
    """LiteRT (ai-edge-litert, or a tflite-runtime that works with this NumPy)."""
    details = cpu_details(host)
    package, reason = choose_runtime(installed_runtimes(), np.__version__)
    if package is None:
        return _report("cpu-litert", [reason], details)
    try:
        runtime = load_runtime()  # imports the interpreter: proves the wheel works here
    except ModelLoadError as e:
        return _report("cpu-litert", [str(e)], details)
    details["runtime"] = f"{runtime.package} {runtime.version}"
    details["delegate"] = "XNNPACK (default)"
    return _report("cpu-litert", [], details)


# -- CUDA -----------------------------------------------------------------------------------


def _cuda_error(lib: Any, code: int) -> str:
    name = ctypes.c_char_p()
    get_name = getattr(lib, "cuGetErrorName", None)
    if get_name is not None and get_name(code, ctypes.byref(name)) == 0 and name.value:
        return f"{name.value.decode()} ({code})"
    return f"{CUDA_ERRORS.get(code, 'CUresult')} ({code})"


def cuda_devices(lib: Any) -> tuple[list[dict[str, str]], str]:
    """Query the CUDA driver ``lib`` (a loaded libcuda): its devices and "" or, when
    ``cuInit`` or a query fails, the reason with the CUresult code."""
    rc = lib.cuInit(0)
    if rc != 0:
        return [], f"cuInit failed with {_cuda_error(lib, rc)}"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return [], f"cuDeviceGetCount failed with {_cuda_error(lib, rc)}"
    devices: list[dict[str, str]] = []
    for ordinal in range(count.value):
        device = ctypes.c_int(0)
        rc = lib.cuDeviceGet(ctypes.byref(device), ordinal)
        if rc != 0:
            return devices, f"cuDeviceGet({ordinal}) failed with {_cuda_error(lib, rc)}"
        name = ctypes.create_string_buffer(256)
        memory = ctypes.c_size_t(0)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGetName(name, len(name), device)
        lib.cuDeviceTotalMem_v2(ctypes.byref(memory), device)
        lib.cuDeviceGetAttribute(
            ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device
        )
        lib.cuDeviceGetAttribute(
            ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device
        )
        devices.append(
            {
                "name": name.value.decode(errors="replace"),
                "memory": _gib(memory.value),
                "compute_capability": f"{major.value}.{minor.value}",
            }
        )
    if not devices:
        return [], "cuInit succeeded but the driver reports no CUDA device"
    return devices, ""


#: onnxruntime and onnxruntime-gpu install the same ``onnxruntime`` module: with both
#: installed, whichever was installed last owns the files, and uninstalling one afterwards
#: deletes files the other needs. So the CPU wheel goes first.
CUDA_INSTALL_HINT = (
    "pip uninstall -y onnxruntime, then pip install 'onnxruntime-gpu>=1.17' (both wheels "
    "install the same onnxruntime module)"
)


def _onnxruntime_gpu_hint() -> str:
    if _version("onnxruntime-gpu") and _version("onnxruntime"):
        return (
            "onnxruntime and onnxruntime-gpu are both installed and share one onnxruntime "
            "module: pip uninstall -y onnxruntime onnxruntime-gpu, then pip install "
            "'onnxruntime-gpu>=1.17'"
        )
    return f"install onnxruntime-gpu in its place: {CUDA_INSTALL_HINT}"


def probe_cuda(host: HostPaths) -> DeviceReport:
    """An NVIDIA driver with a device, onnxruntime-gpu's CUDA provider, and pycuda."""
    reasons: list[str] = []
    details: dict[str, str] = {}
    try:
        lib = ctypes.CDLL(host.cuda_library)
    except OSError as e:
        reasons.append(f"{host.cuda_library} not loadable (no NVIDIA driver): {e}")
    else:
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
            details["driver_cuda"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
        devices, reason = cuda_devices(lib)
        if reason:
            reasons.append(reason)
        for ordinal, device in enumerate(devices):
            prefix = "" if ordinal == 0 else f"gpu{ordinal}."
            details.update({prefix + k: v for k, v in device.items()})
        if devices:
            details["devices"] = str(len(devices))
    if importlib.util.find_spec("onnxruntime") is None:
        reasons.append("onnxruntime-gpu is not installed (pip install 'onnxruntime-gpu>=1.17')")
    else:
        ort = importlib.import_module("onnxruntime")
        providers = list(ort.get_available_providers())
        details["runtime"] = f"onnxruntime {ort.__version__}"
        if "CUDAExecutionProvider" not in providers:
            reasons.append(
                f"onnxruntime {ort.__version__} lacks CUDAExecutionProvider (it has "
                f"{', '.join(providers)}): {_onnxruntime_gpu_hint()}"
            )
        if "TensorrtExecutionProvider" in providers:
            details["tensorrt"] = "TensorrtExecutionProvider available"
    if importlib.util.find_spec("pycuda") is None:
        reasons.append("pycuda is not installed (pip install 'pycuda>=2024.1')")
    return _report("cuda", reasons, details)


# -- Edge TPU -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeTpu:
    """One Edge TPU, as pycoral's ``list_edge_tpus()`` reports it."""

    type: str
    """"usb" or "pci"."""
    path: str
    """The USB device's sysfs folder, or the PCIe device node /dev/apex_N."""
    name: str
    """libedgetpu's ``device`` option that selects it: "usb:0", "pci:0"."""
    usb_id: str = ""
    """vendor:product; 1a6e:089a means the firmware is not loaded yet (libedgetpu loads it
    when it opens the device)."""


def list_edge_tpus(sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> list[EdgeTpu]:
    """Edge TPUs on this host: USB accelerators by their ids in
    ``<sysfs>/bus/usb/devices/*/idVendor,idProduct``, PCIe/M.2 modules by ``<dev>/apex_*``."""
    found: list[EdgeTpu] = []
    usb_root = sysfs / "bus" / "usb" / "devices"
    usb = []
    if usb_root.is_dir():
        for device in sorted(usb_root.iterdir(), key=_natural):
            ids = (_read(device / "idVendor").lower(), _read(device / "idProduct").lower())
            if ids in EDGETPU_USB_IDS:
                usb.append((device, ":".join(ids)))
    for i, (device, usb_id) in enumerate(usb):
        found.append(EdgeTpu("usb", str(device), f"usb:{i}", usb_id))
    nodes = sorted(dev.glob("apex_*"), key=_natural) if dev.is_dir() else []
    for i, node in enumerate(nodes):
        found.append(EdgeTpu("pci", str(node), f"pci:{i}"))
    return found


def probe_edgetpu(host: HostPaths) -> DeviceReport:
    """An Edge TPU (USB or PCIe), libedgetpu, and a LiteRT runtime to load it into."""
    reasons: list[str] = []
    details: dict[str, str] = {}
    devices = list_edge_tpus(host.sysfs, host.dev)
    for device in devices:
        details[device.name] = device.path + (f" ({device.usb_id})" if device.usb_id else "")
    if not devices:
        ids = " or ".join(f"{v}:{p}" for v, p in EDGETPU_USB_IDS)
        reasons.append(
            f"no Edge TPU: no {host.dev}/apex_* device node and no USB device {ids} under "
            f"{host.sysfs}/bus/usb/devices"
        )
    try:
        ctypes.CDLL(host.edgetpu_library)
    except OSError as e:
        reasons.append(
            f"{host.edgetpu_library} not loadable (install libedgetpu1-std from Coral's "
            f"package repository): {e}"
        )
    else:
        details["library"] = host.edgetpu_library
    package, reason = choose_runtime(installed_runtimes(), np.__version__)
    if package is None:
        reasons.append(reason)
    return _report("edgetpu", reasons, details)


# -- PYNQ -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FpgaDevice:
    """An FPGA PYNQ can program: a Zynq's fpga_manager, or an XRT (Alveo) card."""

    type: str
    """"fpga_manager" or "xrt"."""
    path: str
    description: str


def pynq_devices(
    sysfs: Path = Path("/sys"), dev: Path = Path("/dev"), xrt: Path = XRT_DIR
) -> tuple[list[FpgaDevice], dict[str, str]]:
    """FPGAs on this host and what identifies them (the FPGA part, XRT's location).

    Zynq boards expose ``<sysfs>/class/fpga_manager/fpgaN`` (name, state) and name the board
    and part in the device tree; Alveo cards are PCIe functions bound to XRT's ``xocl``
    driver, with ``<dev>/xclmgmt*`` management nodes.
    """
    devices: list[FpgaDevice] = []
    details: dict[str, str] = {}
    managers = sysfs / "class" / "fpga_manager"
    if managers.is_dir():
        for manager in sorted(managers.iterdir(), key=_natural):
            description = ", ".join(
                v for v in (_read(manager / "name"), _read(manager / "state")) if v
            )
            devices.append(FpgaDevice("fpga_manager", str(manager), description))
    xocl = sysfs / "bus" / "pci" / "drivers" / "xocl"
    if xocl.is_dir():
        for function in sorted(xocl.glob("[0-9a-f]*:*"), key=_natural):
            devices.append(FpgaDevice("xrt", str(function), "PCIe function bound to xocl"))
    if dev.is_dir():
        for node in sorted(dev.glob("xclmgmt*"), key=_natural):
            devices.append(FpgaDevice("xrt", str(node), "XRT management node"))
    compatible = _read(sysfs / "firmware" / "devicetree" / "base" / "compatible")
    if compatible:
        details["part"] = compatible.split("\x00")[0]
    if xrt.is_dir():
        details["xrt"] = str(xrt)
    return devices, details


#: pynq 4.0.0 and pynqutils pin numpy<2 and grpcio==1.64: a plain ``pip install pynq`` would
#: downgrade edged's numpy and grpcio. Install what they need, then them without their pins
#: (docs/adr/0002-pynq-alongside-numpy2.md).
PYNQ_INSTALL_HINT = (
    "pip install 'edged[pynq]', then pip install --no-deps pynq==4.0.0 pynqutils==0.1.3; "
    "never a plain pip install pynq, which downgrades numpy and grpcio "
    "(docs/adr/0002-pynq-alongside-numpy2.md)"
)


def probe_pynq(host: HostPaths) -> DeviceReport:
    """The pynq package and an FPGA it can program. The package is found, not imported:
    importing pynq loads board drivers, which the probe must not do on an unknown host."""
    reasons: list[str] = []
    devices, details = pynq_devices(host.sysfs, host.dev, host.xrt)
    if importlib.util.find_spec("pynq") is None:
        reasons.append(f"pynq is not installed ({PYNQ_INSTALL_HINT})")
    else:
        details["runtime"] = f"pynq {_version('pynq') or '(unknown version)'}"
    for i, device in enumerate(devices):
        details[f"{device.type}{i}"] = f"{device.path} ({device.description})"
    if not devices:
        reasons.append(
            f"no FPGA: no {host.sysfs}/class/fpga_manager/* (Zynq) and no XRT device "
            f"({host.sysfs}/bus/pci/drivers/xocl, {host.dev}/xclmgmt*)"
        )
    return _report("pynq", reasons, details)


def probe_remote(host: HostPaths) -> DeviceReport:
    """Another KServe v2 server (hal/remote.py): present wherever gRPC is; whether the
    server answers is asked when a model loads (docs/partition.md)."""
    if importlib.util.find_spec("grpc") is None:
        return _report("remote", ["grpcio is not installed"], {})
    return _report("remote", [], {"probe": "a network executor: the server is asked at load"})


PROBES: dict[str, ProbeFn] = {
    "cpu-onnx": probe_cpu_onnx,
    "cpu-litert": probe_cpu_litert,
    "cuda": probe_cuda,
    "edgetpu": probe_edgetpu,
    "pynq": probe_pynq,
    "remote": probe_remote,
}


def _absent(kind: str, reason: str) -> DeviceReport:
    formats, dtypes = CAPABILITIES.get(kind, ((), ()))
    return DeviceReport(kind, False, {}, reason, formats, dtypes)


def probe_entry_point(kind: str, host: HostPaths) -> DeviceReport:
    """The report of an executor kind another package registers: its class's ``probe()``
    (see ``hal.executor.Executor.probe``). Importing the class happens here, on the probe's
    thread, so a vendor module that hangs on import is cut off by the deadline too."""
    try:
        cls = executor_class(kind)
    except ModelLoadError as e:
        return _absent(kind, str(e))
    report = cls.probe()
    if not isinstance(report, DeviceReport):
        return _absent(
            kind, f"{cls.__name__}.probe() returned {type(report).__name__}, not a DeviceReport"
        )
    if report.kind != kind:  # the entry point's name is the kind model.toml uses
        report = replace(report, kind=kind)
    return report


def installed_probes() -> dict[str, ProbeFn]:
    """The built-in checks (:data:`PROBES`), then one for every other kind registered in the
    ``edged.executors`` entry-point group, by name."""
    probes = dict(PROBES)
    for kind in available_kinds():
        if kind not in probes:
            probes[kind] = functools.partial(probe_entry_point, kind)
    return probes


def probe(
    host: HostPaths | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    probes: Mapping[str, ProbeFn] | None = None,
) -> list[DeviceReport]:
    """One report per executor kind: ``KINDS`` in order, then the kinds other packages
    register (:func:`installed_probes`); or ``probes``' kinds in their order.

    Every probe runs at once on its own daemon thread; the call returns after ``timeout_s``
    at most. A probe that raises is reported absent with the exception; one that has not
    finished by the deadline is reported absent as timed out. Never raises.
    """
    host = host or HostPaths()
    probes = installed_probes() if probes is None else probes
    results: dict[str, DeviceReport] = {}
    lock = threading.Lock()

    def run(kind: str, fn: ProbeFn) -> None:
        try:
            report = fn(host)
        except BaseException as e:  # a probe must never take the caller down
            report = _absent(kind, f"probe failed: {type(e).__name__}: {e}")
        with lock:
            results[kind] = report

    threads = [
        threading.Thread(target=run, args=(kind, fn), name=f"edged-probe-{kind}", daemon=True)
        for kind, fn in probes.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return [
            results.get(kind)
            or _absent(
                kind,
                f"probe did not finish within {timeout_s:g}s (a driver or native library "
                f"is hanging)",
            )
            for kind in probes
        ]


def format_table(reports: list[DeviceReport]) -> str:
    """The reports as a text table: kind, present, formats, then details or the reason."""
    rows = [("kind", "present", "formats", "details / reason")]
    for r in reports:
        info = ", ".join(f"{k}={v}" for k, v in r.details.items()) if r.present else r.reason
        rows.append((r.kind, "yes" if r.present else "no", ",".join(r.formats), info))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        + "\n"
        for row in rows
    )
