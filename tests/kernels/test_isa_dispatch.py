"""The quantized block kernels are chosen per CPU from cpuid (kernels/csrc/dispatch.cpp). Every path this
CPU can run is forced in turn (BERTH_ISA) in its own process and must give the same products: the int8 dot
products are exact in each, so only the float summation order may differ."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import native

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys, torch
from kernels import native
from kernels.quant import quantize_int4, quantize_q8
ext = native.load()
torch.manual_seed(0)
w = torch.randn(80, 512)
out = {"isa": ext.isa()}
for rows in (7, 19):   # 19: AVX-512 VNNI's pair kernels (8 rows and more), 10 blocks: odd halves on 2 threads
    x = torch.randn(rows, 512)
    q4, q8 = quantize_int4(w), quantize_q8(w)
    out[f"q4_{rows}"] = ext.q4_linear(x, q4.q4_packed, q4.q4_scale_min).tolist()
    out[f"q8_{rows}"] = ext.q8_linear(x, q8.qweight, q8.scales).tolist()
print(json.dumps(out))
"""


def run(isa: str | None) -> dict:
    env = {**__import__("os").environ}
    env.pop("BERTH_ISA", None)
    if isa:
        env["BERTH_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_every_kernel_path_this_cpu_runs_gives_the_same_products():
    if native.load() is None:
        pytest.skip("native extension not built here")
    import torch

    best = run(None)
    flags = cpu_flags()
    expected = ("avx512vnni" if {"avx512_vnni", "avx512vl", "avx512bw"} <= flags
                else "avx2" if {"avx2", "fma"} <= flags else "scalar")
    assert best["isa"] == expected      # the best set the CPU has, from cpuid
    for isa in ("avx2", "scalar"):
        forced = run(isa)
        if isa == "avx2" and "avx2" not in flags:
            assert forced["isa"] == "scalar"   # never an instruction the CPU lacks
            continue
        assert forced["isa"] == isa
        for kind in ("q4_7", "q8_7", "q4_19", "q8_19"):
            torch.testing.assert_close(torch.tensor(forced[kind]), torch.tensor(best[kind]), rtol=1e-5, atol=1e-4)
