"""The pynq executor end to end on a SIMULATED PYNQ board (tests/pynq_sim.py).

The executor runs pynq's real Overlay (hwh parsed by pynqmetadata), allocate, MMIO and
lib.dma.DMA code; the board behind them is simulated: memory-backed registers and
non-coherent buffers, AXI DMA engines, and a FINN-style accelerator doing its arithmetic in
NumPy. Expected outputs come from a NumPy reference written here, not from the board.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edged.core.errors import ExecutorError, InvalidInputError, ModelLoadError
from hal.executor import ExecutorOptions, LoadedModel, ModelArtifact
from hal.pynq import PynqExecutor, PynqModel

try:
    sim: Any = importlib.import_module("tests.pynq_sim")
    SIM_SKIP = ""
except ImportError as e:
    sim = None
    SIM_SKIP = (
        f"pynq is not importable ({e}); install it with `pip install -e '.[pynq]'` then "
        f"`pip install --no-deps pynq==4.0.0 pynqutils==0.1.3` "
        f"(docs/adr/0002-pynq-alongside-numpy2.md)"
    )

needs_sim = pytest.mark.skipif(sim is None, reason=SIM_SKIP)


@dataclass
class Stream:
    """One side of the accelerator: how its values are laid out on the stream."""

    datatype: str
    bits: int
    signed: bool
    rows: int  # stream words per sample (FINN's fold)
    lanes: int  # values per word (SIMD / PE)
    row_bytes: int  # packed bytes per word (may pad past the byte boundary)


@dataclass
class Design:
    """An accelerator: ``y = act(W @ x)``, ``act`` multi-thresholds or identity."""

    inp: Stream
    out: Stream
    weights: np.ndarray
    thresholds: np.ndarray | None

    def reference(self, x: np.ndarray) -> np.ndarray:
        acc = x.astype(np.int64) @ self.weights.T
        if self.thresholds is None:
            return acc
        return (acc[:, :, None] >= self.thresholds[None]).sum(axis=-1)


def design(
    inp: Stream, out: Stream, seed: int = 0, thresholds: bool = True, wbits: int = 8
) -> Design:
    rng = np.random.default_rng(seed)
    features, neurons = inp.rows * inp.lanes, out.rows * out.lanes
    lim = 1 << (wbits - 1)
    weights = rng.integers(-lim, lim, size=(neurons, features))
    if not thresholds:
        return Design(inp, out, weights, None)
    # thresholds spread over the accumulator's typical range, one sorted row per neuron
    lo, hi = (
        (-(1 << (inp.bits - 1)), (1 << (inp.bits - 1)) - 1)
        if inp.signed
        else (0, (1 << inp.bits) - 1)
    )
    spread = np.sqrt(features) * lim * max(abs(lo), hi)
    levels = (1 << out.bits) - 1
    t = np.sort(rng.normal(0, spread / 2, size=(neurons, levels)).round().astype(np.int64), 1)
    return Design(inp, out, weights, t)


def build_bundle(
    folder: Path,
    d: Design,
    *,
    batch: int = 4,
    timeout_s: float = 2.0,
    clock_mhz: float | None = 125.0,
    idma: str = "idma0",
    odma: str = "odma0",
    hwh_dmas: list[tuple[str, bool, bool]] | None = None,
    length_width: int = 26,
    fabric: tuple[str, str] = ("idma0", "odma0"),
) -> Path:
    """Write a bundle version folder: simulated bitstream, .hwh and manifest.json.

    ``fabric`` names the DMAs the accelerator really sits between; ``idma``/``odma`` are what
    the manifest claims.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dmas = hwh_dmas or [("idma0", True, False), ("odma0", False, True)]
    sim.write_hwh(folder / "overlay.hwh", dmas, length_width=length_width)
    stream = {
        "in": {
            "rows": d.inp.rows,
            "lanes": d.inp.lanes,
            "bits": d.inp.bits,
            "signed": d.inp.signed,
            "row_bytes": d.inp.row_bytes,
        },
        "out": {
            "rows": d.out.rows,
            "lanes": d.out.lanes,
            "bits": d.out.bits,
            "signed": d.out.signed,
            "row_bytes": d.out.row_bytes,
        },
    }
    sim.write_bitstream(
        folder / "overlay.bit",
        [
            {
                "idma": fabric[0],
                "odma": fabric[1],
                **stream,
                "weights": d.weights.tolist(),
                "thresholds": None if d.thresholds is None else d.thresholds.tolist(),
            }
        ],
    )

    def tensor(name: str, s: Stream, dma: str) -> dict[str, Any]:
        return {
            "name": name,
            "datatype": s.datatype,
            "shape": [1, s.rows * s.lanes],
            "folded_shape": [1, s.rows, s.lanes],
            "packed_shape": [1, s.rows, s.row_bytes],
            "bits": s.bits,
            "signed": s.signed,
            "dma": dma,
        }

    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "bitstream": "overlay.bit",
        "batch": batch,
        "timeout_s": timeout_s,
        "inputs": [tensor("input", d.inp, idma)],
        "outputs": [tensor("output", d.out, odma)],
    }
    if clock_mhz is not None:
        manifest["clock_mhz"] = clock_mhz
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def load(folder: Path) -> LoadedModel:
    return PynqExecutor().load(ModelArtifact(folder, "pynq-bundle"), ExecutorOptions())


