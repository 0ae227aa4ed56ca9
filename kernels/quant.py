"""Weight-only quantization for linear layers: int8 (per-output-channel symmetric scales) and int4
(asymmetric, per group of 32 input channels, like llama.cpp's Q4).

Small-batch decode on a CPU streams every weight from DRAM once per step, so it is bound by memory
bandwidth: int8 weights read 4x fewer bytes than fp32, int4 8x. On the CPU the products run in
torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` (bf16 activations); elsewhere the
weights are dequantized per call (correct, not fast). Measured here (2 AVX2 cores): int8 decode is
1.9-2x faster at batch 1-8 than fp32 on SmolLM2-135M; int4 figures are in bench/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(slots=True)
class Int8Weight:
    qweight: Tensor   # (N, K) int8
    scales: Tensor    # (N,) bf16 on CPU (the kernel's dtype), fp32 elsewhere


def quantize_int8(weight: Tensor) -> Int8Weight:
    """Symmetric per-row quantization: w ≈ qweight * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)                    # (N,)
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    dtype = torch.bfloat16 if weight.device.type == "cpu" else torch.float32
    return Int8Weight(qweight, scales.to(dtype))


def int8_linear(x: Tensor, weight: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """x (M, K) float -> (M, N) in x's dtype. NOTE: torch 2.13's CPU _weight_int8pack_mm crashes (SIGSEGV) when K
    is not a multiple of 16 (measured: K = 8, 20, 24, 40, 72); such layers (tiny test models, MLA's LoRA ranks)
    multiply the dequantised weight instead."""
    if x.device.type == "cpu" and x.shape[1] % 16 == 0:
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), weight.qweight, weight.scales).to(x.dtype)
    else:
        y = torch.nn.functional.linear(x, weight.qweight.to(x.dtype) * weight.scales[:, None].to(x.dtype))
    return y if bias is None else y + bias


NATIVE_MAX_K = 65536   # the native kernels' largest input width (kMaxGroups * 32 in cpu_model.cpp)


@dataclass(slots=True)
class Q8Weight:
    """int8 per group of 32 inputs (llama.cpp's Q8_0) in the native kernel q8_linear's layout: rows in
    blocks of 8 (zero rows pad N to a multiple of 8), vector v of block b and group g holds inputs
    32g + 4v .. 32g + 4v + 3 of each of its 8 rows (byte 4i + e of row 8b + i)."""
    qweight: Tensor   # (ceil(N / 8), K // 32, 8, 32) int8
    scales: Tensor    # (ceil(N / 8), K // 32, 8) fp16: w = qweight * scale
    out_features: int  # N: q8_linear's output columns beyond it are padding


