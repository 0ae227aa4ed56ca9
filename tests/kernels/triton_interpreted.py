"""Cases for kernels.triton against kernels.reference on the CPU, through the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton itself is imported (its own library functions are decorated
then), so tests/kernels/test_triton_attention.py runs this file in a child pytest with the variable set,
and no other test process ever holds interpreter-mode Triton. Run alone:

    TRITON_INTERPRET=1 python -m pytest -q tests/kernels/triton_interpreted.py

The interpreter runs each program in numpy, so the shapes are small; the same kernels run compiled on a GPU
(tests/gpu). bf16 products are widened to fp32 in the interpreter (kernels/triton/common.upcast);
everything else is the code a GPU runs.
"""
from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.metadata import AttentionMetadata  # noqa: E402
from tests.kernels.paged_batch import make_batch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (run through test_triton_attention.py)",
                allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install -e .[test]): no Triton kernel to test")
import kernels.triton as tk  # noqa: E402
from kernels.triton.decode import decode_attention  # noqa: E402
from kernels.triton.prefill import prefill_attention  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# (num_cached, q_len) per sequence, decode rows first: contexts off the block boundaries, prefills with and
# without a cached prefix
MIXED = [(37, 1), (0, 1), (20, 1), (0, 23), (18, 7), (33, 21)]


def assert_close(got, want, dtype):
    tol = TOLERANCE[dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_matches_reference_and_skips_negative_slots(dtype):
    q, k, v, k_cache, v_cache, meta = make_batch(MIXED, 4, 2, 64, dtype)
    slots = meta.slot_mapping.clone()
    slots[3] = slots[10] = -1                         # padding rows (a CUDA-graph batch): stored nowhere
    keep = slots >= 0
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k[keep], v[keep], want_k, want_v, slots[keep])
    tk.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    qkv = torch.cat([k, v], dim=1)                    # strided views, as the model passes them
    tk.store_kv(qkv[:, :2], qkv[:, 2:], k_cache, v_cache, meta.slot_mapping)
    reference.store_kv(k, v, want_k, want_v, meta.slot_mapping)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("heads,head_dim,dtype,block_size", [
    ((4, 4), 64, torch.float16, 16),      # GQA 1
    ((6, 2), 128, torch.bfloat16, 16),    # GQA 3
    ((8, 1), 64, torch.float32, 16),      # GQA 8
    ((6, 2), 24, torch.float32, 4),       # a head size that is no power of two, small blocks
])
def test_mixed_batch_matches_reference(heads, head_dim, dtype, block_size):
    """Decode rows, whole prompts and chunks over a cached prefix in one call, as the engine's mixed steps."""
    q, k, v, k_cache, v_cache, meta = make_batch(MIXED, *heads, head_dim, dtype, block_size)
    tk.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = head_dim ** -0.5
    want = reference.paged_attention(q, k_cache, v_cache, meta, scale, k, v)
    assert_close(tk.paged_attention(q, k_cache, v_cache, meta, scale, k, v), want, dtype)


@pytest.mark.parametrize("window,softcap", [(1, None), (5, None), (None, 1.5), (7, 2.0)])
def test_window_and_softcap_match_reference(window, softcap):
    """Sliding windows shorter than most contexts (Mistral/Gemma) and Gemma 2's soft-capped scores."""
    q, k, v, k_cache, v_cache, meta = make_batch(MIXED, 6, 2, 64, torch.float32)
    tk.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.3, k, v, window=window, softcap=softcap)
    got = tk.paged_attention(q, k_cache, v_cache, meta, 0.3, k, v, window=window, softcap=softcap)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("window,softcap,bound", [(None, None, 512), (70, None, 512), (None, 2.0, 512),
                                                  (None, None, 100_000)])
def test_split_k_decode_matches_reference(window, softcap, bound):
    """Contexts over several 64-token splits, merged by the reduce kernel; with a window the first splits
    are empty. max_context_len as a CUDA graph sets it (max_model_len, above every context) changes nothing;
    a bound of 100k tokens widens the splits (MAX_SPLITS) instead of launching ~1500 of them."""
    rows = [(300, 1), (4, 1), (150, 1), (64, 1)]
    q, k, v, k_cache, v_cache, meta = make_batch(rows, 8, 2, 64, torch.float16, num_blocks=48)
    tk.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125, window=window, softcap=softcap)
    out = torch.empty_like(q)
    meta.max_context_len = bound
    decode_attention(q, k_cache, v_cache, meta, 0.125, out, window, softcap, partition=64)
    assert_close(out, want, torch.float16)


