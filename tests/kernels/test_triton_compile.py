"""The Triton kernels compiled for GPUs on a machine without one: Triton's own compiler and its bundled ptxas
turn each kernel, with the arguments its wrapper really passes, into sm_90 (H100/H200) and sm_80 (A100)
binaries, whose shared memory must fit those chips. Catches what the interpreter cannot: types, constexpr
branches, tl.dot shapes, resource use. Skipped only without triton (or under TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[test]): no Triton kernel to compile")
if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: the kernels are interpreter functions here", allow_module_level=True)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.triton import decode, prefill, store  # noqa: E402
from tests.kernels.paged_batch import make_batch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
KERNELS = [(store, "_store_kernel"), (decode, "_decode_split_kernel"), (decode, "_decode_reduce_kernel"),
           (prefill, "_prefill_kernel")]
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}   # opt-in shared memory per block


def launches(q, k, v, k_cache, v_cache, meta, window, softcap) -> list:
    """(kernel, args, constexprs) of every launch one store + attention call makes; nothing runs."""
    seen, real = [], {name: getattr(module, name) for module, name in KERNELS}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **constexprs: seen.append((real[self.name], args, constexprs))
    try:
        for module, name in KERNELS:
            setattr(module, name, Recorder(name))
        out, num_decode = torch.empty_like(q), meta.num_decode_seqs
        store.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        decode.decode_attention(q[:num_decode], k_cache, v_cache, meta, 0.1, out[:num_decode], window, softcap)
        prefill.prefill_attention(q, k_cache, v_cache, meta, 0.1, out, window, softcap)
    finally:
        for module, name in KERNELS:
            setattr(module, name, real[name])
    return seen


def signature(kernel, args, constexprs) -> tuple[dict, dict]:
    sig = {}
    for name, value in zip(kernel.arg_names, args):
        sig[name] = ("*" + TYPES[value.dtype] if isinstance(value, torch.Tensor)
                     else "fp32" if isinstance(value, float) else "i32")
    return {**sig, **{name: "constexpr" for name in constexprs}}, constexprs


@pytest.mark.parametrize("dtype,heads,head_dim,window,softcap,arch", [
    (torch.bfloat16, (9, 3), 64, None, None, 90),       # SmolLM2-135M (bench/gpu.sh)
    (torch.float16, (32, 4), 128, 100, 30.0, 90),       # Llama-3-8B-like, window and soft-capping, split-K
    (torch.bfloat16, (32, 4), 128, None, None, 80),
    (torch.float32, (8, 8), 128, None, None, 80),       # fp32 (the oracle tests): halved tiles
])
def test_kernels_compile_for_the_gpu_and_fit_its_shared_memory(dtype, heads, head_dim, window, softcap, arch):
    batch = make_batch([(600, 1), (3, 1), (0, 300)], *heads, head_dim, dtype, num_blocks=64)
    compiled = {}
    for kernel, args, constexprs in launches(*batch, window, softcap):
        sig, consts = signature(kernel, args, constexprs)
        binary = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", arch, 32))
        assert binary.asm.get("cubin"), kernel.__name__
        assert binary.metadata.shared <= SHARED_LIMIT[arch], (kernel.__name__, binary.metadata.shared)
        compiled[kernel.__name__] = binary.metadata.shared
    assert set(compiled) == {name for _, name in KERNELS}
