"""What the attention kernels share: soft-capping, the fp32 product precision, the interpreter's limits."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the kernels were decorated in interpreter mode (CPU tensors) iff this was set when they were imported
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


@triton.jit
def softcap_scores(s, softcap):
    """tanh(s / softcap) * softcap, tanh written as 2 * sigmoid(2x) - 1 (no tanh in every Triton)."""
    return softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products in fp32 (the oracle's precision; TF32 would lose ~3 digits); fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 or upcast(dtype) else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """Products in fp32 after loading: the interpreter's tl.dot reads bf16 as raw integers (Triton 3.9), so
    on the CPU bf16 tiles are widened first; on the GPU bf16 goes to the tensor cores as it is."""
    return INTERPRET and dtype == torch.bfloat16


def key_tile(head_dim: int, dtype: torch.dtype, tile: int = 64) -> int:
    """Keys (and prefill queries) per tile: `tile`, halved for rows over 256 bytes (fp32 at head size 128,
    bf16 at 256) so that a program's K and V tiles stay well inside an A100's 164 KB of shared memory."""
    return tile if head_dim * torch.empty((), dtype=dtype).element_size() <= 256 else tile // 2