def random_input(d: Design, n: int, seed: int = 1) -> np.ndarray:
    s = d.inp
    lo, hi = (-(1 << (s.bits - 1)), (1 << (s.bits - 1)) - 1) if s.signed else (0, (1 << s.bits) - 1)
    dtype = np.dtype(s.datatype.lower())
    return (
        np.random.default_rng(seed).integers(lo, hi + 1, size=(n, s.rows * s.lanes)).astype(dtype)
    )


MVAU_8_TO_4 = (Stream("INT8", 8, True, 2, 8, 8), Stream("UINT8", 4, False, 2, 4, 2))


@pytest.fixture
def board() -> Iterator[Any]:
    """The simulated board pynq found; its fault switch is off after each test."""
    if sim is None:
        pytest.skip(SIM_SKIP)
    b = sim.active_board()
    b.hang = False
    yield b
    b.hang = False


@pytest.fixture
def model(board: Any, tmp_path: Path) -> Iterator[LoadedModel]:
    m = load(build_bundle(tmp_path / "mvau" / "1", design(*MVAU_8_TO_4)))
    yield m
    m.close()


# ------------------------------------------------------------------------------ inference


@needs_sim
@pytest.mark.parametrize(
    ("inp", "out", "thresholds"),
    [
        pytest.param(*MVAU_8_TO_4, True, id="int8-simd8-to-uint4-pe4"),
        pytest.param(
            Stream("UINT8", 3, False, 3, 5, 2),
            Stream("INT32", 32, True, 2, 3, 12),
            False,
            id="uint3-simd5-to-int32-acc",
        ),
        pytest.param(
            Stream("INT8", 4, True, 4, 4, 8),
            Stream("BOOL", 1, False, 1, 6, 4),
            True,
            id="int4-word-padded-to-binary",
        ),
        pytest.param(
            Stream("INT16", 12, True, 1, 7, 11),
            Stream("UINT8", 2, False, 5, 1, 1),
            True,
            id="int12-to-uint2-pe1",
        ),
    ],
)
def test_inference_matches_the_numpy_reference(
    board: Any, tmp_path: Path, inp: Stream, out: Stream, thresholds: bool
) -> None:
    d = design(inp, out, seed=7, thresholds=thresholds, wbits=4 if out.bits == 1 else 8)
    if out.datatype == "BOOL":  # one threshold: the sign of the accumulator
        assert d.thresholds is not None
        d.thresholds = np.zeros_like(d.thresholds)
    m = load(build_bundle(tmp_path / "b" / "1", d, batch=5))
    try:
        assert m.signature.max_batch_size == 5
        for n in (1, 3, 5):
            x = random_input(d, n, seed=n)
            y = m.infer({"input": x})["output"]
            expected = d.reference(x)
            assert y.dtype == np.dtype(out.datatype.lower() if out.datatype != "BOOL" else bool)
            assert y.shape == (n, out.rows * out.lanes)
            np.testing.assert_array_equal(y.astype(np.int64), expected)
            assert len(np.unique(expected)) > 1  # the check is not trivially constant
    finally:
        m.close()


