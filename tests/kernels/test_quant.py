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


def test_int4_round_trip_error_is_within_half_a_step_per_group():
    from kernels.quant import INT4_GROUP_SIZE, dequantize_int4, quantize_int4

    torch.manual_seed(2)
    w = torch.randn(32, 128)
    q = quantize_int4(w, group_size=32)
    # the CPU kernel's packed layout is opaque: recover the float weight through the kernel (x = I)
    dequant = int4_linear_reference(q, w.shape)
    groups = w.view(32, 4, INT4_GROUP_SIZE)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(INT4_GROUP_SIZE, dim=1)   # (N, K)
    # half a step of rounding, plus bf16 rounding of scale and zero inside the kernel
    assert ((dequant - w).abs() <= step * 0.5 + w.abs().amax() * 2**-7).all()
    assert (dequant - w).abs().mean() < 0.35 * step.mean()
    # the dequantizing path (non-CPU devices) reads the same scale/zero convention as the CPU kernel
    low = groups.amin(-1).repeat_interleave(INT4_GROUP_SIZE, dim=1)
    codes = torch.round((w - low) / step).clamp(0, 15)
    assert torch.allclose(dequantize_int4(q, codes), dequant, atol=float(w.abs().amax()) * 2**-7)


def int4_linear_reference(q, shape):
    from kernels.quant import int4_linear

    eye = torch.eye(shape[1])
    return int4_linear(eye, q).t()          # (N, K): column j of W^T is W[:, j]


def test_int4_linear_matches_float_product_and_refuses_odd_shapes():
    from kernels.quant import int4_linear, int4_supported, quantize_int4

    torch.manual_seed(3)
    w, x, bias = torch.randn(96, 64), torch.randn(5, 64), torch.randn(96)
    q = quantize_int4(w)
    got = int4_linear(x, q, bias)
    assert got.dtype == x.dtype and got.shape == (5, 96)
    want = torch.nn.functional.linear(x, int4_linear_reference(q, w.shape), bias)
    assert torch.allclose(got, want, rtol=2e-2, atol=1e-1)      # bf16 activations inside the kernel
    assert (torch.nn.functional.cosine_similarity(got, x @ w.T + bias, dim=1) > 0.99).all()
    assert not int4_supported(torch.randn(96, 40)) and not int4_supported(torch.randn(90, 64))
