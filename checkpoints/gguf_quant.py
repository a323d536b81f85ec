"""GGUF block types -> our quantized formats (kernels/quantized.py), exactly.

Each served type is held by the format whose arithmetic reproduces gguf's dequantization bit
for bit (the products s * q below are exact in float32, so s * q - m rounds once either way):

    Q8_0  d * q                    -> int8, groups of 32, scale d (float16)
    Q5_0  d * (q - 16)             -> int8, groups of 32, scale d (float16)
    Q6_K  (d * sc) * (q - 32)      -> int8, groups of 16, scale d * sc (float32)
    Q4_0  d * (q - 8)              -> int4, scale d, minimum 8 d (float32)
    Q4_1  d * q + m                -> int4, scale d, minimum -m (float32)
    Q4_K  (d * sc) * q - dmin * mn -> int4, scale d * sc, minimum dmin * mn (float32)

Each function takes the raw blocks of some whole rows, [blocks, bytes per block], and returns
(data, scale, minimum or None) per block: data int8 [blocks, values] or packed int4 uint8
[blocks, values / 2], scale and minimum [blocks, groups].
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from kernels.quantized import pack_int4


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float32 [blocks, 1]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def q8_0(blocks):
    return blocks[:, 2:].view(np.int8), blocks[:, :2].copy().view(np.float16), None


def q5_0(blocks):
    high = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little") << 4
    low = blocks[:, 6:]
    q = np.concatenate([low & 0x0F, low >> 4], axis=1) | high
    return q.view(np.int8) - np.int8(16), blocks[:, :2].copy().view(np.float16), None


def q6_k(blocks):
    n = blocks.shape[0]
    ql, qh, sc = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    ql = ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(n, -1, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)
    return q.reshape(n, 256), _f16(blocks, 208) * sc.view(np.int8).astype(np.float32), None


def q4_0(blocks):
    d = _f16(blocks, 0)
    return blocks[:, 2:], d, 8 * d  # Q4_0's nibble order is ours: byte j = value j | value j + 16 << 4


def q4_1(blocks):
    return blocks[:, 4:], _f16(blocks, 0), -_f16(blocks, 2)


def q4_k(blocks):
    n = blocks.shape[0]
    sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16])  # the 6-bit sub-block scales and minima
    # 4 chunks of 32 bytes: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & np.uint8(0x0F)).reshape(n, 256)
    return pack_int4(q), _f16(blocks, 0) * sc.astype(np.float32), _f16(blocks, 2) * mn.astype(np.float32)


# type -> (bits, group, converter)
FORMATS = {T.Q8_0: (8, 32, q8_0), T.Q5_0: (8, 32, q5_0), T.Q6_K: (8, 16, q6_k),
           T.Q4_0: (4, 32, q4_0), T.Q4_1: (4, 32, q4_1), T.Q4_K: (4, 32, q4_k)}
