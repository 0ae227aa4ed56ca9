"""GGUF quantized tensors -> the native kernels' layouts, at load time, without a float copy of the model.

    from kernels.gguf_repack import repack, NativeQ4, NativeQ8
    w = repack(raw_rows, "Q4_K", k)     # raw_rows: (N, bytes per row) uint8 from gguf.GGUFReader

Which kernel takes which GGUF type (ggml's block formats, ggml-common.h):

| GGUF type | kernel | how | exact? |
|---|---|---|---|
| Q4_0 (d, 4-bit q): w = d (q - 8) | q4_linear | scale d, min -8d | yes |
| Q4_1 (d, m, 4-bit q): w = d q + m | q4_linear | scale d, min m | yes |
| Q4_K (256-blocks: d, dmin, 8 x 6-bit sc/m): w = d sc_j q - dmin m_j | q4_linear | scale d sc_j, min -dmin m_j, per 32 | scales rounded to fp16: relative error <= 2^-11 per scale |
| Q8_0 (d, int8 q): w = d q | q8_linear | as stored | yes |
| Q5_K, Q6_K, others | q8_linear | dequantised per chunk of rows, re-quantised to Q8_0 | per weight error <= max abs of its group of 32 / 254 (+ fp16 scale rounding), under a tenth of the Q5_K/Q6_K step |

Rows are processed in chunks, so the transient float memory is bounded (CHUNK_ROWS x K floats) whatever the
tensor's size. The Q4 layout needs N % 8 == 0; a Q4 tensor with other N goes to Q8 (padded rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels.quant import Q8Weight, pack_q4

CHUNK_ROWS = 2048       # rows converted at a time (a multiple of 8)
GGML_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12,
                 "Q5_K": 13, "Q6_K": 14, "BF16": 30}
Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
NATIVE_TYPES = Q4_TYPES + ("Q8_0", "Q5_K", "Q6_K", "Q5_0", "Q5_1")   # anything gguf.quants dequantises -> Q8
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(slots=True)
class NativeQ4:
    """q4_linear's layout (kernels/quant.py pack_q4): w = code * scale + min per row and group of 32."""
    q4_packed: Tensor      # (N / 8, K / 32, 4, 32) uint8
    q4_scale_min: Tensor   # (N / 8, K / 32, 2, 8) fp16
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.q4_packed.nbytes + self.q4_scale_min.nbytes


def q8_nbytes(w: Q8Weight) -> int:
    return w.qweight.nbytes + w.scales.nbytes


def target_of(ggml_type: str, n: int) -> str:
    """'q4' or 'q8': the kernel a tensor of this type and row count runs on."""
    return "q4" if ggml_type in Q4_TYPES and n % 8 == 0 else "q8"


def repack(raw: np.ndarray, ggml_type: str, k: int, target: str | None = None,
           use_native: bool = True) -> NativeQ4 | Q8Weight:
    """raw (N, row bytes) uint8 -> the kernel layout `target` ('q4' / 'q8'; default target_of). With the
    extension built the C++ version (kernels/csrc/gguf_repack.cpp) does it, else numpy (the reference)."""
    n = raw.shape[0]
    target = target or target_of(ggml_type, n)
    if k % 32:
        raise ValueError(f"{ggml_type} tensor with {k} inputs: the native kernels need a multiple of 32")
    if target == "q4" and (ggml_type not in Q4_TYPES or n % 8):
        raise ValueError(f"{ggml_type} with {n} rows cannot use the int4 kernel")
    ext = _ext() if use_native and ggml_type in GGML_TYPE_IDS else None
    if ext is not None:
        rows = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1))
        if target == "q4":
            packed, scale_min = ext.gguf_to_q4(rows, GGML_TYPE_IDS[ggml_type], k)
            return NativeQ4(packed, scale_min, n)
        qweight, scales = ext.gguf_to_q8(rows, GGML_TYPE_IDS[ggml_type], k)
        return Q8Weight(qweight, scales, n)
    if target == "q4":
        return _to_q4(raw, ggml_type, k)
    return _to_q8(raw, ggml_type, k)


