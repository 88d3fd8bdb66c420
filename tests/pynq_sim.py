"""A SIMULATED PYNQ board (Zynq UltraScale+), plugged into pynq's own device discovery.

This is a simulation for tests, not hardware. Importing this module defines
``SimulatedPynqBoard``, a ``pynq.Device`` subclass with ``_probe_`` and ``_probe_priority_``:
pynq's ``DeviceMeta`` registers every such subclass when the class is created, and the first
access to ``pynq.Device.devices`` calls each registered ``_probe_`` (lowest priority first), so
``Device.active_device`` is the simulated board and the real ``pynq.Overlay``, ``pynq.allocate``,
``pynq.MMIO`` and ``pynq.lib.dma.DMA`` run against it unchanged. Nothing in pynq is patched.

What is simulated, and how:

- Programmable logic: ``download`` records the bitstream's bytes and "configures the fabric"
  from them: a simulated bitstream is ``SIM_BITSTREAM_MAGIC`` followed by JSON naming the
  accelerator kernels (their weights and thresholds). Metadata comes from the ``.hwh`` beside
  it, parsed by pynqmetadata exactly as on a board (``write_hwh`` writes a minimal one).
- Registers (capability ``REGISTER_RW``): memory-backed 32-bit words. AXI DMA register
  windows behave as PG021's simple (direct register) mode; every other address is plain
  memory, with the reset values of the clock controller's PLLs so that ``pynq.ps.Clocks``
  can compute and set PL clocks.
- Memory: ``allocate`` returns a real ``pynq.buffer.PynqBuffer`` over a host bytearray, with a
  fake physical address. It is NOT cache-coherent: the device sees a separate copy that only
  ``flush()`` updates, and the host sees device writes only after ``invalidate()``, so a driver
  that forgets either reads stale data, as on a board.
- The accelerator: a FINN-style matrix-vector-activation unit per kernel. It reads packed rows
  from the MM2S stream, unpacks them with its own bit-level code (Python integers, not edged's
  unpacker), computes ``acc = W @ x`` in NumPy, applies multi-thresholds (``sum(acc >= T)``)
  when it has them, packs the result and writes it through the S2MM channel, then sets the
  DMA idle/IOC status bits that ``pynq.lib.dma`` polls.
- Faults: ``board.hang = True`` makes the accelerator swallow its input and never answer.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    import pynq
    from pynq.buffer import PynqBuffer
    from pynqmetadata.frontends import Metadata
    from pynqmetadata.views.runtime import RuntimeMetadataParser

SIM_BITSTREAM_MAGIC = b"EDGED-SIMULATED-BITSTREAM\n"
AXI_DMA_VLNV = "xilinx.com:ip:axi_dma:7.1"
PS_VLNV = "xilinx.com:ip:zynq_ultra_ps_e:3.4"
DMA_WINDOW = 0x10000
FIRST_DMA_BASE = 0xA000_0000
PHYS_BASE = 0x1000_0000
PHYS_ALIGN = 0x1000

# AXI DMA simple-mode registers (PG021), offsets within a channel's block
DMACR, DMASR, ADDR, ADDR_MSB, LENGTH = 0x00, 0x04, 0x18, 0x1C, 0x28
MM2S_BLOCK, S2MM_BLOCK = 0x00, 0x30
CR_RUN, CR_RESET = 0x1, 0x4
SR_HALTED, SR_IDLE, SR_INT_ERR, SR_DEC_ERR, SR_IOC = 0x1, 0x2, 0x10, 0x40, 0x1000

# Zynq UltraScale+ clock controllers (CRL_APB, CRF_APB) and their PLL reset values:
# PRE_SRC 0 (33.333 MHz reference), FBDIV 90, DIV2 1 -> 1500 MHz.
CRL_APB, CRF_APB = 0xFF5E_0000, 0xFD1A_0000
_PLL_1500MHZ = (90 << 8) | (1 << 16)
_PL_REF_100MHZ = (1 << 24) | (1 << 16) | (15 << 8)  # CLKACT, DIVISOR1 1, DIVISOR0 15, IOPLL
REGISTER_RESET_VALUES = {
    CRL_APB + 0x20: _PLL_1500MHZ,  # IOPLL_CTRL
    CRL_APB + 0x30: _PLL_1500MHZ,  # RPLL_CTRL
    CRF_APB + 0x20: _PLL_1500MHZ,  # APLL_CTRL
    CRF_APB + 0x2C: _PLL_1500MHZ,  # DPLL_CTRL
    CRF_APB + 0x38: _PLL_1500MHZ,  # VPLL_CTRL
    **{CRL_APB + 0xC0 + 4 * i: _PL_REF_100MHZ for i in range(4)},  # PL0..3_REF_CTRL
}
REF_CLK_MHZ = 33.333


# ------------------------------------------------------------------------------ memory


@dataclass
class Allocation:
    """One contiguous buffer: the host's view and the device's own copy."""

    phys: int
    host: bytearray
    device: bytearray
    buffer: weakref.ref[Any] | None = None
    freed: bool = False


class SimulatedMemory:
    """The board's DDR as the PL sees it: buffers at fake physical addresses."""

    def __init__(self, board: SimulatedPynqBoard) -> None:
        self.board = board
        self._next = PHYS_BASE
        self.allocations: dict[int, Allocation] = {}
        self._lock = threading.Lock()

    def allocate(self, shape: Any, dtype: Any, **kwargs: Any) -> PynqBuffer:
        dt = np.dtype(dtype)
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        size = max(1, math.prod(dims) * dt.itemsize)
        with self._lock:
            phys = self._next
            self._next += -(-size // PHYS_ALIGN) * PHYS_ALIGN
        alloc = Allocation(phys, bytearray(size), bytearray(size))
        self.allocations[phys] = alloc
        buf = PynqBuffer(
            dims,
            dt,
            buffer=alloc.host,
            device=self.board,
            device_address=phys,
            bo=alloc,
            coherent=False,
        )
        # pynq's pointer-return protocol: freebuffer() hands the pointer back to us
        buf.memory = self
        buf.pointer = phys
        buf.return_to = self
        alloc.buffer = weakref.ref(buf)
        return buf

    def return_pointer(self, pointer: int) -> None:
        alloc = self.allocations.get(pointer)
        if alloc is None:
            return
        alloc.freed = True
        buf = alloc.buffer() if alloc.buffer is not None else None
        if buf is not None:
            buf.freed = True  # nothing left to unmap
        del self.allocations[pointer]

    @property
    def live(self) -> int:
        """Buffers allocated and not yet freed."""
        return len(self.allocations)

    def _find(self, phys: int, length: int) -> tuple[Allocation, int]:
        for alloc in self.allocations.values():
            if alloc.phys <= phys and phys + length <= alloc.phys + len(alloc.device):
                return alloc, phys - alloc.phys
        raise LookupError(f"no buffer covers [{phys:#x}, {phys + length:#x})")

    def dma_read(self, phys: int, length: int) -> bytes:
        alloc, offset = self._find(phys, length)
        return bytes(alloc.device[offset : offset + length])

    def dma_write(self, phys: int, data: bytes) -> None:
        alloc, offset = self._find(phys, len(data))
        alloc.device[offset : offset + len(data)] = data


# ------------------------------------------------------------------------------ accelerator


def _unpack_row(row: bytes, count: int, bits: int, signed: bool) -> list[int]:
    word = int.from_bytes(row, "little")
    mask = (1 << bits) - 1
    values = [(word >> (i * bits)) & mask for i in range(count)]
    if signed:
        values = [v - (1 << bits) if v >> (bits - 1) else v for v in values]
    return values


def _pack_row(values: list[int], bits: int, nbytes: int) -> bytes:
    mask = (1 << bits) - 1
    word = 0
    for i, v in enumerate(values):
        word |= (int(v) & mask) << (i * bits)
    return word.to_bytes(nbytes, "little")


@dataclass
class StreamFormat:
    """How samples travel on one AXI stream: ``rows`` words of ``lanes`` values each."""

    rows: int
    lanes: int
    bits: int
    signed: bool
    row_bytes: int

    @property
    def sample_bytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass
class Kernel:
    """A matrix-vector-activation unit between one MM2S and one S2MM stream."""

    idma: str
    odma: str
    inp: StreamFormat
    out: StreamFormat
    weights: np.ndarray
    thresholds: np.ndarray | None
    pending: bytearray = field(default_factory=bytearray)

    def compute(self, sample: bytes) -> bytes:
        f = self.inp
        x = []
        for r in range(f.rows):
            x += _unpack_row(
                sample[r * f.row_bytes : (r + 1) * f.row_bytes], f.lanes, f.bits, f.signed
            )
        acc = self.weights @ np.array(x, dtype=np.int64)
        y = acc if self.thresholds is None else (acc[:, None] >= self.thresholds).sum(axis=1)
        o = self.out
        values = [int(v) for v in y]
        return b"".join(
            _pack_row(values[r * o.lanes : (r + 1) * o.lanes], o.bits, o.row_bytes)
            for r in range(o.rows)
        )


def kernel_from_config(raw: dict[str, Any]) -> Kernel:
    thresholds = raw.get("thresholds")
    return Kernel(
        idma=raw["idma"],
        odma=raw["odma"],
        inp=StreamFormat(**raw["in"]),
        out=StreamFormat(**raw["out"]),
        weights=np.array(raw["weights"], dtype=np.int64),
        thresholds=None if thresholds is None else np.array(thresholds, dtype=np.int64),
    )


# ------------------------------------------------------------------------------ AXI DMA


class SimulatedAxiDma:
    """An AXI DMA in simple mode: one MM2S and/or one S2MM channel."""

    def __init__(self, board: SimulatedPynqBoard, name: str, base: int, params: dict[str, Any]):
        self.board = board
        self.name = name
        self.base = base
        self.has = {
            MM2S_BLOCK: params.get("c_include_mm2s", "0") == "1",
            S2MM_BLOCK: params.get("c_include_s2mm", "0") == "1",
        }
        self.regs: dict[int, int] = {}
        self.packets: list[bytes] = []  # output packets waiting for the S2MM channel
        self.armed = False
        self.reset()

    def reset(self) -> None:
        self.regs = {block + DMASR: SR_HALTED for block in (MM2S_BLOCK, S2MM_BLOCK)}
        self.packets.clear()
        self.armed = False

    def read(self, offset: int) -> int:
        return self.regs.get(offset, 0)

    def write(self, offset: int, value: int) -> None:
        block = S2MM_BLOCK if offset >= S2MM_BLOCK else MM2S_BLOCK
        reg = offset - block
        if reg == DMACR:
            if value & CR_RESET:
                self.reset()  # resets the whole engine; the bit clears itself
                return
            self.regs[offset] = value
            sr = self.regs[block + DMASR]
            self.regs[block + DMASR] = sr & ~SR_HALTED if value & CR_RUN else sr | SR_HALTED
        elif reg == DMASR:
            self.regs[offset] = self.regs[offset] & ~(value & SR_IOC)  # write 1 to clear IOC
        elif reg == LENGTH:
            self.regs[offset] = value
            if self.regs.get(block + DMACR, 0) & CR_RUN and self.has[block]:
                self.regs[block + DMASR] &= ~(SR_IDLE | SR_IOC)
                if block == MM2S_BLOCK:
                    self._send(value)
                else:
                    self.armed = True
                    self.deliver()
        else:
            self.regs[offset] = value

    def _address(self, block: int) -> int:
        return self.regs.get(block + ADDR, 0) | self.regs.get(block + ADDR_MSB, 0) << 32

    def _send(self, length: int) -> None:
        try:
            data = self.board.memory.dma_read(self._address(MM2S_BLOCK), length)
        except LookupError:
            self.regs[MM2S_BLOCK + DMASR] |= SR_DEC_ERR | SR_HALTED
            return
        self.board.stream(self.name, data)
        self.regs[MM2S_BLOCK + DMASR] |= SR_IDLE | SR_IOC

    def deliver(self) -> None:
        """Hand the oldest output packet to the armed S2MM channel."""
        if not self.armed or not self.packets:
            return
        packet = self.packets.pop(0)
        length = self.regs.get(S2MM_BLOCK + LENGTH, 0)
        self.armed = False
        if len(packet) > length:
            self.regs[S2MM_BLOCK + DMASR] |= SR_INT_ERR | SR_HALTED
            return
        try:
            self.board.memory.dma_write(self._address(S2MM_BLOCK), packet)
        except LookupError:
            self.regs[S2MM_BLOCK + DMASR] |= SR_DEC_ERR | SR_HALTED
            return
        self.regs[S2MM_BLOCK + LENGTH] = len(packet)  # bytes actually received
        self.regs[S2MM_BLOCK + DMASR] |= SR_IDLE | SR_IOC


# ------------------------------------------------------------------------------ the board


class SimulatedPynqBoard(pynq.Device):
    """A SIMULATED Zynq UltraScale+ PYNQ board (see the module docstring)."""

    _probe_priority_ = 1  # before any real device class pynq registers (40, 50, 100, 200)

    @classmethod
    def _probe_(cls) -> list[SimulatedPynqBoard]:
        return [cls()]

    def __init__(self, tag: str = "simulated-pynq-board") -> None:
        super().__init__(tag)
        self.name = "edged-simulated-zcu104"
        self.arch = "aarch64"  # a Zynq UltraScale+, so pynq.ps.Clocks drives CRL_APB
        self.capabilities = {"REGISTER_RW": True, "MEMORY_MAPPED": False, "CALLABLE": False}
        self.memory = SimulatedMemory(self)
        self.registers: dict[int, int] = dict(REGISTER_RESET_VALUES)
        self.dmas: dict[str, SimulatedAxiDma] = {}
        self.kernels: list[Kernel] = []
        self.downloads: list[tuple[str, bytes]] = []
        self.flushes = 0
        self.invalidates = 0
        self.hang = False
        self._lock = threading.RLock()

    # --- pynq.Device interface -------------------------------------------------------

    @property
    def default_memory(self) -> SimulatedMemory:
        return self.memory

    def get_bitfile_metadata(self, bitfile_name: str) -> RuntimeMetadataParser:
        hwh = Path(bitfile_name).with_suffix(".hwh")
        if not hwh.is_file():
            raise RuntimeError("Unable to find metadata for bitstream")
        return RuntimeMetadataParser(Metadata(input=str(hwh)))

    def download(self, bitstream: Any, parser: Any = None) -> None:
        data = Path(bitstream.bitfile_name).read_bytes()
        if not data.startswith(SIM_BITSTREAM_MAGIC):
            raise RuntimeError("not a bitstream this simulated board can load")
        config = json.loads(data[len(SIM_BITSTREAM_MAGIC) :])
        with self._lock:
            self.downloads.append((bitstream.bitfile_name, data))
            self.dmas = {
                name: SimulatedAxiDma(self, name, ip["phys_addr"], ip["parameters"])
                for name, ip in parser.ip_dict.items()
                if ip["type"] == AXI_DMA_VLNV
            }
            self.kernels = [kernel_from_config(k) for k in config["kernels"]]
        self.post_download(bitstream, parser, self.name)

    def read_registers(self, address: int, length: int) -> bytes:
        with self._lock:
            dma, offset = self._dma_at(address)
            value = dma.read(offset) if dma else self.registers.get(address & ~3, 0)
        return (value & 0xFFFF_FFFF).to_bytes(4, "little")[:length]

    def write_registers(self, address: int, data: bytes) -> None:
        with self._lock:
            for i in range(0, len(data), 4):
                value = int.from_bytes(data[i : i + 4].ljust(4, b"\0"), "little")
                dma, offset = self._dma_at(address + i)
                if dma:
                    dma.write(offset, value)
                else:
                    self.registers[(address + i) & ~3] = value

    def flush(self, bo: Allocation, offset: int, vaddr: int, nbytes: int) -> None:
        self.flushes += 1
        bo.device[offset : offset + nbytes] = bo.host[offset : offset + nbytes]

    def invalidate(self, bo: Allocation, offset: int, vaddr: int, nbytes: int) -> None:
        self.invalidates += 1
        bo.host[offset : offset + nbytes] = bo.device[offset : offset + nbytes]

    def insert_device_tree(self, abs_dtbo: str) -> None:
        raise RuntimeError("the simulated board has no device tree")

    def remove_device_tree(self, abs_dtbo: str) -> None:
        raise RuntimeError("the simulated board has no device tree")

    # --- the fabric ------------------------------------------------------------------

    def _dma_at(self, address: int) -> tuple[SimulatedAxiDma | None, int]:
        for dma in self.dmas.values():
            if dma.base <= address < dma.base + DMA_WINDOW:
                return dma, address - dma.base
        return None, 0

    def stream(self, idma: str, data: bytes) -> None:
        """Bytes leaving DMA ``idma``'s MM2S channel enter the kernel it feeds."""
        kernel = next((k for k in self.kernels if k.idma == idma), None)
        if kernel is None or self.hang:
            return  # nothing listens: the data is swallowed and no answer ever comes
        kernel.pending += data
        size = kernel.inp.sample_bytes
        count = len(kernel.pending) // size
        out = b"".join(
            kernel.compute(bytes(kernel.pending[i * size : (i + 1) * size])) for i in range(count)
        )
        del kernel.pending[: count * size]
        if count:
            odma = self.dmas[kernel.odma]
            odma.packets.append(out)  # TLAST after the samples of each input transfer
            odma.deliver()

    def pl_clock_mhz(self, index: int) -> float:
        """PL clock ``index`` as the simulated clock controller now generates it."""
        ctrl = self.registers[CRL_APB + 0xC0 + 4 * index]
        pll = self.registers[CRL_APB + 0x20]  # SRCSEL 0: IOPLL
        pll_mhz = REF_CLK_MHZ * ((pll >> 8) & 0x7F) / (2 if pll >> 16 & 1 else 1)
        return pll_mhz / (((ctrl >> 8) & 0x3F) * ((ctrl >> 16) & 0x3F))


def active_board() -> SimulatedPynqBoard:
    """The simulated board, as pynq's discovery found it.

    Raises:
        RuntimeError: pynq probed its devices before this module registered the board.
    """
    device = pynq.Device.active_device
    if not isinstance(device, SimulatedPynqBoard):
        raise RuntimeError(
            f"pynq's active device is {device!r}, not the simulated board: pynq probed its "
            f"devices before tests.pynq_sim was imported"
        )
    return device


# ------------------------------------------------------------------------------ bundle files


def write_hwh(
    path: Path,
    dmas: list[tuple[str, bool, bool]],
    clock_mhz: float = 100.0,
    length_width: int = 26,
) -> None:
    """A minimal hardware handoff: a Zynq UltraScale+ PS whose HPM0 port maps ``dmas``.

    Each DMA is ``(name, has_mm2s, has_s2mm)``, 64 KiB of registers from 0xA0000000 on.
    It holds what pynqmetadata needs to build ``ip_dict`` and ``clock_dict``: the PS's clock
    parameters, a MEMRANGE per DMA, and each DMA's ``c_*`` parameters that pynq's DMA driver
    reads (``length_width``: ``c_sg_length_width``, log2 of the longest transfer).
    """
    ps_params = []
    for i in range(4):
        ps_params += [
            (f"PSU__FPGA_PL{i}_ENABLE", 1 if i == 0 else 0),
            (f"PSU__CRL_APB__PL{i}_REF_CTRL__DIVISOR0", 15),
            (f"PSU__CRL_APB__PL{i}_REF_CTRL__DIVISOR1", 1),
            (f"PSU__CRL_APB__PL{i}_REF_CTRL__SRCSEL", "IOPLL"),
            (f"PSU__CRL_APB__PL{i}_REF_CTRL__ACT_FREQMHZ", clock_mhz),
        ]
    ranges, modules = [], []
    for k, (name, mm2s, s2mm) in enumerate(dmas):
        base = FIRST_DMA_BASE + k * DMA_WINDOW
        ranges.append(
            f'<MEMRANGE ADDRESSBLOCK="Reg" BASENAME="C_BASEADDR" BASEVALUE="0x{base:08X}" '
            f'HIGHNAME="C_HIGHADDR" HIGHVALUE="0x{base + DMA_WINDOW - 1:08X}" '
            f'INSTANCE="{name}" IS_DATA="TRUE" IS_INSTRUCTION="TRUE" '
            f'MASTERBUSINTERFACE="M_AXI_HPM0_FPD" MEMTYPE="REGISTER" '
            f'SLAVEBUSINTERFACE="S_AXI_LITE"/>'
        )
        params = {
            "c_include_mm2s": int(mm2s),
            "c_include_s2mm": int(s2mm),
            "c_include_sg": 0,
            "c_micro_dma": 0,
            "c_sg_length_width": length_width,
            "c_m_axi_mm2s_data_width": 64,
            "c_m_axi_s2mm_data_width": 64,
            "c_include_mm2s_dre": 0,
            "c_include_s2mm_dre": 0,
        }
        modules.append(
            f'<MODULE FULLNAME="/{name}" INSTANCE="{name}" IPTYPE="PERIPHERAL" '
            f'MODCLASS="PERIPHERAL" MODTYPE="axi_dma" VLNV="{AXI_DMA_VLNV}">'
            f"<PARAMETERS>{_params(params)}</PARAMETERS><PORTS/><BUSINTERFACES>"
            f'<BUSINTERFACE BUSNAME="hpm0_{name}" NAME="S_AXI_LITE" TYPE="SLAVE" '
            f'VLNV="xilinx.com:interface:aximm:1.0"/></BUSINTERFACES></MODULE>'
        )
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<EDKSYSTEM EDWVERSION="1.2" VIVADOVERSION="2022.1">'
        '<SYSTEMINFO ARCH="zynquplus" DEVICE="xczu7ev" NAME="edged_sim" PACKAGE="ffvc1156"/>'
        "<EXTERNALPORTS/><EXTERNALINTERFACES/><MODULES>"
        '<MODULE FULLNAME="/zynq_ultra_ps_e_0" INSTANCE="zynq_ultra_ps_e_0" '
        f'IPTYPE="PERIPHERAL" MODCLASS="PROCESSOR" MODTYPE="zynq_ultra_ps_e" VLNV="{PS_VLNV}">'
        f"<PARAMETERS>{_params(dict(ps_params))}</PARAMETERS>"
        f"<MEMORYMAP>{''.join(ranges)}</MEMORYMAP><PORTS/><BUSINTERFACES>"
        '<BUSINTERFACE BUSNAME="hpm0" NAME="M_AXI_HPM0_FPD" TYPE="MASTER" '
        'VLNV="xilinx.com:interface:aximm:1.0"/></BUSINTERFACES></MODULE>'
        f"{''.join(modules)}</MODULES></EDKSYSTEM>\n"
    )


def _params(params: dict[str, Any]) -> str:
    return "".join(f'<PARAMETER NAME="{k}" VALUE="{v}"/>' for k, v in params.items())


def write_bitstream(path: Path, kernels: list[dict[str, Any]]) -> None:
    """A simulated bitstream: the magic line, then the kernels the fabric will run."""
    path.write_bytes(SIM_BITSTREAM_MAGIC + json.dumps({"kernels": kernels}).encode())
