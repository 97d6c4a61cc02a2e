"""A small, bounded reader for GGUF files: metadata as plain Python values, tensors as views
of one read-only memory map.

The `gguf` package's reader keeps a numpy view per metadata element: for a 49k-token
vocabulary that is ~160 MiB of small objects and seconds of parsing, and several times
that for a 262k-token one, all to read a few megabytes of strings. This reader reads each
value once into a Python object and maps the tensor data without copying it. It trusts no
size in the file: every count and length is checked against the bytes that remain before
anything is allocated, so a truncated or hostile file gives one ValueError naming what is
wrong. The `gguf` package stays the oracle in the tests and supplies the type tables.

Layout (little-endian): magic "GGUF", version (u32, 2 or 3), tensor count (u64), metadata
count (u64); metadata as (key string, value type u32, value); tensor infos as (name
string, n_dims u32, dims u64 x n_dims, type u32, offset u64); then, aligned to
`general.alignment` (32 by default), the tensor data, each offset relative to its start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

# metadata value types: id -> (struct code, size) for the fixed-size ones
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),  # uint8
    1: ("<b", 1),  # int8
    2: ("<H", 2),  # uint16
    3: ("<h", 2),  # int16
    4: ("<I", 4),  # uint32
    5: ("<i", 4),  # int32
    6: ("<f", 4),  # float32
    7: ("<?", 1),  # bool
    10: ("<Q", 8),  # uint64
    11: ("<q", 8),  # int64
    12: ("<d", 8),  # float64
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9

# element types whose tensor data reads as numbers; every other type reads as raw bytes
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: `shape` in GGUF order (fastest-varying dimension first, as ggml's ne[]),
    `data` a read-only view of the file shaped row-major (numbers for float/int types, bytes
    per row for block-quantized ones, as the `gguf` package lays them out)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray


class _Cursor:
    """Reads forward through the mapped file; every read checks that its bytes exist."""

    def __init__(self, buf: np.ndarray, source: Path):
        self.view = memoryview(buf)  # slices of a memoryview decode and unpack without copying
        self.pos, self.source = 0, source
        self.end = len(buf)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.source}: not a readable GGUF file: {what} at byte {self.pos} (truncated or corrupt?)")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            raise self.fail(f"{what} needs {n} bytes but {self.end - self.pos} remain")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, code: str, size: int, what: str) -> Any:
        if size > self.end - self.pos:
            raise self.fail(f"{what} needs {size} bytes but {self.end - self.pos} remain")
        value = struct.unpack_from(code, self.view, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str) -> str:
        raw = self.take(self.u64(f"{what} length"), what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            code, size = _SCALARS[vtype]
            return self.scalar(code, size, what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth > 0:
                raise self.fail(f"{what} is an array of arrays, which qkv does not read")
            etype, count = self.u32(f"{what} element type"), self.u64(f"{what} count")
            if etype in _SCALARS:  # numbers: one vectorised read
                size = _SCALARS[etype][1]
                if count > (self.end - self.pos) // size:
                    raise self.fail(f"{what} declares {count} elements, more than the file holds")
                arr = np.frombuffer(self.take(count * size, what), dtype=_NUMPY[etype])
                return arr.tolist()
            if etype == STRING:
                if count > (self.end - self.pos) // 8:  # each string takes at least its 8-byte length
                    raise self.fail(f"{what} declares {count} strings, more than the file holds")
                return [self.string(what) for _ in range(count)]
            if etype == ARRAY:
                raise self.fail(f"{what} is an array of arrays, which qkv does not read")
            raise self.fail(f"{what} has unknown element type {etype}")
        raise self.fail(f"{what} has unknown value type {vtype}")


class GGUFFile:
    """The metadata (`fields`: key -> value) and tensors of one GGUF file. The tensor views
    keep the file mapped; drop the object (and the views) to unmap it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.stat().st_size < 24:
            raise ValueError(f"{self.path}: not a GGUF file (only {self.path.stat().st_size} bytes)")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(self.data, self.path)
        if bytes(cur.take(4, "magic")) != MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (no GGUF magic at the start)")
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3){hint}")
        n_tensors, n_fields = cur.u64("tensor count"), cur.u64("metadata count")
        if n_tensors > cur.end // 24 or n_fields > cur.end // 12:  # the least bytes each entry takes
            raise cur.fail(f"{n_tensors} tensors and {n_fields} metadata entries cannot fit in {cur.end} bytes")

        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cur.string("metadata key")
            if key in self.fields:
                raise cur.fail(f"metadata key {key!r} appears twice")
            self.fields[key] = cur.value(cur.u32(f"{key} type"), key)

        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.u32(f"{name} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = tuple(cur.u64(f"{name} dims") for _ in range(n_dims))
            type_id = cur.u32(f"{name} type")
            try:
                ttype = GGMLQuantizationType(type_id)
            except ValueError:
                raise cur.fail(f"tensor {name!r} has unknown type {type_id}") from None
            infos.append((name, dims, ttype, cur.u64(f"{name} offset")))

        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
        start = -(-cur.pos // alignment) * alignment
        self.tensors = [self._tensor(name, dims, ttype, start + offset) for name, dims, ttype, offset in infos]
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{self.path}: GGUF tensor {dup!r} appears twice; the file is corrupt")

    def _tensor(self, name: str, dims: tuple[int, ...], ttype: GGMLQuantizationType, offset: int) -> GGUFTensor:
        block, type_size = GGML_QUANT_SIZES[ttype]
        n = 1
        for d in dims:
            n *= d
        if n == 0 or n % block or dims[0] % block:
            raise ValueError(
                f"{self.path}: GGUF tensor {name!r} has shape {list(dims)}, which {ttype.name} "
                f"blocks of {block} cannot hold; the file is corrupt"
            )
        n_bytes = n // block * type_size
        if offset + n_bytes > len(self.data):
            raise ValueError(
                f"{self.path}: not a readable GGUF file: tensor {name!r} ({ttype.name}, {n_bytes} bytes at byte "
                f"{offset}) ends past the end of the file ({len(self.data)} bytes); it is truncated, download or "
                "export it again"
            )
        rows = tuple(reversed(dims))
        raw = self.data[offset : offset + n_bytes]
        if ttype in _ELEMENT_DTYPES:
            view = raw.view(_ELEMENT_DTYPES[ttype]).reshape(rows)
        else:  # block-quantized: the bytes of each row of ne[0] elements
            view = raw.reshape(*rows[:-1], dims[0] // block * type_size)
        return GGUFTensor(name, ttype, dims, n, n_bytes, offset, view)