@needs_sim
def test_load_uses_pynq_overlay_download_clock_and_buffers(board: Any, tmp_path: Path) -> None:
    import pynq

    folder = build_bundle(tmp_path / "m" / "1", design(*MVAU_8_TO_4), clock_mhz=125.0)
    live = board.memory.live
    m = load(folder / "manifest.json")  # the manifest's path names the bundle too
    assert isinstance(m, PynqModel)
    try:
        assert isinstance(m._overlay, pynq.Overlay)
        assert m._overlay.device is board
        assert board.downloads[-1] == (
            str(folder / "overlay.bit"),
            (folder / "overlay.bit").read_bytes(),
        )
        assert board.pl_clock_mhz(0) == pytest.approx(125.0, rel=1e-3)
        assert board.memory.live == live + 2  # one packed buffer per input and output
        flushes, invalidates = board.flushes, board.invalidates
        m.infer({"input": random_input(design(*MVAU_8_TO_4), 2)})
        assert board.flushes > flushes
        assert board.invalidates > invalidates
    finally:
        m.close()
    assert board.memory.live == live
    m.close()  # idempotent


@needs_sim
def test_registered_as_an_executor_entry_point() -> None:
    from hal.registry import get_executor

    assert isinstance(get_executor("pynq"), PynqExecutor)


@needs_sim
def test_one_dma_with_both_channels(board: Any, tmp_path: Path) -> None:
    d = design(*MVAU_8_TO_4)
    folder = build_bundle(
        tmp_path / "one" / "1",
        d,
        hwh_dmas=[("dma0", True, True)],
        idma="dma0",
        odma="dma0",
        fabric=("dma0", "dma0"),
    )
    m = load(folder)
    try:
        x = random_input(d, 4)
        np.testing.assert_array_equal(m.infer({"input": x})["output"], d.reference(x))
    finally:
        m.close()


@needs_sim
def test_one_request_at_a_time(model: LoadedModel) -> None:
    d = design(*MVAU_8_TO_4)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(10):
                results[i] = model.infer({"input": random_input(d, 1 + i % 4, seed=i)})["output"]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, y in results.items():
        np.testing.assert_array_equal(y, d.reference(random_input(d, 1 + i % 4, seed=i)))


# ------------------------------------------------------------------------------ bad requests


