"""Paged attention in Triton: the CUDA backend when flash-attn is absent (kernels/__init__ picks it).

Same signatures and cache layout as kernels.reference; any block size (16 on CUDA with this backend):

    store_kv(k, v, k_cache, v_cache, slot_mapping)            store.py   (negative slots skipped)
    paged_attention(q, k_cache, v_cache, meta, scale, ...)    decode.py for the decode rows (split-K),
                                                              prefill.py for the rest
Sliding windows and soft-capping run in the kernels. Tensors the kernels cannot reach (CPU tensors
outside the interpreter, TRITON_INTERPRET=1) and heads over MAX_HEAD_DIM go to the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels import reference
from kernels.metadata import AttentionMetadata
from kernels.triton.common import INTERPRET
from kernels.triton.decode import decode_attention
from kernels.triton.prefill import prefill_attention
from kernels.triton.store import store_kv as _store_kv

__all__ = ["store_kv", "paged_attention", "INTERPRET", "MAX_HEAD_DIM"]

# larger heads (MLA's 576-wide latent rows) would not fit a program's registers: the reference serves them
MAX_HEAD_DIM = 256


def _runs_here(x: Tensor) -> bool:
    return x.is_cuda or INTERPRET


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write k, v (T, Hkv, D) into their cache slots (T,) in place; a negative slot is skipped."""
    if not _runs_here(k):
        return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    _store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                    scale: float, k: Tensor | None = None, v: Tensor | None = None,
                    window: int | None = None, softcap: float | None = None) -> Tensor:
    """q (T, Hq, D) -> (T, Hq, D), decode rows first (meta.num_decode_seqs). k, v are accepted for
    signature parity and unused: store_kv already wrote them to the cache. window / softcap as in
    kernels.reference."""
    if not _runs_here(q) or q.shape[-1] > MAX_HEAD_DIM or v_cache.shape[-1] != q.shape[-1]:
        return reference.paged_attention(q, k_cache, v_cache, meta, scale, k, v, window, softcap)
    out = torch.empty_like(q)
    num_decode = meta.num_decode_seqs
    if num_decode:
        decode_attention(q[:num_decode], k_cache, v_cache, meta, scale, out[:num_decode], window, softcap)
    prefill_attention(q, k_cache, v_cache, meta, scale, out, window, softcap)
    return out
