"""GGUF files: a fast header/metadata parser plus dequantization through the `gguf` package.

`gguf.GGUFReader` builds a Python object per array element, which costs ~15 s
on the 262,144-token vocabulary; this parser reads the same header in well
under a second and memory-maps the tensor data. Dequantization (F32, F16,
BF16, Q8_0, Q5_0, Q4_K, Q6_K, ...) is `gguf.quants.dequantize`.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first): the reverse of ggml's ne
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """Metadata (`fields`) and tensors (`tensors`, `read(name)`) of one GGUF file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, KeyError, ValueError) as e:
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt header): {e}") from e

    # -------------------------------------------------------------- low level
    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ValueError(f"unexpected end of file at byte {self._pos} (wanted {n} more bytes)")
        out = self._data[self._pos:self._pos + n].tobytes()
        self._pos += n
        return out

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(size))[0]

    def _string(self) -> str:
        return self._take(self._unpack("<Q")).decode("utf-8")

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._unpack("<I"), self._unpack("<Q")
            if item_type == _STRING:
                return [self._string() for _ in range(count)]
            if item_type not in _SCALARS:
                raise ValueError(f"unsupported GGUF array item type {item_type}")
            dt = np.dtype(_SCALARS[item_type])
            return np.frombuffer(self._take(dt.itemsize * count), dt).tolist()
        if vtype not in _SCALARS:
            raise ValueError(f"unsupported GGUF value type {vtype}")
        dt = np.dtype(_SCALARS[vtype])
        return np.frombuffer(self._take(dt.itemsize), dt)[0].item()

    def _parse(self) -> None:
        if self._take(4) != _MAGIC:
            raise ValueError("bad magic (expected b'GGUF')")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ndim = self._unpack("<I")
            ne = [self._unpack("<Q") for _ in range(ndim)]
            qtype = GGMLQuantizationType(self._unpack("<I"))
            infos.append((name, tuple(reversed(ne)), qtype, self._unpack("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * type_size
            info = TensorInfo(name, shape, qtype, start + offset, nbytes)
            if info.offset + nbytes > len(self._data):
                raise ValueError(f"tensor {name!r} ends at byte {info.offset + nbytes} but the file has only "
                                 f"{len(self._data)} bytes (truncated download?)")
            self.tensors[name] = info

    # -------------------------------------------------------------- public
    @property
    def architecture(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` dequantized to float32, numpy (row-major) shape."""
        info = self.tensors[name]
        raw = self._data[info.offset:info.offset + info.nbytes]
        if info.qtype == GGMLQuantizationType.F32:
            return np.asarray(raw.view(np.float32).reshape(info.shape))
        raw = raw.reshape(quant_shape_to_byte_shape(info.shape, info.qtype))
        return np.asarray(dequantize(raw, info.qtype), np.float32).reshape(info.shape)
