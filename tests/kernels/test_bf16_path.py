"""The large-batch path for CPUs with AMX (kernels/csrc/dequant_bf16.cpp): quantized weights expanded to
bf16 and multiplied by oneDNN. It is only an algorithm choice, so any CPU can run it when forced
(BERTH_BF16_MIN_ROWS); it must give the int8-kernel path's answer within the rounding of both."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import native

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import json, sys, torch
from kernels import native
from server.engine.models.weights import build_model
from tests.engine.test_models import new_caches, run_chunk, BLOCK_SIZE
model = build_model(sys.argv[1], torch.float32, "cpu")
prompt = list(range(100, 180))   # 80 tokens: one prefill of 80 rows
logits = run_chunk(model, new_caches(model, 40), prompt, 0, list(range(20)))
print(json.dumps({"rows": native.load().bf16_min_rows(), "team": model._native.team,
                  "last": logits[-1].tolist(), "argmax": logits.argmax(-1).tolist()}))
"""


def run(folder: str, rows: str | None) -> dict:
    env = dict(os.environ)
    env.pop("BERTH_BF16_MIN_ROWS", None)
    if rows is not None:
        env["BERTH_BF16_MIN_ROWS"] = rows
    out = subprocess.run([sys.executable, "-c", SCRIPT, folder], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forced_bf16_products_match_the_int8_kernels(default_gguf_model):
    if native.load() is None:
        pytest.skip("native extension not built here")
    import torch

    kernels_path = run(default_gguf_model, "0")          # never bf16
    bf16_path = run(default_gguf_model, "16")            # every product of 16+ rows in bf16
    assert kernels_path["rows"] == 0 and bf16_path["rows"] == 16
    a, b = torch.tensor(kernels_path["last"]), torch.tensor(bf16_path["last"])
    assert float((a - b).abs().max()) <= 0.05 * float(a.max() - a.min())
    agree = sum(x == y for x, y in zip(kernels_path["argmax"], bf16_path["argmax"])) / len(bf16_path["argmax"])
    assert agree >= 0.9


def test_default_is_bf16_only_with_amx():
    if native.load() is None:
        pytest.skip("native extension not built here")
    if os.environ.get("BERTH_BF16_MIN_ROWS"):
        pytest.skip("forced by the environment")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert (native.load().bf16_min_rows() > 0) == (" amx_bf16" in flags)
