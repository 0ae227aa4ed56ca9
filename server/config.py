"""Engine configuration: flags -> one dataclass; the device and dtype are chosen here, once."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(slots=True)
class EngineConfig:
    model: str = "default"
    engine: str = "auto"                 # auto | paged | transformers
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 2.0
    enable_prefix_caching: bool = True
    max_pending: int = 256
    quantization: str = "none"            # none | int8 | int4 (weight-only; paged engine)
    max_new_tokens: int | None = None     # operator cap: longer requests are cut (finish_reason length)


def pick_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device):
    """auto: bf16 where the hardware runs it fast (CUDA with bf16; a CPU whose bf16 matmuls measure
    clearly faster than fp32), else fp32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    """Measure instead of guessing from CPU flags: bf16 wins only if its matmuls are clearly faster
    (>= 1.3x) than fp32 here. AVX512-BF16/AMX CPUs give ~2-4x; AVX2-only CPUs emulate bf16 and lose."""
    import time

    import torch

    def best_time(dtype) -> float:
        a = torch.randn(64, 576, dtype=dtype)
        w = torch.randn(1536, 576, dtype=dtype)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            times.append(time.perf_counter() - start)
        return min(times[1:])
    return best_time(torch.float32) >= 1.3 * best_time(torch.bfloat16)
