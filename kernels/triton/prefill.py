"""Triton paged attention for prefill rows: each sequence's new queries over its whole cached context.

Rows num_decode_seqs.. of the metadata, of any query length, possibly after a cached prefix: query i of
a span of q_len sits at absolute position context_len - q_len + i and sees keys 0 .. that position (and
only the last `window` of them with a sliding window). store_kv has already written this step's keys, so
every key comes from the paged cache. One program per (sequence, BLOCK_M queries, query head).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kernels.metadata import AttentionMetadata
from kernels.triton.common import dot_precision, key_tile, softcap_scores, upcast

BLOCK_M = 64   # queries per program (key_tile: 32 for wide rows)
BLOCK_N = 64   # keys per inner iteration (key_tile: 32 for wide rows)


@triton.jit(do_not_specialize=["window", "first_seq"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, out_ptr,
                    scale, softcap, window, first_seq,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bt, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                    USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    seq = first_seq + tl.program_id(0)
    tile, head = tl.program_id(1), tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        context_len = tl.load(context_lens_ptr + seq)
        first_pos = context_len - q_len                                          # position of query 0
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_pos = first_pos + offs_m                                               # (BLOCK_M,) absolute
        md_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=md_mask, other=0.0)                                     # (BLOCK_M, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
        hi = tl.minimum(context_len, first_pos + tile * BLOCK_M + BLOCK_M)       # past the tile's last query
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(0, first_pos + tile * BLOCK_M - window + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
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
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale       # (BLOCK_M, BLOCK_N) fp32
            if USE_SOFTCAP:
                s = softcap_scores(s, softcap)
            visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)               # a row with nothing visible yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + block_ids.to(tl.int64)[:, None] * stride_vb + slot[:, None] * stride_vs
                        + kv_head * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0)   # (BLOCK_N, BLOCK_D)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=md_mask)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
                      out: Tensor, window: int | None = None, softcap: float | None = None,
                      block_m: int | None = None, block_n: int | None = None) -> None:
    """Attention of the prefill rows (sequences num_decode_seqs..) of q (T, Hq, D) into the same rows of out."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_m = block_m or key_tile(head_dim, q.dtype, BLOCK_M)
    block_n = block_n or key_tile(head_dim, q.dtype, BLOCK_N)
    num_prefill = meta.num_seqs - meta.num_decode_seqs
    if num_prefill == 0:
        return
    grid = (num_prefill, triton.cdiv(meta.max_seqlen_q, block_m), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, out,
        scale, softcap or 1.0, window or 0, meta.num_decode_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, USE_WINDOW=window is not None,
        USE_SOFTCAP=softcap is not None, PRECISION=dot_precision(q.dtype), UPCAST=upcast(q.dtype))