def quantize_q8(weight: Tensor) -> Q8Weight:
    """Symmetric per-group quantization, groups of 32 inputs: exact for a weight that was Q8_0."""
    n, k = weight.shape
    assert k % 32 == 0, "q8 needs K % 32 == 0"
    padded = -(-n // 8) * 8
    w = torch.zeros(padded, k // 32, 32)
    w[:n] = weight.detach().float().view(n, k // 32, 32)
    scales = (w.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float16).float().clamp(min=1e-10)
    codes = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)                 # (N', G, 32)
    blocks, groups = padded // 8, k // 32
    qweight = codes.view(blocks, 8, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(blocks, groups, 8, 32)
    block_scales = scales[..., 0].view(blocks, 8, groups).permute(0, 2, 1)
    return Q8Weight(qweight.contiguous(), block_scales.to(torch.float16).contiguous(), n)


INT4_GROUP_SIZE = 32


@dataclass(slots=True)
class Int4Weight:
    packed: Tensor         # CPU: torch's int4pack layout; elsewhere (N, K) uint8 codes 0..15
    scales_zeros: Tensor   # (K // group, N, 2): w = (code - 8) * scale + zero, bf16 on CPU
    group_size: int
    # CPU, group 32, N % 8 == 0: the same codes in the native kernel's layout (kernels/csrc/cpu_model.cpp q4_linear):
    q4_packed: Tensor | None = None      # (N // 8, K // 32, 4, 32) uint8: 8 rows x 4 inputs per 32 bytes, see pack_q4
    q4_scale_min: Tensor | None = None   # (N // 8, K // 32, 2, 8) fp16: w = code * scale + min


def int4_supported(weight: Tensor, group_size: int = INT4_GROUP_SIZE) -> bool:
    return weight.dim() == 2 and weight.shape[1] % group_size == 0 and weight.shape[0] % 16 == 0


def quantize_int4(weight: Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """Asymmetric per-group quantization: each group of `group_size` inputs of a row maps its
    [min, max] onto the 16 codes."""
    assert int4_supported(weight, group_size), f"int4 needs K % {group_size} == 0 and N % 16 == 0"
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-10)                                   # (N, G, 1)
    codes = torch.round((w - low) / scale).clamp_(0, 15).view(n, k)
    # the kernel's zero point is the value of code 8
    scales_zeros = torch.stack([scale[..., 0].t(), (low + 8 * scale)[..., 0].t()], dim=-1)  # (G, N, 2)
    if weight.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        result = Int4Weight(packed, scales_zeros.to(torch.bfloat16).contiguous(), group_size)
        if group_size == 32 and k <= NATIVE_MAX_K:  # N % 8 == 0 holds: int4 needs N % 16 == 0
            result.q4_packed, result.q4_scale_min = pack_q4(codes.to(torch.uint8), scale[..., 0], low[..., 0])
        return result
    return Int4Weight(codes.to(torch.uint8), scales_zeros.contiguous(), group_size)


def pack_q4(codes: Tensor, scale: Tensor, low: Tensor) -> tuple[Tensor, Tensor]:
    """codes (N, K) uint8 0..15, scale and low (N, K // 32) -> q4_linear's (packed, scale_min). Rows go in
    blocks of 8; for block b, group g and vector v, byte 4i + e holds row 8b + i's code of input
    32g + 4v + e (low nibble) and of input 32g + 16 + 4v + e (high nibble)."""
    n, k = codes.shape
    blocks, groups = n // 8, k // 32
    c = codes.view(blocks, 8, groups, 32).permute(0, 2, 1, 3)                    # (b, g, row, 32)
    low_half = c[..., :16].reshape(blocks, groups, 8, 4, 4).permute(0, 1, 3, 2, 4)   # (b, g, v, row, e)
    high_half = c[..., 16:].reshape(blocks, groups, 8, 4, 4).permute(0, 1, 3, 2, 4)
    packed = (low_half | (high_half << 4)).reshape(blocks, groups, 4, 32).contiguous()
    per_block = [t.reshape(blocks, 8, groups).permute(0, 2, 1) for t in (scale, low)]  # (b, g, row)
    return packed, torch.stack(per_block, dim=2).to(torch.float16).contiguous()


def dequantize_int4(weight: Int4Weight, codes: Tensor) -> Tensor:
    """(N, K) float weight from codes (N, K) and the scales (the oracle for the CPU kernel)."""
    n, k = codes.shape
    scale = weight.scales_zeros[..., 0].float().t().repeat_interleave(weight.group_size, dim=1)  # (N, K)
    zero = weight.scales_zeros[..., 1].float().t().repeat_interleave(weight.group_size, dim=1)
    return (codes.float() - 8) * scale + zero


def int4_linear(x: Tensor, weight: Int4Weight, bias: Tensor | None = None) -> Tensor:
    """x (M, K) float -> (M, N) in x's dtype."""
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight.packed, weight.group_size,
                                                       weight.scales_zeros).to(x.dtype)
    else:
        y = torch.nn.functional.linear(x, dequantize_int4(weight, weight.packed).to(x.dtype))
    return y if bias is None else y + bias