def test_padding_rows_of_zero_context_give_zeros():
    """A CUDA-graph batch pads with rows of context 0 (and slot -1): they read nothing and write zeros."""
    q, k, v, k_cache, v_cache, meta = make_batch([(9, 1), (30, 1)], 4, 2, 64, torch.float32)
    tk.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125)
    padded = AttentionMetadata(cu_seqlens_q=torch.arange(4, dtype=torch.int32),
                               context_lens=torch.tensor([10, 31, 0], dtype=torch.int32),
                               slot_mapping=torch.cat([meta.slot_mapping, torch.tensor([-1])]),
                               block_tables=torch.cat([meta.block_tables, torch.zeros(1, 2, dtype=torch.int32)]),
                               max_seqlen_q=1, max_context_len=64, num_decode_seqs=3)
    got = tk.paged_attention(torch.cat([q, q[:1]]), k_cache, v_cache, padded, 0.125)
    assert_close(got[:2], want, torch.float32)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize("window", [None, 10])
def test_prefill_over_several_query_tiles_matches_reference(window):
    """Spans longer than one BLOCK_M tile (16 here), one after a 20-token cached prefix."""
    q, k, v, k_cache, v_cache, meta = make_batch([(0, 1), (20, 45), (0, 33)], 4, 2, 64, torch.float32)
    tk.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    want = reference.paged_attention(q, k_cache, v_cache, meta, 0.125, k, v, window=window)
    out = torch.zeros_like(q)
    prefill_attention(q, k_cache, v_cache, meta, 0.125, out, window, block_m=16, block_n=16)
    assert_close(out[1:], want[1:], torch.float32)
    assert torch.equal(out[0], torch.zeros_like(out[0]))     # decode rows are the decode kernel's


def test_cpu_tensors_outside_the_interpreter_take_the_reference(monkeypatch):
    q, k, v, k_cache, v_cache, meta = make_batch([(3, 1), (0, 4)], 4, 2, 16, torch.float32)
    monkeypatch.setattr(tk, "INTERPRET", False)
    calls = []
    monkeypatch.setattr(reference, "paged_attention", lambda *a, **kw: calls.append(a) or a[0])
    assert tk.paged_attention(q, k_cache, v_cache, meta, 0.25) is q and len(calls) == 1
    monkeypatch.setattr(tk, "INTERPRET", True)
    wide = make_batch([(3, 1), (0, 4)], 4, 1, 320, torch.float32)   # MLA-sized heads: over MAX_HEAD_DIM
    assert tk.paged_attention(wide[0], wide[3], wide[4], wide[5], 0.25) is wide[0] and len(calls) == 2


def test_a_padded_cuda_graph_step_matches_the_unpadded_one():
    """What a graph replays: server.engine.cuda_graphs' staging and metadata, 3 rows padded to 4, with
    max_context_len the model's bound. Real rows equal the reference; the padding row stores nothing."""
    from server.engine.cuda_graphs import DecodeInputs, Staging, fill_staging, graph_metadata

    rows = [(40, 1), (2, 1), (17, 1)]
    q, k, v, k_cache, v_cache, meta = make_batch(rows, 6, 2, 64, torch.float16)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, want_k, want_v, meta.slot_mapping)
    want = reference.paged_attention(q, want_k, want_v, meta, 0.125)
    tables = [meta.block_tables[i, :-(-(c + 1) // 16)].tolist() for i, (c, _) in enumerate(rows)]
    inputs = DecodeInputs([0] * 3, [c for c, _ in rows], meta.slot_mapping.tolist(), [c + 1 for c, _ in rows],
                          tables)
    staging = Staging.empty(8, 16, "cpu")
    fill_staging(inputs, 4, staging)
    padded = graph_metadata(staging, torch.arange(9, dtype=torch.int32), 4, max_context_len=256, block_size=16)
    q4, k4, v4 = (torch.cat([x, torch.randn_like(x[:1])]) for x in (q, k, v))
    tk.store_kv(k4, v4, k_cache, v_cache, padded.slot_mapping)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    got = tk.paged_attention(q4, k_cache, v_cache, padded, 0.125)
    assert_close(got[:3], want, torch.float16)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
