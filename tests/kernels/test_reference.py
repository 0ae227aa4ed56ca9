"""kernels.reference vs naive full attention (CPU), plus store_kv and build_metadata."""
import pytest
import torch

from kernels import reference
from kernels.metadata import build_metadata

BLOCK_SIZE = 4
NUM_BLOCKS = 64


def naive_attention(q, k, v, scale, window=None, softcap=None):
    """q (n, Hq, D) are the LAST n positions of a context k, v (ctx, Hkv, D). Float64, causal; with `window`,
    each query sees only its last `window` positions (itself included); with `softcap`, scores become
    tanh(scores / softcap) * softcap before the mask (transformers' eager Gemma 2 attention)."""
    n, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.double().repeat_interleave(group, dim=1)  # (ctx, Hq, D)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # (Hq, n, ctx)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
    if window is not None:
        scores = scores.masked_fill(torch.arange(ctx)[None, :] <= q_pos - window, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)  # (n, Hq, D)


def make_batch(rows, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """rows: list of (num_cached, q_len), decode rows (q_len 1) first. Fills a paged cache with
    each row's cached prefix, returns everything needed to run both paths."""
    gen = torch.Generator().manual_seed(seed)
    free_blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    full_k, full_v, q_list, block_tables, slot_mapping = [], [], [], [], []
    for num_cached, q_len in rows:
        ctx = num_cached + q_len
        table = [free_blocks.pop() for _ in range(-(-ctx // BLOCK_SIZE))]
        slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx)]
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        prefix = torch.tensor(slots[:num_cached], dtype=torch.int64)
        reference.store_kv(k[:num_cached], v[:num_cached], k_cache, v_cache, prefix)
        full_k.append(k), full_v.append(v), block_tables.append(table)
        q_list.append(torch.randn(q_len, num_heads, head_dim, generator=gen).to(dtype))
        slot_mapping += slots[num_cached:]
    meta = build_metadata([q for _, q in rows], [c + q for c, q in rows], block_tables,
                          slot_mapping, BLOCK_SIZE, "cpu")
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, rows)])  # (T, Hkv, D)
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, rows)])
    return torch.cat(q_list), new_k, new_v, k_cache, v_cache, meta, full_k, full_v


MIXED = [(5, 1), (0, 1), (12, 1), (0, 7), (6, 5), (8, 1 + 8), (3, 2)]


@pytest.mark.parametrize("rows", [MIXED, [(9, 1), (2, 1)], [(0, 10)], [(0, 3), (4, 4)]])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("pass_new_kv", [True, False])
def test_paged_attention_matches_naive_fp32(rows, heads, pass_new_kv):
    num_heads, num_kv_heads = heads
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch(rows, num_heads, num_kv_heads,
                                                                 16, torch.float32)
    reference.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = 16 ** -0.5
    kv = (k, v) if pass_new_kv else (None, None)
    out = reference.paged_attention(q, k_cache, v_cache, meta, scale, *kv)
    assert out.shape == q.shape and out.dtype == torch.float32
    starts = meta.cu_seqlens_q.tolist()
    for i in range(len(rows)):
        expected = naive_attention(q[starts[i]:starts[i + 1]], full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 6, 30])
