"""kernels/__init__: the backend chosen at import (flash-attn, then Triton, then the reference on CUDA; the
reference without CUDA) and the KV block size the engine takes from it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_picks_the_reference_and_imports_no_gpu_module():
    probe = "import json, sys, kernels; print(json.dumps([kernels.BACKEND, sorted(m for m in sys.modules " \
            "if m.split('.')[0] in ('triton', 'flash_attn') or m.startswith('kernels.triton'))]))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["reference", []]


@pytest.mark.parametrize("importable,expected", [({"flash", "triton"}, "flash"), ({"triton"}, "triton"),
                                                 (set(), "reference")])
def test_cuda_prefers_flash_then_triton_then_the_reference(monkeypatch, importable, expected):
    real_import = kernels.importlib.import_module
    fakes = {name: type(sys)(f"kernels.{name}") for name in ("flash", "triton")}
    for name, module in fakes.items():
        module.store_kv = module.paged_attention = lambda *a, _name=name: _name

    def fake_import(name, *args):
        short = name.removeprefix("kernels.")
        if short in fakes:
            if short not in importable:
                raise ImportError(f"no {short} here")
            return fakes[short]
        return real_import(name, *args)
    monkeypatch.setattr(kernels.importlib, "import_module", fake_import)
    backend, store, attend = kernels._select_backend(cuda=True)
    assert backend == expected
    if expected == "reference":
        assert (store, attend) == (reference.store_kv, reference.paged_attention)
    else:
        assert store() == attend() == expected
    assert kernels._select_backend(cuda=False)[0] == "reference"


@pytest.mark.parametrize("backend,default", [("flash", 256), ("triton", 16), ("reference", 16)])
def test_block_size_follows_the_backend_on_cuda(monkeypatch, backend, default):
    monkeypatch.setattr(kernels, "BACKEND", backend)
    assert kernels.block_size_for(torch.device("cuda")) == default
    assert kernels.block_size_for(torch.device("cpu")) == 16          # CPU tensors take the reference
    assert kernels.block_size_for("cuda", 512) == 512
    if backend == "flash":
        with pytest.raises(ValueError, match="multiple of 256"):
            kernels.block_size_for("cuda", 16)
    else:
        assert kernels.block_size_for("cuda", 4) == 4
    with pytest.raises(ValueError):
        kernels.block_size_for("cpu", 0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from bench.random_model import TINY_LLAMA, write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny"), TINY_LLAMA, "float32")


@pytest.mark.parametrize("requested,expected", [(None, 16), (8, 8)])
def test_engine_takes_the_backend_block_size_unless_given(tiny_folder, requested, expected):
    from server.config import EngineConfig
    from server.engine.engine import Engine

    config = EngineConfig(block_size=requested, kv_cache_gib=0.01, max_model_len=128, max_num_seqs=4)
    engine = Engine.from_folder(str(tiny_folder), config, torch.device("cpu"), torch.float32)
    assert engine.runner.block_size == engine.block_manager.block_size == expected
    assert engine.runner.kv_caches[0][0].shape[1] == expected
