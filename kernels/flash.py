"""CUDA paged attention through flash-attn 2 (imported only when kernels/__init__ picks CUDA).

Same signatures and cache layout as kernels.reference. flash-attn reads the paged cache itself
through `block_table` (int32, (B, max_blocks)); its paged kernels require block_size to be a
multiple of 256 (flash-attn 2.x): kernels.block_size_for gives the engine 256 with this backend.
Causal masks are aligned bottom-right (flash-attn >= 2.1), which is exactly "the new queries
are the last tokens of the context", so one varlen call covers decode, prefill and
chunked prefill with a cached prefix (nano-vllm does the same).
"""
from __future__ import annotations

from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from torch import Tensor

from kernels.metadata import AttentionMetadata
from kernels import reference
from kernels.reference import store_kv  # index_copy_ is a single CUDA kernel already

__all__ = ["store_kv", "paged_attention"]


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                    scale: float, k: Tensor | None = None, v: Tensor | None = None,
                    window: int | None = None, softcap: float | None = None) -> Tensor:
    """q (T, Hq, D) -> (T, Hq, D). k, v are accepted for signature parity and unused: the
    cache already holds them (store_kv ran first). CPU tensors fall back to the reference.
    window (transformers' sliding_window: keys p - window + 1 .. p) is flash-attn's window_size
    (window - 1, 0). softcap (Gemma 2's attn_logit_softcapping) is flash-attn's own `softcap` (flash-attn >= 2.6;
    0.0 = none). NOTE: untested here (no CUDA device); the reference path is checked against transformers."""
    if q.device.type != "cuda":
        return reference.paged_attention(q, k_cache, v_cache, meta, scale, k, v, window, softcap)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if meta.num_decode_seqs == q.shape[0]:
        out = flash_attn_with_kvcache(
            q.unsqueeze(1), k_cache, v_cache,  # q (B, 1, Hq, D)
            cache_seqlens=meta.context_lens, block_table=meta.block_tables,
            softmax_scale=scale, causal=True, window_size=window_size, softcap=softcap or 0.0)  # (B, 1, Hq, D)
        return out.squeeze(1)
    return flash_attn_varlen_func(
        q, k_cache, v_cache,
        cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_k,
        max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_context_len,
        softmax_scale=scale, causal=True, window_size=window_size, softcap=softcap or 0.0,
        block_table=meta.block_tables)  # (T, Hq, D)
