"""Weight-only int8: quantization error bounds and the CPU kernel against a float reference."""
from __future__ import annotations

import torch

from kernels.quant import int8_linear, quantize_int8


def test_quantize_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    q = quantize_int8(w)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == w.shape
    dequant = q.qweight.float() * q.scales.float()[:, None]
    step = w.abs().amax(dim=1, keepdim=True) / 127
    # rounding costs half a step; the bf16 scale (8-bit mantissa) at most 127 * 2**-8 steps more
    assert ((dequant - w).abs() <= step * (0.5 + 127 * 2**-8) + 1e-6).all()
    assert (dequant - w).abs().mean() < 0.3 * step.mean()


def test_int8_linear_matches_dequantized_product():
    torch.manual_seed(1)
    w, x, bias = torch.randn(96, 64), torch.randn(5, 64), torch.randn(96)
    q = quantize_int8(w)
    want = torch.nn.functional.linear(x, q.qweight.float() * q.scales.float()[:, None], bias)
    got = int8_linear(x, q, bias)
    assert got.dtype == x.dtype and got.shape == (5, 96)
    assert torch.allclose(got, want, rtol=2e-2, atol=5e-2)     # bf16 activations inside the kernel
    assert (torch.nn.functional.cosine_similarity(got, x @ w.T + bias, dim=1) > 0.999).all()
