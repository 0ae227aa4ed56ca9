"""The start-up memory plan (server/engine/memory.py): KV pool from available memory, and a model that cannot
fit refused with one line before anything is allocated."""
import subprocess
import sys

import pytest

from server.engine.memory import DEFAULT_KV_CAP, GIB, MemoryPlanError, available_bytes, plan_memory

KV_PER_TOKEN = 46080   # the default model: 2 x 30 layers x 3 kv heads x 64 x fp32


def test_kv_pool_is_what_is_left_capped():
    plan = plan_memory(weights=1 * GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=GIB // 4,
                       max_model_len=2048, max_num_seqs=64, kv_cache_gib=None, utilization=0.9,
                       available=20 * GIB)
    assert plan.kv_pool <= DEFAULT_KV_CAP and plan.kv_pool > DEFAULT_KV_CAP - 16 * KV_PER_TOKEN
    small = plan_memory(weights=3 * GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=GIB // 4,
                        max_model_len=2048, max_num_seqs=64, kv_cache_gib=None, utilization=0.9,
                        available=4 * GIB)
    assert small.kv_pool <= int(0.9 * 4 * GIB) - 3 * GIB - GIB // 4
    assert small.num_blocks * 16 >= 2048      # one full context still fits
    assert "weights 3.00 GiB" in small.summary() and "KV pool" in small.summary()


def test_kv_pool_is_not_larger_than_the_scheduler_can_use():
    plan = plan_memory(weights=GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=0, max_model_len=256,
                       max_num_seqs=2, kv_cache_gib=None, utilization=0.9, available=20 * GIB)
    assert plan.num_blocks == 2 * 256 // 16


def test_explicit_kv_size_is_honoured_or_refused():
    plan = plan_memory(weights=GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=0, max_model_len=2048,
                       max_num_seqs=64, kv_cache_gib=0.5, utilization=0.9, available=20 * GIB)
    assert plan.num_blocks == int(0.5 * GIB) // (16 * KV_PER_TOKEN)
    with pytest.raises(MemoryPlanError, match="--kv-cache-gib 8"):
        plan_memory(weights=GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=0, max_model_len=2048,
                    max_num_seqs=64, kv_cache_gib=8, utilization=0.9, available=4 * GIB)


def test_model_that_cannot_fit_is_refused():
    with pytest.raises(MemoryPlanError, match="does not fit"):
        plan_memory(weights=20 * GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=GIB, max_model_len=2048,
                    max_num_seqs=64, kv_cache_gib=None, utilization=0.9, available=16 * GIB)


def test_available_memory_is_read():
    assert 0 < available_bytes()


def test_serve_refuses_a_model_that_cannot_fit_with_one_error_line(default_gguf_model):
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", "default", "--port", "1",
                          "--memory-utilization", "0.001"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("berth: error:")]
    assert len(errors) == 1 and "does not fit" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_serve_prints_its_memory_plan_and_serves_the_default_gguf_natively(default_gguf_model):
    from tests.conftest import free_port

    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", "default", "--port",
                             str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "WebUI:" in line or len(lines) > 200:
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    text = "".join(lines)
    assert "memory plan: weights" in text and "KV pool" in text and "activations" in text, text
    assert "GGUF types" in text and "native step" in text, text       # the Q4_1 file itself, on the C++ step
    assert "'SmolLM2-135M-Instruct'" in text


def test_context_blocks_size_the_default_pool():
    """A model whose windowed KV groups hold fewer blocks per context (block_manager.blocks_to_hold) gets a
    default pool of max_num_seqs such contexts, not of full ones."""
    full = plan_memory(weights=GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=0, max_model_len=2048,
                       max_num_seqs=2, kv_cache_gib=None, utilization=0.9, available=64 * GIB)
    windowed = plan_memory(weights=GIB, kv_per_token=KV_PER_TOKEN, block_size=16, activations=0, max_model_len=2048,
                           max_num_seqs=2, kv_cache_gib=None, utilization=0.9, available=64 * GIB, context_blocks=40)
    assert full.num_blocks == 2 * 128 and windowed.num_blocks == 2 * 40


def test_kv_pool_asks_for_no_huge_pages():
    """The KV pool's mapping is not advised MADV_HUGEPAGE (numpy advises it for arrays of 4 MiB or more, from
    their first page boundary on): its VmFlags in /proc/self/smaps lack "hg", so only the blocks written become
    resident; numpy's own advice is back on afterwards."""
    from pathlib import Path

    import numpy as np
    import torch

    from server.engine.model_runner import _zeros

    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("no /proc/self/smaps")

    def flags_of(address: int) -> set[str]:
        inside = False
        for line in smaps.read_text().splitlines():
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
        raise AssertionError("mapping not found")

    pool = _zeros((256, 16, 8, 64), torch.float32, torch.device("cpu"))    # 32 MiB
    assert "hg" not in flags_of(pool.data_ptr() + (1 << 20))
    plain = np.zeros((256, 16, 8, 64), dtype=np.float32)
    multiarray = getattr(np, "_core", getattr(np, "core", None)).multiarray
    if hasattr(multiarray, "_set_madvise_hugepage") and Path("/sys/kernel/mm/transparent_hugepage").exists():
        assert "hg" in flags_of(plain.ctypes.data + (1 << 20))   # numpy's default, restored
