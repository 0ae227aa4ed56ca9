"""Paged-attention kernels, implementation chosen once at import (like aiohttp's reader.py).

flash-attn on CUDA when a CUDA device exists and `flash_attn` imports; the pure-torch reference
otherwise. Both bind the same names:

    store_kv(k, v, k_cache, v_cache, slot_mapping) -> None
    paged_attention(q, k_cache, v_cache, meta, scale, k=None, v=None, window=None, softcap=None) -> Tensor
"""
from __future__ import annotations

import torch

from kernels.metadata import AttentionMetadata, PrefillSpan, build_metadata


def _select_backend():
    if torch.cuda.is_available():
        try:
            from kernels import flash
            return "flash", flash.store_kv, flash.paged_attention
        except ImportError:
            pass
    from kernels import reference
    return "reference", reference.store_kv, reference.paged_attention


BACKEND, store_kv, paged_attention = _select_backend()

__all__ = ["AttentionMetadata", "PrefillSpan", "build_metadata", "store_kv", "paged_attention",
           "BACKEND"]
