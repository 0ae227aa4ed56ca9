"""`berth serve` start-up: bad models fail with one clear line and a non-zero exit; fallback engine."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def serve(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {"BERTH_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "server.cli", "serve", *args, "--port", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("make_model,fragment", [
    (lambda p: str(p / "missing"), "model not found"),
    (lambda p: (p / "junk.gguf").write_bytes(b"not a gguf at all") and str(p / "junk.gguf"), "not a GGUF file"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no config.json"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and str(p / "w.bin"), "unsupported model file"),
])
def test_bad_model_is_one_clear_line(tmp_path, make_model, fragment):
    proc = serve("--model", make_model(tmp_path), tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("berth: error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr


def test_unsupported_architecture_falls_back_to_transformers(tmp_path, caplog):
    import transformers

    from server.config import EngineConfig
    from server.engine.factory import build_engine
    from server.engine.hf_engine import HFEngine

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    from server.model_store import resolve_model
    transformers.AutoTokenizer.from_pretrained(str(resolve_model("default"))).save_pretrained(tmp_path / "gpt2")
    with caplog.at_level("WARNING", logger="berth.engine"):
        engine = build_engine(EngineConfig(dtype="float32"), str(tmp_path / "gpt2"))
    assert isinstance(engine, HFEngine)
    assert sum("not supported by the paged engine" in r.message for r in caplog.records) == 1
