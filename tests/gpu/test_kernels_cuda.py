"""The Triton kernels compiled on a GPU against kernels.reference (bench/gpu.sh runs this where a GPU is lent):
real head sizes (64, 128), block size 16, fp16/bf16/fp32, contexts long enough for split-K decode."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (bench/gpu.sh runs these on a GPU)", allow_module_level=True)

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from tests.kernels.paged_batch import make_batch  # noqa: E402

triton_kernels = pytest.importorskip("kernels.triton", reason="triton does not import here")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# decode rows over 1-5 splits of 256 tokens, prompts, chunks after a cached prefix; few contexts on a block edge
ROWS = [(1100, 1), (0, 1), (255, 1), (513, 1), (0, 300), (500, 77), (31, 2)]


def check(dtype, heads, head_dim, rows=ROWS, window=None, softcap=None):
    q, k, v, k_cache, v_cache, meta = make_batch(rows, *heads, head_dim, dtype, num_blocks=256, device="cuda")
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, want_k, want_v, meta.slot_mapping)
    triton_kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    scale = head_dim ** -0.5
    # the oracle in fp32: the reference's own half-precision SDPA rounds differently from the kernels
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale, window=window,
                                     softcap=softcap)
    got = triton_kernels.paged_attention(q, k_cache, v_cache, meta, scale, k, v, window=window, softcap=softcap)
    assert got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_backend_and_block_size():
    assert kernels.BACKEND in ("flash", "triton")
    assert kernels.block_size_for("cuda") == (256 if kernels.BACKEND == "flash" else 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((32, 4), 128), ((8, 8), 128)])
def test_mixed_batch_matches_reference(dtype, heads, head_dim):
    check(dtype, heads, head_dim)


@pytest.mark.parametrize("window,softcap", [(64, None), (None, 30.0), (100, 50.0)])
def test_window_and_softcap_match_reference(window, softcap):
    check(torch.bfloat16, (16, 8), 128, window=window, softcap=softcap)
