"""GGUF files: a fast header/metadata parser and whole-tensor dequantization.

`gguf.GGUFReader` builds a Python object per array element, which costs ~15 s
on the 262,144-token vocabulary; this parser reads the same header in ~0.2 s
(struct.unpack_from on a plain buffer) and memory-maps the tensor data.

Dequantization uses the `gguf` package's per-type block formulas
(`dequantize_blocks`), applied to a whole tensor at once: `gguf.quants.dequantize`
applies them 16 rows at a time, which took 3 s of the 270M's load (2 of them on
the Q8_0 embedding). Q8_0 and Q5_0, the 270M's main types, dequantize as scale * q from
checkpoints.gguf_quant's exact int8 conversions (the same arithmetic, leaner). Results are bitwise the package's.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from checkpoints import gguf_quant

_MAGIC = b"GGUF"
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_CHUNK_BYTES = 4 << 20  # raw bytes dequantized at a time by read(out=...)
_FLOATS = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


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
        self._buf = memoryview(self._data)  # struct.unpack_from on it: ~10x faster than slicing the memmap
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, KeyError, ValueError) as e:
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt header): {e}") from e

    # -------------------------------------------------------------- low level
    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._buf):
            raise ValueError(f"unexpected end of file at byte {self._pos} (wanted {n} more bytes)")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _u32(self) -> int:
        self._pos += 4
        return _U32.unpack_from(self._buf, self._pos - 4)[0]

    def _u64(self) -> int:
        self._pos += 8
        return _U64.unpack_from(self._buf, self._pos - 8)[0]

    def _string(self) -> str:
        return str(self._take(self._u64()), "utf-8")

    def _strings(self, count: int) -> list[str]:
        """`count` strings in a row (the vocabulary: 262k of them), in one tight loop."""
        buf, pos, end, out = self._buf, self._pos, len(self._buf), []
        for _ in range(count):
            n = _U64.unpack_from(buf, pos)[0]
            pos += 8
            if pos + n > end:
                raise ValueError(f"unexpected end of file at byte {pos} (a string of {n} bytes)")
            out.append(str(buf[pos:pos + n], "utf-8"))
            pos += n
        self._pos = pos
        return out

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._u32(), self._u64()
            if item_type == _STRING:
                return self._strings(count)
            if item_type not in _SCALARS:
                raise ValueError(f"unsupported GGUF array item type {item_type}")
            dt = np.dtype(_SCALARS[item_type])
            return np.frombuffer(self._take(dt.itemsize * count), dt).tolist()
        if vtype not in _SCALARS:
            raise ValueError(f"unsupported GGUF value type {vtype}")
        dt = np.dtype(_SCALARS[vtype])
        return np.frombuffer(self._take(dt.itemsize), dt)[0].item()

    def _parse(self) -> None:
        if bytes(self._take(4)) != _MAGIC:
            raise ValueError("bad magic (expected b'GGUF')")
        version = self._u32()
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_fields = self._u64(), self._u64()
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ndim = self._u32()
            ne = [self._u64() for _ in range(ndim)]
            qtype = GGMLQuantizationType(self._u32())
            infos.append((name, tuple(reversed(ne)), qtype, self._u64()))
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

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (a read-only view of the mapped file)."""
        info = self.tensors[name]
        return self._data[info.offset:info.offset + info.nbytes]

    def release(self, name: str) -> None:
        """Drops the file's pages under tensor `name` from this process (they count in its RSS until
        the kernel reclaims them); a later read maps them in again."""
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start, end = -(-info.offset // page) * page, (info.offset + info.nbytes) // page * page
        handle = getattr(self._data, "_mmap", None)
        if end > start and handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name` dequantized to float32, numpy (row-major) shape.

        With `out` (C-contiguous, the tensor's shape, any float dtype) the values are
        written there a few MB of rows at a time, so a large tensor needs no float32
        copy of itself.
        """
        info = self.tensors[name]
        raw = self.raw(name)
        if out is None:
            return dequantize(raw, info.qtype, info.shape)
        if out.shape != info.shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous of shape {info.shape} for tensor {name!r}, "
                             f"got shape {out.shape}")
        _check_blocks(info.qtype, info.shape)
        rows = out.reshape(info.shape[0] if out.ndim > 1 else 1, -1)  # a view of out
        row_bytes = info.nbytes // len(rows)
        step = max(1, _CHUNK_BYTES // row_bytes)
        for r in range(0, len(rows), step):
            part = raw[r * row_bytes:(r + step) * row_bytes]
            np.copyto(rows[r:r + step], dequantize(part, info.qtype, (-1, rows.shape[1])), casting="unsafe")
        return out


def _check_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        raise ValueError(f"{qtype.name} tensor rows of {shape[-1]} values are not whole {block}-value blocks")


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of `shape` from the raw bytes of one tensor (bitwise `gguf.quants.dequantize`)."""
    if qtype in _FLOATS:
        return raw.view(_FLOATS[qtype]).reshape(shape).astype(np.float32)
    if qtype == GGMLQuantizationType.BF16:  # bf16 is the top half of an f32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    _check_blocks(qtype, shape)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    if qtype in _FAST:
        return _FAST[qtype](blocks).reshape(shape)
    formula = getattr(quants, qtype.name, None)
    if formula is None or not hasattr(formula, "dequantize_blocks"):
        raise ValueError(f"GGUF tensor type {qtype.name} cannot be dequantized by the installed gguf package")
    formula.init_grid()  # the lookup table of the i-quants (a no-op for the others)
    return formula.dequantize_blocks(blocks).reshape(shape)


def _int8_blocks(convert):
    """A dequantizer from a checkpoints.gguf_quant int8 converter: scale * q, as gguf computes it."""
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        q, scale, _ = convert(blocks)
        out = np.empty(q.shape, np.float32)
        return np.multiply(q, scale.astype(np.float32), out=out)
    return dequantize_blocks


_FAST = {GGMLQuantizationType.Q8_0: _int8_blocks(gguf_quant.q8_0),
         GGMLQuantizationType.Q5_0: _int8_blocks(gguf_quant.q5_0)}