def _ext():
    from kernels import native

    return native.load()


def _to_q4(raw: np.ndarray, ggml_type: str, k: int) -> NativeQ4:
    n, groups = raw.shape[0], k // 32
    packed = torch.empty(n // 8, groups, 4, 32, dtype=torch.uint8)
    scale_min = torch.empty(n // 8, groups, 2, 8, dtype=torch.float16)
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)
        codes, scale, low = q4_codes(np.asarray(raw[r0:r1]), ggml_type, k)
        p, sm = pack_q4(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(low))
        packed[r0 // 8:r1 // 8], scale_min[r0 // 8:r1 // 8] = p, sm
    return NativeQ4(packed, scale_min, n)


def q4_codes(raw: np.ndarray, ggml_type: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, row bytes) of Q4_0 / Q4_1 / Q4_K -> codes (rows, K) uint8 0..15 and scale, min (rows, K / 32)
    float32 with w = code * scale + min."""
    rows = raw.shape[0]
    if ggml_type in ("Q4_0", "Q4_1"):
        size = 18 if ggml_type == "Q4_0" else 20
        blocks = raw.reshape(rows, k // 32, size)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if ggml_type == "Q4_0":
            low = -8 * d
        else:
            low = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., size - 16:]                                                     # (rows, G, 16)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)                           # element j, j + 16
        return codes.reshape(rows, k), d, low
    assert ggml_type == "Q4_K", ggml_type
    blocks = raw.reshape(rows, k // 256, 144)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)             # (rows, S)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, m = k_scale_min(blocks[..., 4:16])                                             # (rows, S, 8)
    qs = blocks[..., 16:].reshape(rows, k // 256, 4, 32)                               # 4 chunks of 64 inputs
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3)                                     # (rows, S, 4, 2, 32)
    scale = (d[..., None] * sc).reshape(rows, k // 32)
    low = (-dmin[..., None] * m).reshape(rows, k // 32)
    return codes.reshape(rows, k), scale, low


def k_scale_min(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K / Q5_K block -> 8 six-bit (scale, min) pairs (ggml's get_scale_min_k4)."""
    q = q.astype(np.uint8)
    sc = np.empty(q.shape[:-1] + (8,), dtype=np.float32)
    m = np.empty_like(sc)
    sc[..., :4] = q[..., 0:4] & 63
    m[..., :4] = q[..., 4:8] & 63
    sc[..., 4:] = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    m[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return sc, m


def _to_q8(raw: np.ndarray, ggml_type: str, k: int) -> Q8Weight:
    n, groups = raw.shape[0], k // 32
    padded = -(-n // 8) * 8
    qweight = torch.zeros(padded // 8, groups, 8, 32, dtype=torch.int8)
    scales = torch.zeros(padded // 8, groups, 8, dtype=torch.float16)
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)
        codes, d = q8_codes(np.asarray(raw[r0:r1]), ggml_type, k)                       # (rows, K), (rows, G)
        rows = r1 - r0
        pad = -(-rows // 8) * 8
        if pad != rows:
            codes = np.concatenate([codes, np.zeros((pad - rows, k), np.int8)])
            d = np.concatenate([d, np.zeros((pad - rows, groups), np.float16)])
        c = torch.from_numpy(codes).view(pad // 8, 8, groups, 8, 4).permute(0, 2, 3, 1, 4)
        qweight[r0 // 8:r0 // 8 + pad // 8] = c.reshape(pad // 8, groups, 8, 32)
        scales[r0 // 8:r0 // 8 + pad // 8] = torch.from_numpy(d).view(pad // 8, 8, groups).permute(0, 2, 1)
    return Q8Weight(qweight, scales, n)


def q8_codes(raw: np.ndarray, ggml_type: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, row bytes) -> int8 codes (rows, K) and fp16 scales (rows, K / 32): exact for Q8_0, a
    symmetric per-32 re-quantisation of the dequantised weights for every other type."""
    rows = raw.shape[0]
    if ggml_type == "Q8_0":
        blocks = raw.reshape(rows, k // 32, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        return blocks[..., 2:].copy().view(np.int8).reshape(rows, k), d
    w = dequantize(raw, ggml_type, k).reshape(rows, k // 32, 32)
    d = (np.abs(w).max(axis=-1) / 127.0).astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(d.shape, np.float32), where=d > 0)
    codes = np.clip(np.rint(w * inv[..., None]), -127, 127).astype(np.int8)
    return codes.reshape(rows, k), d


def dequantize_rows(raw: np.ndarray, ggml_type: str, k: int) -> Tensor:
    """(rows, row bytes) -> (rows, K) float32 tensor: the C++ converter when built, else the gguf package."""
    ext = _ext() if ggml_type in GGML_TYPE_IDS else None
    if ext is not None:
        rows = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(raw.shape[0], -1))
        return ext.gguf_dequantize(rows, GGML_TYPE_IDS[ggml_type], k)
    return torch.from_numpy(dequantize(raw, ggml_type, k))


def dequantize(raw: np.ndarray, ggml_type: str, k: int) -> np.ndarray:
    """(rows, row bytes) of any GGUF type -> (rows, K) float32, by the gguf package (ggml's reference)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if ggml_type == "F32":
        return np.asarray(raw, dtype=np.float32).reshape(-1, k)
    out = gguf_dequantize(np.asarray(raw), GGMLQuantizationType[ggml_type])
    return np.asarray(out, dtype=np.float32).reshape(-1, k)


# ---- the layouts back to float: the oracle in tests and the path where the extension is missing ----

def q4_to_float(w: NativeQ4) -> Tensor:
    """(N, K) float32 of a NativeQ4 (inverse of pack_q4)."""
    blocks, groups = w.q4_packed.shape[:2]
    p = w.q4_packed.view(blocks, groups, 4, 8, 4)                                      # (b, g, v, row, e)
    low, high = (p & 0x0F), (p >> 4)
    codes = torch.cat([low.permute(0, 3, 1, 2, 4).reshape(blocks, 8, groups, 16),
                       high.permute(0, 3, 1, 2, 4).reshape(blocks, 8, groups, 16)], dim=-1).float()
    sm = w.q4_scale_min.float()                                                        # (b, g, 2, 8)
    scale = sm[:, :, 0].permute(0, 2, 1)[..., None]                                    # (b, row, g, 1)
    low_v = sm[:, :, 1].permute(0, 2, 1)[..., None]
    return (codes * scale + low_v).reshape(blocks * 8, groups * 32)[:w.out_features]


def q4_rows(w: NativeQ4, ids: Tensor) -> Tensor:
    """(T, K) float32 of rows `ids` of a NativeQ4 (a tied model's embedding read from its output layer)."""
    blocks, groups = w.q4_packed.shape[:2]
    b, i = ids // 8, ids % 8
    p = w.q4_packed.view(blocks, groups, 4, 8, 4)[b, :, :, i]                        # (T, g, v, e)
    codes = torch.cat([(p & 0x0F).flatten(2), (p >> 4).flatten(2)], dim=-1).float()   # (T, g, 32)
    sm = w.q4_scale_min[b, :, :, i].float()                                           # (T, g, 2)
    return (codes * sm[..., 0:1] + sm[..., 1:2]).flatten(1)


def q8_rows(w: Q8Weight, ids: Tensor) -> Tensor:
    """(T, K) float32 of rows `ids` of a Q8Weight."""
    blocks, groups = w.qweight.shape[:2]
    b, i = ids // 8, ids % 8
    codes = w.qweight.view(blocks, groups, 8, 8, 4)[b, :, :, i].flatten(2).float()   # (T, g, 32)
    return (codes * w.scales[b, :, i].float()[..., None]).flatten(1)


def q8_to_float(w: Q8Weight) -> Tensor:
    """(N, K) float32 of a Q8Weight (inverse of its layout)."""
    blocks, groups = w.qweight.shape[:2]
    codes = w.qweight.view(blocks, groups, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(blocks, 8, groups, 32).float()
    scale = w.scales.float().permute(0, 2, 1)[..., None]                               # (b, row, g, 1)
    return (codes * scale).reshape(blocks * 8, groups * 32)[:w.out_features]