@needs_sim
@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.full((1, 16), 200, np.int16), "value 200 is outside [-128, 127]"),
        (np.zeros((1, 16), np.float32), "takes integers, not float32"),
        (np.zeros((5, 16), np.int8), "batch of 5 is outside 1..4"),
        (np.zeros((1, 15), np.int8), "shape [1, 15] is not [N, 16]"),
    ],
)
def test_bad_input_is_refused_and_the_model_still_runs(
    model: LoadedModel, x: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        model.infer({"input": x})
    assert message in str(info.value)
    d = design(*MVAU_8_TO_4)
    x_ok = random_input(d, 2)
    np.testing.assert_array_equal(model.infer({"input": x_ok})["output"], d.reference(x_ok))


# ------------------------------------------------------------------------------ faults


@needs_sim
def test_a_hung_accelerator_becomes_executor_error_within_the_timeout(
    board: Any, tmp_path: Path
) -> None:
    d = design(*MVAU_8_TO_4)
    m = load(build_bundle(tmp_path / "h" / "1", d, timeout_s=0.3))
    live = board.memory.live
    try:
        board.hang = True
        start = time.monotonic()
        with pytest.raises(ExecutorError) as info:
            m.infer({"input": random_input(d, 2)})
        elapsed = time.monotonic() - start
        assert elapsed >= 0.3  # it waited for the DMA, then gave up (no upper bound: noisy box)
        assert "DMA 'odma0' (S2MM, tensor 'output') did not finish within 0.3 s" in str(info.value)
        # the engines were reset: halted, nothing left armed to write into freed memory later
        assert board.dmas["odma0"].read(sim.S2MM_BLOCK + sim.DMASR) & sim.SR_HALTED
        assert not board.dmas["odma0"].armed
        # the model stays faulted, even once the accelerator would answer again
        board.hang = False
        with pytest.raises(ExecutorError, match="reload the model"):
            m.infer({"input": random_input(d, 1)})
    finally:
        m.close()
    assert board.memory.live == live - 2
    # a reload re-downloads the bitstream and runs again
    m = load(tmp_path / "h" / "1")
    try:
        x = random_input(d, 3)
        np.testing.assert_array_equal(m.infer({"input": x})["output"], d.reference(x))
    finally:
        m.close()


@needs_sim
def test_another_download_retires_the_first_model(board: Any, tmp_path: Path) -> None:
    d = design(*MVAU_8_TO_4)
    first = load(build_bundle(tmp_path / "a" / "1", d))
    second = load(build_bundle(tmp_path / "b" / "1", d))
    try:
        with pytest.raises(ExecutorError, match="another bitstream was downloaded"):
            first.infer({"input": random_input(d, 1)})
        x = random_input(d, 2)
        np.testing.assert_array_equal(second.infer({"input": x})["output"], d.reference(x))
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------------------ bad bundles


@needs_sim
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"idma": "idma7"},
            "the overlay has no DMA 'idma7' (named by input 'input'); its DMAs: idma0, odma0",
        ),
        ({"odma": "odma_missing"}, "no DMA 'odma_missing' (named by output 'output')"),
        ({"idma": "odma0"}, "DMA 'odma0' has no MM2S (memory to stream) channel for input"),
        (
            {"odma": "zynq_ultra_ps_e_0"},
            "IP 'zynq_ultra_ps_e_0' (named by output 'output') is a xilinx.com:ip:zynq_ultra_ps_e",
        ),
        (
            {"batch": 2048, "length_width": 14},
            "a batch of 2048 of input 'input' is 32768 bytes, more than DMA 'idma0' moves in one "
            "transfer (16383)",
        ),
    ],
)
def test_a_bundle_the_overlay_cannot_serve_is_refused(
    board: Any, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    d = design(*MVAU_8_TO_4)
    live = board.memory.live
    folder = build_bundle(tmp_path / "x" / "1", d, **kwargs)
    with pytest.raises(ModelLoadError) as info:
        load(folder)
    assert message in str(info.value)
    assert board.memory.live == live  # nothing allocated is left behind


@needs_sim
def test_missing_bundle_files(board: Any, tmp_path: Path) -> None:
    folder = build_bundle(tmp_path / "f" / "1", design(*MVAU_8_TO_4))
    (folder / "overlay.hwh").unlink()
    with pytest.raises(ModelLoadError, match=r"lacks overlay\.hwh or overlay\.xclbin"):
        load(folder)
    (folder / "overlay.bit").unlink()
    with pytest.raises(ModelLoadError, match=r"lacks its bitstream 'overlay\.bit'"):
        load(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match="cannot read the bundle manifest"):
        load(folder)
    with pytest.raises(ModelLoadError, match="cannot run format 'onnx'"):
        PynqExecutor().load(ModelArtifact(folder, "onnx"), ExecutorOptions())


def test_without_pynq_the_executor_refuses_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs with or without pynq installed: a None entry makes `import pynq` fail."""
    folder = tmp_path / "p" / "1"
    folder.mkdir(parents=True)
    (folder / "overlay.bit").write_bytes(b"bits")
    (folder / "overlay.hwh").write_text("<EDKSYSTEM/>")
    manifest = {
        "manifest_version": 1,
        "batch": 1,
        "inputs": [
            {
                "name": "x",
                "datatype": "UINT8",
                "shape": [1, 4],
                "folded_shape": [1, 1, 4],
                "packed_shape": [1, 1, 4],
                "bits": 8,
                "signed": False,
                "dma": "idma0",
            }
        ],
        "outputs": [
            {
                "name": "y",
                "datatype": "UINT8",
                "shape": [1, 4],
                "folded_shape": [1, 1, 4],
                "packed_shape": [1, 1, 4],
                "bits": 8,
                "signed": False,
                "dma": "odma0",
            }
        ],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setitem(sys.modules, "pynq", None)
    with pytest.raises(ModelLoadError) as info:
        load(folder)
    message = str(info.value)
    assert "the pynq package cannot be imported" in message
    assert "pip install --no-deps pynq==4.0.0 pynqutils==0.1.3" in message


@needs_sim
@pytest.mark.parametrize(
    ("output", "message"),
    [
        # the manifest expects 3 bytes a sample where the fabric writes 2 x 2
        (
            {"packed_shape": [1, 2, 3]},
            "DMA 'odma0' received 8 bytes of output 'output', expected 12",
        ),
        # the manifest expects 2 bytes a sample: the S2MM channel overflows
        (
            {"shape": [1, 4], "folded_shape": [1, 1, 4], "packed_shape": [1, 1, 2]},
            "DMA 'odma0' (S2MM, tensor 'output') stopped with an internal error (DMASR 0x11)",
        ),
    ],
)
def test_a_manifest_that_disagrees_with_the_fabric_fails_the_request(
    board: Any, tmp_path: Path, output: dict[str, Any], message: str
) -> None:
    d = design(*MVAU_8_TO_4)
    folder = build_bundle(tmp_path / "w" / "1", d)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["outputs"][0].update(output)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    m = load(folder)
    try:
        with pytest.raises(ExecutorError) as info:
            m.infer({"input": random_input(d, 2)})
        assert message in str(info.value)
    finally:
        m.close()
