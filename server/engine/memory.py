"""Memory plan at start-up: weights, KV pool and activations against the memory this machine has.

    plan = plan_memory(weight_bytes, kv_bytes_per_token, ...)   # raises MemoryPlanError when it cannot fit
    log.info(plan.summary())

The KV pool defaults to what is left of `utilization` x available memory after the weights and the
activations (vLLM's gpu_memory_utilization, here of host RAM on the CPU), capped at what the scheduler can
use (max_num_seqs sequences of max_model_len tokens) and at DEFAULT_KV_CAP: a pool is zeroed at start, so
its pages are resident whether requests use them or not. `--kv-cache-gib` sets it instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GIB = 2 ** 30
DEFAULT_KV_CAP = 4 * GIB


class MemoryPlanError(Exception):
    """The model cannot fit: one line saying what it needs and what there is."""


def available_bytes() -> int:
    """MemAvailable (Linux), the cgroup limit when lower; a large number where neither is known."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
            if text != "max" and int(text) < (avail or 1 << 62):
                avail = int(text)
        except (OSError, ValueError):
            continue
    return avail if avail is not None else 1 << 40


def return_freed_memory(steady: bool = False) -> None:
    """glibc only (a no-op elsewhere): give freed heap pages back to the system (after loading: the
    conversion's temporaries), and with steady=True serve every allocation of 1 MiB or more from its own
    mapping, so a step's large activation buffers (a 2,048-token prefill: ~300 MB for a 1B model) are
    returned when freed instead of staying in the heap (glibc's dynamic threshold grows to 32 MiB)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if steady:
            libc.mallopt(-3, 1 << 20)    # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(slots=True)
class MemoryPlan:
    weights: int
    kv_pool: int
    activations: int
    available: int
    num_blocks: int
    block_tokens: int

    def summary(self) -> str:
        return (f"memory plan: weights {self.weights / GIB:.2f} GiB, KV pool {self.kv_pool / GIB:.2f} GiB "
                f"({self.num_blocks} blocks x {self.block_tokens} tokens = {self.num_blocks * self.block_tokens} "
                f"tokens), activations ~{self.activations / GIB:.2f} GiB; {self.available / GIB:.1f} GiB available")


def activation_bytes(hidden: int, intermediate: int, vocab: int, heads: int, head_dim: int,
                     max_batched_tokens: int, max_seqs: int) -> int:
    """Peak transient memory of one step: a few (tokens, width) fp32 buffers and the logits."""
    width = 4 * hidden + 3 * intermediate + 3 * heads * head_dim
    return 4 * (max_batched_tokens * width + max_seqs * vocab) + 64 * 2 ** 20


def plan_memory(weights: int, kv_per_token: int, block_size: int, activations: int, max_model_len: int,
                max_num_seqs: int, kv_cache_gib: float | None, utilization: float,
                available: int | None = None, context_blocks: int | None = None) -> MemoryPlan:
    """available: memory free for this model now (after the weights were loaded, pass what was free before
    loading). context_blocks: the blocks one max_model_len sequence holds (KV groups with windows hold fewer:
    block_manager.blocks_to_hold), ceil(max_model_len / block_size) by default.
    Raises MemoryPlanError when the weights + activations + one full context do not fit."""
    available = available_bytes() if available is None else available
    per_block = kv_per_token * block_size
    budget = int(utilization * available) - weights - activations
    one_context = (context_blocks or -(-max_model_len // block_size)) * per_block
    if kv_cache_gib is not None:
        kv = int(kv_cache_gib * GIB)
        if kv > budget:
            raise MemoryPlanError(
                f"--kv-cache-gib {kv_cache_gib} does not fit: weights {weights / GIB:.2f} GiB + activations "
                f"{activations / GIB:.2f} GiB leave {max(budget, 0) / GIB:.2f} GiB of {available / GIB:.1f} GiB available")
    else:
        if budget < min(one_context, 64 * per_block):
            raise MemoryPlanError(
                f"the model does not fit: weights {weights / GIB:.2f} GiB + activations {activations / GIB:.2f} GiB "
                f"+ a KV pool of at least {min(one_context, 64 * per_block) / GIB:.2f} GiB, with "
                f"{available / GIB:.1f} GiB available x {utilization} utilization")
        wanted = max_num_seqs * one_context
        kv = min(budget, wanted, max(DEFAULT_KV_CAP, one_context))
    num_blocks = max(kv // per_block, 2)
    return MemoryPlan(weights, num_blocks * per_block, activations, available, num_blocks, block_size)


def file_bytes(folder: str | Path) -> int:
    """Bytes of the weight files of a model folder (a GGUF sidecar's model.gguf or *.safetensors)."""
    folder = Path(folder)
    gguf = folder / "model.gguf"
    if gguf.exists():
        return os.stat(gguf).st_size
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
