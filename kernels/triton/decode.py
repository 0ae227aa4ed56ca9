"""Triton paged attention for decode rows: one query token per sequence over its block table.

One program per (sequence, KV head, split): the GQA group of query heads sharing that KV head is one tile
of rows (BLOCK_G >= 16, tl.dot's smallest M), so each key is read once per group. Long contexts split into
PARTITION-token pieces (split-K, "flash-decoding"): each split writes its normalised partial output and
log-sum-exp, and a second kernel merges them. With one split the first kernel writes the output itself.

The number of splits comes from meta.max_context_len, an upper bound: splits past a row's context write
an empty part (lse -inf), so a CUDA graph captured with max_context_len = max_model_len serves every step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.metadata import AttentionMetadata
from kernels.triton.common import dot_precision, key_tile, softcap_scores, upcast

PARTITION = 256   # context tokens per split, at least
MAX_SPLITS = 32   # more splits only add empty programs (a graph's bound of 128k tokens: 4096-token splits)
BLOCK_N = 64      # keys per inner iteration, gathered per token through the block table (any block size);
                  # key_tile: 32 for wide rows


@triton.jit(do_not_specialize=["window"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, lse_ptr,
                         scale, softcap, window,
                         stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         stride_bt, stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
                         USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, ONE_SPLIT: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    lo = split * PARTITION
    if USE_WINDOW:   # the query sits at context_len - 1 and sees keys context_len - window ..
        lo = tl.maximum(lo, context_len - window)
    hi = tl.minimum(split * PARTITION + PARTITION, context_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g                                            # (BLOCK_G,) query heads
    gd_mask = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask,
                other=0.0)                                                      # (BLOCK_G, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        slot = offs_n % BLOCK_SIZE
        nd_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + block_ids.to(tl.int64)[:, None] * stride_kb + slot[:, None] * stride_ks
                    + kv_head * stride_kh + offs_d[None, :], mask=nd_mask, other=0.0)   # (BLOCK_N, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale           # (BLOCK_G, BLOCK_N) fp32
        if USE_SOFTCAP:
            s = softcap_scores(s, softcap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block_ids.to(tl.int64)[:, None] * stride_vb + slot[:, None] * stride_vs
                    + kv_head * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0)   # (BLOCK_N, BLOCK_D)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)      # a zero-length padding row gets zeros
    out = acc / l_safe[:, None]
    if ONE_SPLIT:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:   # an empty split (past the context: most of them under a CUDA graph) writes only its lse
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                 out, mask=gd_mask & (l_i > 0.0)[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
        tl.store(lse_ptr + seq * stride_lt + heads * stride_lh + split, lse, mask=offs_g < GROUP)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(part_ptr, lse_ptr, out_ptr, num_splits,
                          stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(lse_ptr + seq * stride_lt + head * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))                                          # (BLOCK_S,)
    m = tl.max(lse, 0)
    weight = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))                 # 0 for empty splits
    total = tl.sum(weight, 0)
    filled = s_mask & (lse > float("-inf"))                                     # splits that wrote a part
    parts = tl.load(part_ptr + seq * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=filled[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)   # (BLOCK_S, BLOCK_D)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
                     out: Tensor, window: int | None = None, softcap: float | None = None,
                     partition: int = PARTITION, block_n: int | None = None) -> None:
    """Attention of the decode rows q (Bd, Hq, D), rows 0..Bd-1 of meta, into out (Bd, Hq, D)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    partition = max(partition, triton.next_power_of_2(triton.cdiv(meta.max_context_len, MAX_SPLITS)))
    num_splits = max(1, triton.cdiv(meta.max_context_len, partition))
    block_n = min(block_n or key_tile(head_dim, q.dtype, BLOCK_N), partition)
    if num_splits == 1:   # the output itself; lse unused
        parts, lse, part_strides, lse_strides = out, out, (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        parts = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                            device=q.device)                                    # (Bd, Hq, S, D)
        lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)   # (Bd, Hq, S)
        part_strides, lse_strides = parts.stride()[:3], lse.stride()[:2]
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, parts, lse,
        scale, softcap or 1.0, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        *part_strides, *lse_strides,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n,
        PARTITION=partition, USE_WINDOW=window is not None, USE_SOFTCAP=softcap is not None,
        ONE_SPLIT=num_splits == 1, PRECISION=dot_precision(q.dtype), UPCAST=upcast(q.dtype))
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            parts, lse, out, num_splits, *part_strides, *lse_strides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_S=triton.next_power_of_2(num_splits))

