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
    block_size: int | None = None        # None: the attention backend's (kernels.block_size_for: 16, flash-attn 256)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float | None = None     # None: planned from available memory (server/engine/memory.py)
    memory_utilization: float = 0.9       # share of available memory weights + KV + activations may take
    enable_prefix_caching: bool = True
    max_pending: int = 256
    quantization: str = "auto"            # auto | none | int8 | int4 (weight-only; paged engine; see cli)
    max_new_tokens: int | None = None     # operator cap: longer requests are cut (finish_reason length)
    cuda_graphs: bool = True              # decode steps replay CUDA graphs where they can (server/engine/cuda_graphs.py)


def pick_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device):
    """auto: bf16 (fp16 without bf16) on CUDA; float32 activations on the CPU, where the native C++ step
    runs (its products use the weights' own formats: int4/int8 kernels, or bf16 through oneDNN/AMX).
    Decided by the device alone: never by a timing, which flipped from start to start."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
