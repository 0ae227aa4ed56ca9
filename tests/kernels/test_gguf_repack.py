"""GGUF tensors -> the native kernels' layouts (kernels/gguf_repack.py and csrc/gguf_repack.cpp), checked
against the gguf package's own dequantisation (ggml's reference formulas).

Blocks are random bytes with sane fp16 scales (every bit pattern of the codes and packed K-quant scales
is a valid block), so every code and scale path is exercised. Stated tolerances:
- Q4_0, Q4_1, Q8_0: exact.
- Q4_K on the int4 kernel: the per-32 scale d * sc and min dmin * m are rounded to fp16, so each weight is
  within 2^-11 x (|scale| x 15 + |min|) of the reference.
- Q5_0, Q5_1, Q5_K, Q6_K on the int8 kernel: re-quantised to int8 per 32, each weight within half a step
  (max |w| of its group / 254) plus the fp16 rounding of that step.
"""
import numpy as np
import pytest
import torch

from kernels import native
from kernels.gguf_repack import GGML_TYPE_IDS, dequantize, q4_rows, q4_to_float, q8_rows, q8_to_float, repack

BLOCK = {"Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]), "Q8_0": (32, 34, [0]), "Q5_0": (32, 22, [0]),
         "Q5_1": (32, 24, [0, 2]), "Q4_K": (256, 144, [0, 2]), "Q5_K": (256, 176, [0, 2]),
         "Q6_K": (256, 210, [208])}   # elements, bytes, offsets of fp16 scales inside a block


def random_blocks(kind: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    elems, size, scale_offsets = BLOCK[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // elems, size), dtype=np.uint8)
    for off in scale_offsets:
        raw[..., off:off + 2] = (rng.uniform(0.001, 0.05, size=(rows, k // elems)).astype(np.float16)
                                 .view(np.uint8).reshape(rows, k // elems, 2))
    return raw.reshape(rows, -1)


def to_float(w) -> torch.Tensor:
    return q4_to_float(w) if hasattr(w, "q4_packed") else q8_to_float(w)


def check_close(kind: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    elif kind == "Q4_K":
        assert (got - ref).abs().max() <= 2 ** -11 * (ref.abs().max() + 1e-3) * 2
    else:
        groups = ref.view(ref.shape[0], -1, 32)
        step = groups.abs().amax(dim=-1, keepdim=True) / 127
        err = (got.view_as(groups) - groups).abs()
        assert (err <= step * 0.5 * (1 + 2 ** -10) + 1e-7).all(), float((err / step).max())


@pytest.mark.parametrize("kind", sorted(BLOCK))
def test_repack_matches_gguf_dequantisation(kind):
    k = 512
    raw = random_blocks(kind, 24, k)
    ref = torch.from_numpy(dequantize(raw, kind, k))
    w = repack(raw, kind, k, use_native=False)
    assert hasattr(w, "q4_packed") == (kind in ("Q4_0", "Q4_1", "Q4_K"))
    assert w.out_features == 24
    check_close(kind, to_float(w), ref)


@pytest.mark.parametrize("kind", sorted(BLOCK))
def test_native_repack_equals_the_numpy_reference(kind):
    if native.load() is None:
        pytest.skip("native extension not built here")
    k = 512
    raw = random_blocks(kind, 21 if kind not in ("Q4_0", "Q4_1", "Q4_K") else 24, k, seed=1)
    ref = torch.from_numpy(dequantize(raw, kind, k))
    got, expected = repack(raw, kind, k), repack(raw, kind, k, use_native=False)
    check_close(kind, to_float(got), ref)
    if kind in ("Q4_0", "Q4_1", "Q4_K", "Q8_0"):   # same layout bit for bit
        for a, b in zip((got.q4_packed, got.q4_scale_min) if kind != "Q8_0" else (got.qweight, got.scales),
                        (expected.q4_packed, expected.q4_scale_min) if kind != "Q8_0" else (expected.qweight, expected.scales)):
            assert torch.equal(a, b)
    # the embedding lookup's row dequantisation: ggml's formulas, float32
    rows = native.load().gguf_dequantize(torch.from_numpy(raw), GGML_TYPE_IDS[kind], k)
    torch.testing.assert_close(rows, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_rows_looked_up_in_a_layout_equal_the_file_rows(kind):
    # a tied model's embedding rows come from its output layer's layout: exact for these types
    raw = random_blocks(kind, 40, 256, seed=3)
    w = repack(raw, kind, 256, use_native=False)
    ids = torch.tensor([0, 39, 7, 8, 21, 7])
    got = (q4_rows if kind != "Q8_0" else q8_rows)(w, ids)
    torch.testing.assert_close(got, torch.from_numpy(dequantize(raw, kind, 256))[ids], rtol=0, atol=0)


def test_q4_with_rows_not_a_multiple_of_8_goes_to_int8():
    raw = random_blocks("Q4_0", 12, 64)
    w = repack(raw, "Q4_0", 64)
    assert not hasattr(w, "q4_packed") and w.out_features == 12 and w.qweight.shape[0] == 2
    check_close("Q5_0", to_float(w), torch.from_numpy(dequantize(raw, "Q4_0", 64)))


def test_native_kernels_on_repacked_weights_match_the_dequantised_product():
    ext = native.load()
    if ext is None:
        pytest.skip("native extension not built here")
    torch.manual_seed(0)
    x = torch.randn(5, 512)
    for kind in ("Q4_K", "Q6_K"):
        raw = random_blocks(kind, 32, 512, seed=2)
        w = repack(raw, kind, 512)
        dense = to_float(w)
        y = ext.q4_linear(x, w.q4_packed, w.q4_scale_min) if kind == "Q4_K" else ext.q8_linear(x, w.qweight, w.scales)
        ref = x @ dense.t()
        # activations are rounded to int8 per 32 inside the kernels: ~1% of the output's scale
        assert (y[:, :32] - ref).abs().max() <= 0.02 * ref.abs().max()


def test_unknown_type_is_named():
    with pytest.raises(ValueError, match="multiple of 32"):
        repack(np.zeros((8, 10), np.uint8), "Q8_0", 40)
