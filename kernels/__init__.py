"""Paged-attention kernels, implementation chosen once at import (like aiohttp's reader.py).

On a CUDA machine: flash-attn when `flash_attn` imports, else the Triton kernels (kernels/triton) when
`triton` imports, else the pure-torch reference; without CUDA the reference. All bind the same names:

    store_kv(k, v, k_cache, v_cache, slot_mapping) -> None
    paged_attention(q, k_cache, v_cache, meta, scale, k=None, v=None, window=None, softcap=None) -> Tensor

BACKEND names the one chosen; block_size_for(device) is the KV block size it wants.
"""
from __future__ import annotations

import importlib

import torch

from kernels.metadata import AttentionMetadata, PrefillSpan, build_metadata

CUDA_BACKENDS = ("flash", "triton")   # in order of preference
# flash-attn 2's paged kernels need block_size % 256 == 0; the Triton kernels and the reference take any
BLOCK_SIZES = {"flash": 256, "triton": 16, "reference": 16}


def _select_backend(cuda: bool):
    for name in CUDA_BACKENDS if cuda else ():
        try:
            module = importlib.import_module(f"kernels.{name}")
        except ImportError:
            continue
        return name, module.store_kv, module.paged_attention
    from kernels import reference
    return "reference", reference.store_kv, reference.paged_attention


BACKEND, store_kv, paged_attention = _select_backend(torch.cuda.is_available())


def block_size_for(device, requested: int | None = None) -> int:
    """The KV block size for an engine on `device`: `requested`, or the backend's own (16; flash-attn: 256).
    A size the backend cannot page with is a ValueError."""
    backend = BACKEND if torch.device(device).type == "cuda" else "reference"
    size = BLOCK_SIZES[backend]
    if requested is None:
        return size
    if requested <= 0 or (backend == "flash" and requested % size):
        raise ValueError(f"block size {requested}: the {backend} attention backend needs a multiple of {size}")
    return requested


__all__ = ["AttentionMetadata", "PrefillSpan", "build_metadata", "store_kv", "paged_attention",
           "BACKEND", "block_size_for"]