@pytest.mark.parametrize("pass_new_kv", [True, False])
def test_sliding_window_attention_matches_naive(window, pass_new_kv):
    """transformers' sliding_window: decode rows, whole prompts and chunks over a cached prefix (MIXED)."""
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch(MIXED, 6, 2, 16, torch.float32)
    reference.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    kv = (k, v) if pass_new_kv else (None, None)
    out = reference.paged_attention(q, k_cache, v_cache, meta, 0.25, *kv, window=window)
    starts = meta.cu_seqlens_q.tolist()
    for i in range(len(MIXED)):
        expected = naive_attention(q[starts[i]:starts[i + 1]], full_k[i], full_v[i], 0.25, window)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected, atol=1e-5, rtol=1e-5)
    decode_only = build_metadata([1, 1], [c + n for c, n in MIXED[:2]], meta.block_tables[:2].tolist(),
                                 meta.slot_mapping[:2].tolist(), BLOCK_SIZE, "cpu")   # the all-decode fast path
    out = reference.paged_attention(q[:2], k_cache, v_cache, decode_only, 0.25, window=window)
    for i in range(2):
        expected = naive_attention(q[i:i + 1], full_k[i][:MIXED[i][0] + 1], full_v[i][:MIXED[i][0] + 1], 0.25, window)
        torch.testing.assert_close(out[i:i + 1].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("pass_new_kv,max_scores", [(True, None), (False, None), (True, 40)])
def test_soft_capped_attention_matches_naive(window, pass_new_kv, max_scores, monkeypatch):
    """Gemma 2's attention logit soft-capping (cap 1.5 on scores of std ~2: the cap matters), with and without a
    window: decode rows, whole prompts and chunks over a cached prefix, and the all-decode fast path; max_scores
    40: the scores of a long prefill computed a few query rows at a time."""
    if max_scores is not None:
        monkeypatch.setattr(reference, "SOFTCAP_MAX_SCORES", max_scores)
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch(MIXED, 6, 2, 16, torch.float32)
    reference.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    kv = (k, v) if pass_new_kv else (None, None)
    out = reference.paged_attention(q, k_cache, v_cache, meta, 0.5, *kv, window=window, softcap=1.5)
    starts = meta.cu_seqlens_q.tolist()
    for i in range(len(MIXED)):
        rows = slice(starts[i], starts[i + 1])
        expected = naive_attention(q[rows], full_k[i], full_v[i], 0.5, window, softcap=1.5)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)
        if MIXED[i][0] + MIXED[i][1] > 1:
            assert (expected - naive_attention(q[rows], full_k[i], full_v[i], 0.5, window)).abs().max() > 1e-2
    decode_only = build_metadata([1, 1], [c + n for c, n in MIXED[:2]], meta.block_tables[:2].tolist(),
                                 meta.slot_mapping[:2].tolist(), BLOCK_SIZE, "cpu")
    out = reference.paged_attention(q[:2], k_cache, v_cache, decode_only, 0.5, window=window, softcap=1.5)
    for i in range(2):
        ctx = MIXED[i][0] + 1
        expected = naive_attention(q[i:i + 1], full_k[i][:ctx], full_v[i][:ctx], 0.5, window, softcap=1.5)
        torch.testing.assert_close(out[i:i + 1].double(), expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_bf16_close_to_naive():
    q, k, v, k_cache, v_cache, meta, full_k, full_v = make_batch(MIXED, 8, 2, 32, torch.bfloat16)
    reference.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = reference.paged_attention(q, k_cache, v_cache, meta, 32 ** -0.5, k, v)
    assert out.dtype == torch.bfloat16
    starts = meta.cu_seqlens_q.tolist()
    for i in range(len(MIXED)):
        expected = naive_attention(q[starts[i]:starts[i + 1]], full_k[i], full_v[i], 32 ** -0.5)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].double(), expected,
                                   atol=3e-2, rtol=3e-2)


def test_store_kv_writes_exact_slots():
    k_cache = torch.zeros(4, BLOCK_SIZE, 2, 3)
    v_cache = torch.zeros(4, BLOCK_SIZE, 2, 3)
    k = torch.arange(1, 1 + 3 * 6, dtype=torch.float32).view(3, 2, 3)
    slots = torch.tensor([13, 2, 7])
    reference.store_kv(k, -k, k_cache, v_cache, slots)
    assert torch.equal(k_cache[3, 1], k[0]) and torch.equal(k_cache[0, 2], k[1])
    assert torch.equal(k_cache[1, 3], k[2]) and torch.equal(v_cache[1, 3], -k[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3  # nothing else touched


def test_build_metadata_fields():
    meta = build_metadata([1, 1, 3], [5, 1, 7], [[3, 1], [0], [2, 4]], [6, 0, 20, 21, 22], 4, "cpu")
    assert meta.num_decode_seqs == 2 and meta.max_seqlen_q == 3 and meta.max_context_len == 7
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 5] and meta.cu_seqlens_k.tolist() == [0, 5, 6, 13]
    assert meta.block_tables.tolist() == [[3, 1], [0, 0], [2, 4]]
    assert meta.block_tables.dtype == torch.int32 and meta.slot_mapping.dtype == torch.int64
    assert meta.decode_block_ids.tolist() == [3, 1, 0, 0]
    assert meta.decode_mask[:, 0, 0].sum(-1).tolist() == [5, 1]
    (span,) = meta.prefill_spans
    assert (span.q_start, span.q_end, span.num_cached_tokens) == (2, 5, 4)
    assert span.causal_mask.sum(-1).tolist() == [5, 6, 7]


def test_whole_prompt_prefill_has_no_mask():
    meta = build_metadata([4], [4], [[1]], [4, 5, 6, 7], 4, "cpu")
    assert meta.num_decode_seqs == 0 and meta.prefill_spans[0].causal_mask is None


def test_package_binds_reference_without_cuda():
    import kernels
    if not torch.cuda.is_available():
        assert kernels.BACKEND == "reference"
        assert kernels.paged_attention is reference.paged_attention
        assert kernels.store_kv is reference.store_kv
