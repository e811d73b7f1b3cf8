"""The GGUF reader behind GGUFCheckpoint: gguf's own GGUFReader for the tensor table, with
the key/value metadata parsed here into plain Python values (``reader.meta``).

gguf's reader keeps several numpy views per value of every metadata array: for a 49k-token
vocabulary with its merges that is ~10^6 small objects, ~70 MB of memory that glibc and
Python's allocator mostly keep after they are freed (SmolLM2: the process held 47 MB more
after loading its metadata), a large part of a small quantized model's footprint. Here a
string array is one list of str, read with ``struct`` straight from the memory map, and
only when asked for: arrays longer than LAZY_ITEMS stay in the file until then.
"""

from __future__ import annotations

import struct
from typing import Any

import gguf
import numpy as np
from gguf.gguf_reader import ReaderField

# GGUF value types -> struct codes (8 string and 9 array are read by _value)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (a vocabulary, its merges) are read when asked for, not kept.
LAZY_ITEMS = 4096


class Lazy:
    """A long metadata array left in the file: ``n`` values of GGUF type ``vtype`` (an
    array type) at ``offset``; ``Reader.read(lazy)`` reads it."""

    def __init__(self, offset: int, vtype: int, n: int) -> None:
        self.offset, self.vtype, self.n = offset, vtype, n

    def __len__(self) -> int:
        return self.n


def _skip_strings(buf: memoryview, offs: int, n: int) -> int:
    """The offset after n strings at offs, reading only their lengths."""
    for _ in range(n):
        (length,) = struct.unpack_from("<Q", buf, offs)
        offs += 8 + length
    if offs > len(buf):
        raise ValueError("a string array runs past the end of the file")
    return offs


def _string(buf: memoryview, offs: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, offs)
    end = offs + 8 + n
    if end > len(buf):
        raise ValueError(f"a string of {n} bytes at offset {offs} runs past the end of the file")
    return str(buf[offs + 8:end], encoding="utf-8"), end


def _value(buf: memoryview, offs: int, vtype: int) -> tuple[Any, int]:
    """One metadata value of GGUF type ``vtype`` at ``offs``: (value, offset after it)."""
    if vtype == _STRING:
        return _string(buf, offs)
    if vtype == _ARRAY:
        itype, n = struct.unpack_from("<IQ", buf, offs)
        offs += 12
        if itype in _SCALARS:
            fmt = f"<{n}{_SCALARS[itype]}"
            return list(struct.unpack_from(fmt, buf, offs)), offs + struct.calcsize(fmt)
        if itype == _STRING:
            out = []
            for _ in range(n):
                s, offs = _string(buf, offs)
                out.append(s)
            return out, offs
        values = []
        for _ in range(n):  # arrays of arrays: rare, read one by one
            v, offs = _value(buf, offs, itype)
            values.append(v)
        return values, offs
    if vtype not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {vtype} at offset {offs}")
    fmt = "<" + _SCALARS[vtype]
    return struct.unpack_from(fmt, buf, offs)[0], offs + struct.calcsize(fmt)


class Reader(gguf.GGUFReader):
    """GGUFReader reading through a plain ndarray view of its memmap (still memory-mapped),
    with the metadata in ``meta`` ({key: value}; ``fields`` holds only the header and
    general.alignment, which GGUFReader itself checks).

    np.memmap's per-slice bookkeeping makes parsing ~3x slower than a plain view (SmolLM2:
    5.7 s -> 2.0 s to open with gguf's parser). If a gguf release renames ``_get`` or
    ``_build_fields`` these overrides are simply never called (``meta`` then comes from
    ``fields``: see ``metadata``)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        if isinstance(self.data, np.memmap):
            self.data = self.data.view(np.ndarray)
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        if self.byte_order == "S":  # a big-endian file: gguf's own parser
            return super()._build_fields(offs, count)
        buf = memoryview(self.data)
        self.meta: dict[str, Any] = {}
        for _ in range(int(count)):
            start = offs
            key, offs = _string(buf, offs)
            (vtype,) = struct.unpack_from("<I", buf, offs)
            value, offs = self._field_value(buf, offs + 4, vtype)
            self.meta[key] = value
            if key == "general.alignment":  # GGUFReader.__init__ reads it from fields
                part = np.array([value], dtype=np.uint32 if vtype == 4 else np.int64)
                self.fields[key] = ReaderField(start, key, [part], [0],
                                               [gguf.GGUFValueType(vtype)])
        return offs


    def _field_value(self, buf: memoryview, offs: int, vtype: int) -> tuple[Any, int]:
        """A value, or for a long array of strings or numbers a ``Lazy`` in its place."""
        if vtype == _ARRAY:
            itype, n = struct.unpack_from("<IQ", buf, offs)
            if n > LAZY_ITEMS and (itype == _STRING or itype in _SCALARS):
                end = (_skip_strings(buf, offs + 12, n) if itype == _STRING
                       else offs + 12 + n * struct.calcsize("<" + _SCALARS[itype]))
                if end > len(buf):
                    raise ValueError(f"an array at offset {offs} runs past the end of the file")
                return Lazy(offs, vtype, n), end
        return _value(buf, offs, vtype)

    def read(self, value: Any) -> Any:
        """A metadata value, reading a ``Lazy`` array from the file now."""
        if isinstance(value, Lazy):
            return _value(memoryview(self.data), value.offset, value.vtype)[0]
        return value


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """{key: value} of a reader's metadata (``Reader.meta`` when it parsed it: long arrays
    are ``Lazy`` there, for ``Reader.read``)."""
    meta = getattr(reader, "meta", None)
    if meta is None:
        meta = {k: f.contents() for k, f in reader.fields.items()}
    return meta
