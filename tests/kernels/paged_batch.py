"""A random paged batch for the attention-kernel tests (tests/kernels/triton_interpreted.py, tests/gpu)."""
from __future__ import annotations

import torch

from kernels.metadata import build_metadata


def make_batch(rows, num_heads, num_kv_heads, head_dim, dtype, block_size=16, num_blocks=64, seed=0,
               device="cpu"):
    """rows: (num_cached, q_len) per sequence, decode rows (q_len 1) first. A random paged cache (each row's
    blocks shuffled: holes between them), this step's q, k, v and the metadata, on `device`.
    Returns q, k, v, k_cache, v_cache, meta."""
    gen = torch.Generator().manual_seed(seed)
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    tables, slot_mapping = [], []
    for num_cached, q_len in rows:
        ctx = num_cached + q_len
        table = [free_blocks.pop() for _ in range(-(-ctx // block_size))]
        tables.append(table)
        slot_mapping += [table[p // block_size] * block_size + p % block_size for p in range(num_cached, ctx)]
    num_tokens = sum(q for _, q in rows)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    meta = build_metadata([q for _, q in rows], [c + q for c, q in rows], tables, slot_mapping, block_size, device)
    return tuple(t.to(device) for t in (q, k, v, k_cache, v_cache)) + (meta,)
