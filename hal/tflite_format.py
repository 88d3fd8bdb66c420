"""Read what a .tflite file declares without loading a runtime: its operator codes.

A TFLite model is a FlatBuffer (schema ``tflite/schema.fbs``, file identifier ``TFL3``). The
Edge TPU compiler replaces the part of the graph it compiled with one custom operator named
``edgetpu-custom-op``; a runtime without libedgetpu cannot run such a model. This reader walks
only the few tables it needs (Model.operator_codes -> OperatorCode.custom_code), checks every
offset against the file's length, and needs neither LiteRT nor the flatbuffers package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
FILE_IDENTIFIER = b"TFL3"
CUSTOM = 32
"""BuiltinOperator.CUSTOM in the TFLite schema."""

# Field numbers in the schema (table Model / table OperatorCode).
_MODEL_OPERATOR_CODES = 1
_OPCODE_DEPRECATED_BUILTIN = 0
_OPCODE_CUSTOM_CODE = 1
_OPCODE_VERSION = 2
_OPCODE_BUILTIN = 3
_MAX_OPERATOR_CODES = 1 << 16


class NotTfliteError(ValueError):
    """The bytes are not a TFLite FlatBuffer (or are cut short)."""


@dataclass(frozen=True)
class OperatorCode:
    """One entry of Model.operator_codes."""

    builtin_code: int
    custom_code: str
    version: int


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def _unpack(self, fmt: str, pos: int) -> int:
        try:
            (value,) = struct.unpack_from(fmt, self.data, pos)
        except struct.error:
            end = len(self.data)
            raise NotTfliteError(f"offset {pos} runs past the end ({end} bytes)") from None
        return int(value)

    def i8(self, pos: int) -> int:
        return self._unpack("<b", pos)

    def u16(self, pos: int) -> int:
        return self._unpack("<H", pos)

    def i32(self, pos: int) -> int:
        return self._unpack("<i", pos)

    def u32(self, pos: int) -> int:
        return self._unpack("<I", pos)

    def field(self, table: int, number: int) -> int | None:
        """Absolute position of a table's field, or None when it is absent (default)."""
        vtable = table - self.i32(table)
        vtable_len = self.u16(vtable)
        slot = 4 + 2 * number
        if slot + 2 > vtable_len:
            return None
        offset = self.u16(vtable + slot)
        return table + offset if offset else None

    def indirect(self, pos: int) -> int:
        target = pos + self.u32(pos)
        if target >= len(self.data):
            raise NotTfliteError(f"offset at {pos} points past the end")
        return target

    def vector(self, pos: int) -> tuple[int, int]:
        """(position of the first element, element count) of the vector referenced at pos."""
        start = self.indirect(pos)
        return start + 4, self.u32(start)

    def string(self, pos: int) -> str:
        start, length = self.vector(pos)
        raw = self.data[start : start + length]
        if len(raw) != length:
            raise NotTfliteError(f"string at {pos} runs past the end")
        return raw.decode("utf-8", errors="replace")


def operator_codes(data: bytes) -> list[OperatorCode]:
    """Model.operator_codes of the TFLite FlatBuffer ``data``.

    Raises:
        NotTfliteError: ``data`` is not a TFLite FlatBuffer, or an offset runs past its end.
    """
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise NotTfliteError("no TFL3 file identifier: not a TFLite FlatBuffer")
    r = _Reader(data)
    model = r.indirect(0)
    pos = r.field(model, _MODEL_OPERATOR_CODES)
    if pos is None:
        return []
    first, count = r.vector(pos)
    if count > _MAX_OPERATOR_CODES:
        raise NotTfliteError(f"{count} operator codes: not a TFLite FlatBuffer")
    codes = []
    for i in range(count):
        table = r.indirect(first + 4 * i)
        custom_pos = r.field(table, _OPCODE_CUSTOM_CODE)
        builtin_pos = r.field(table, _OPCODE_BUILTIN)
        deprecated_pos = r.field(table, _OPCODE_DEPRECATED_BUILTIN)
        version_pos = r.field(table, _OPCODE_VERSION)
        # Since schema 3a the real code is builtin_code; old files set only the int8 field.
        builtin = max(
            r.i32(builtin_pos) if builtin_pos is not None else 0,
            r.i8(deprecated_pos) if deprecated_pos is not None else 0,
        )
        codes.append(
            OperatorCode(
                builtin_code=builtin,
                custom_code=r.string(custom_pos) if custom_pos is not None else "",
                version=r.i32(version_pos) if version_pos is not None else 1,
            )
        )
    return codes


def custom_ops(path: Path) -> list[str]:
    """Names of the custom operators the model at ``path`` declares.

    Raises:
        OSError: the file cannot be read.
        NotTfliteError: it is not a TFLite FlatBuffer.
    """
    return [c.custom_code for c in operator_codes(path.read_bytes()) if c.builtin_code == CUSTOM]


def is_edgetpu_model(path: Path) -> bool:
    """Whether the model at ``path`` was compiled for the Edge TPU: it declares the
    ``edgetpu-custom-op`` custom operator.

    Raises:
        OSError: the file cannot be read.
        NotTfliteError: it is not a TFLite FlatBuffer.
    """
    return EDGETPU_CUSTOM_OP in custom_ops(path)
