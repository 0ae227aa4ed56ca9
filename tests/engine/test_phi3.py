"""Phi-3 (Phi3ForCausalLM) on the paged engine against transformers' Phi3ForCausalLM (tiny random configs, fp32).

Cases (the plain full-rotary model with LongRoPE's short factors is also in test_models.CASES, which the native
step's tests reuse):
- longrope_partial_short: partial rotary (0.75 of each head, Phi-4-mini) and LongRoPE, berth built for
  max_model_len = original_max_position_embeddings (16): short factors, sequences of at most 16 tokens, where
  transformers uses the short factors as well.
- longrope_partial_long / longrope_full_long: max_model_len 64 > 16: long factors and the attention factor for
  every sequence; compared on sequences longer than 16 tokens, where transformers uses the long factors too.
  (Sequences of 16 tokens or fewer under such a max_model_len would get the short factors in transformers: the
  divergence llama.py's docstring describes, shared with vLLM and llama.cpp.)
- window: sliding_window 5 (transformers masks it): 13-token prompts, so attention outgrows the window.
Every case runs on the native C++ step (partial rotary and the window included); the PyTorch path is checked
against it below.
"""
import pytest
import torch
import transformers

from server.engine.models.gguf_loader import build_gguf_model
from server.engine.models.llama import is_supported
from server.engine.models.weights import build_model
from tests.engine.test_gguf_models import hf_from_stored, make_folder, write_gguf
from tests.engine.test_models import (PROMPT, assert_greedy_matches, chunks_then_decode, hf_logits, mixed_batch_logits,
                                      native_and_pytorch_logits, new_caches, randomize_norms, run_chunk,
                                      saved_folders, scattered_table)

ORIGINAL = 16
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.1,   # weights large enough that RoPE matters
            pad_token_id=None, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)


def longrope(rotary_dim: int) -> dict:
    n = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(n)],
            "long_factor": [1.5 + 0.5 * i for i in range(n)]}


CONFIGS = {
    "longrope_partial": dict(original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.75,
                             rope_parameters={**longrope(12), "partial_rotary_factor": 0.75}),
    "longrope_full": dict(original_max_position_embeddings=ORIGINAL, rope_parameters=longrope(16)),
    "window": dict(sliding_window=5, tie_word_embeddings=True),
}
LONG_PROMPT = [3, 17, 99, 42, 7, 7, 120, 1, 64, 5, 88, 23, 11, 90, 31, 76, 2, 45, 60, 12, 100, 8, 54, 33]  # 24 > 16
# case -> (config, berth's max_positions, prompt, new tokens in the greedy test, expects the native step)
CASES = {
    "longrope_partial_short": ("longrope_partial", ORIGINAL, PROMPT, 3, True),
    "longrope_partial_long": ("longrope_partial", None, LONG_PROMPT, 6, True),
    "longrope_full_long": ("longrope_full", None, LONG_PROMPT, 6, True),
    "window": ("window", None, PROMPT, 6, True),
}


def tiny_phi3(name: str):
    config = transformers.Phi3Config(**{**BASE, **CONFIGS[name]})
    torch.manual_seed(0)
    hf_model = transformers.Phi3ForCausalLM(config).eval()
    return randomize_norms(hf_model)   # transformers starts norms at fixed values


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return saved_folders(tmp_path_factory, tiny_phi3, CONFIGS)


@pytest.fixture(params=sorted(CASES))
def case(request, folders):
    config_name, max_positions, prompt, new_tokens, native = CASES[request.param]
    hf_model, folder = folders[config_name]
    model = build_model(folder, torch.float32, "cpu", max_positions)
    return request.param, hf_model, model, prompt, new_tokens, native


def test_configs_are_supported_with_their_regime(case):
    name, hf_model, model, _, _, _ = case
    assert is_supported(hf_model.config)
    assert model.model.rotary_emb.long_factors == name.endswith("_long")
    assert model.native_capable
    assert model.model.rotary_emb.cos_sin_cache.shape[1] == (12 if "partial" in name else 16)


def test_prefill_matches_transformers(case):
    _, hf_model, model, prompt, _, _ = case
    logits = run_chunk(model, new_caches(model, 64), prompt, 0, scattered_table(5))
    torch.testing.assert_close(logits, hf_logits(hf_model, prompt), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_over_a_cached_prefix_then_decode_matches_transformers(case):
    _, hf_model, model, prompt, _, native = case
    logits = chunks_then_decode(model, prompt, 4, len(prompt) - 4)   # a chunk over the cached prefix, then decode
    torch.testing.assert_close(logits, hf_logits(hf_model, prompt), atol=1e-4, rtol=1e-4)
    assert (getattr(model, "_native", None) is not None) == native


def test_batched_with_other_sequences_matches_transformers(case):
    """Two decode rows and a prefill row in one step give each sequence transformers' logits."""
    _, hf_model, model, prompt, _, _ = case
    n = len(prompt)
    prompts = [prompt[:n - 4], prompt[2:n - 1], prompt[:n - 6]]
    logits = mixed_batch_logits(model, prompts)
    expected = torch.stack([hf_logits(hf_model, p)[-1] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_greedy_decode_through_the_paged_cache_matches_transformers(case):
    _, hf_model, model, prompt, new_tokens, _ = case
    assert_greedy_matches(hf_model, model, prompt, new_tokens)


@pytest.mark.parametrize("config_name,prompt", [("window", PROMPT), ("longrope_partial", LONG_PROMPT)])
def test_native_and_pytorch_paths_agree(folders, config_name, prompt):
    """The C++ step (RoPE on the rotary dimensions only; each query attending to its last sliding_window keys)
    against the PyTorch path on the same caches' layout, for a prefill, a chunk over the cached prefix that
    outgrows the window, and decode steps; int4 too (the team step)."""
    hf_model, folder = folders[config_name]
    for quantization in ("none", "int4"):
        model = build_model(folder, torch.float32, "cpu")
        if quantization == "int4":
            model.quantize("int4")
        results = native_and_pytorch_logits(model, prompt, 4, 9)
        assert model._native is not None and model._native.team == (quantization == "int4")
        if quantization == "none":
            torch.testing.assert_close(results[0], results[1], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(results[0], hf_logits(hf_model, prompt), atol=1e-4, rtol=1e-4)
        else:
            assert torch.nn.functional.cosine_similarity(results[0], results[1], dim=1).min() > 0.999


def test_fused_checkpoint_tensors_are_checked_and_quantize_while_loading(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model, folder = folders["longrope_partial"]
    streamed = build_model(folder, torch.float32, "cpu", quantization="int8")
    qkv = streamed.model.layers[0].self_attn.qkv_proj
    assert qkv.int8 is not None and qkv.weight.numel() == 0
    logits = run_chunk(streamed, new_caches(streamed, 64), LONG_PROMPT, 0, scattered_table(5))
    ref = hf_logits(hf_model, LONG_PROMPT)
    assert torch.nn.functional.cosine_similarity(logits, ref, dim=1).min() > 0.99
    import shutil
    shutil.copytree(folder, tmp_path / "bad")
    tensors = load_file(str(tmp_path / "bad" / "model.safetensors"))
    tensors["model.layers.0.mlp.gate_up_proj.weight"] = tensors["model.layers.0.mlp.gate_up_proj.weight"][:96]
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match="gate_up_proj"):
        build_model(str(tmp_path / "bad"), torch.float32, "cpu")


@pytest.mark.parametrize("config_name,max_positions,prompt", [
    ("longrope_partial", ORIGINAL, PROMPT), ("longrope_partial", None, LONG_PROMPT), ("window", None, PROMPT)])
def test_f32_gguf_loads_natively_and_matches_transformers(folders, tmp_path, config_name, max_positions, prompt):
    """A GGUF written as llama.cpp's converter writes Phi-3 (arch phi3: blk.N.attn_qkv, ffn_up = gate|up,
    rope_factors_long/short, rope.dimension_count, rope.scaling.original_context_length, sliding_window)."""
    hf_model, _ = folders[config_name]
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_model, "phi3", "F32")
    folder = make_folder(tmp_path, path)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.model_type == "phi3" and config.sliding_window == hf_model.config.sliding_window
    model, _ = build_gguf_model(folder, torch.device("cpu"), max_positions)
    logits = run_chunk(model, new_caches(model, 64), prompt, 0, scattered_table(9))
    torch.testing.assert_close(logits, hf_logits(hf_model, prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_gguf_matches_its_dequantised_weights(folders, tmp_path, qtype):
    """Fused attn_qkv / ffn_up kept in the file's quant type (native kernels): within 3% of the logit range of
    transformers run on the file's dequantised weights (the bound test_gguf_models.py uses)."""
    hf_model, _ = folders["longrope_partial"]
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, hf_model, "phi3", qtype)
    model, _ = build_gguf_model(make_folder(tmp_path, path), torch.device("cpu"))
    assert model.model.layers[0].self_attn.qkv_proj.weight.numel() == 0   # no float copy of the weight
    assert model.model.layers[0].mlp.gate_up_proj.native is not None
    ref = hf_logits(hf_from_stored(hf_model, stored, "phi3"), LONG_PROMPT)
    logits = run_chunk(model, new_caches(model, 64), LONG_PROMPT, 0, scattered_table(9))
    assert float((logits - ref).abs().max()) <= 0.03 * float(ref.max() - ref.min())


def test_unsupported_rope_type_falls_back_with_one_log_line(tmp_path, caplog):
    """A rope type berth does not implement (dynamic NTK scaling: position-dependent; Phi3Config itself only
    accepts default and longrope) keeps the paged engine out: transformers serves it, with one warning."""
    from server.config import EngineConfig
    from server.engine.factory import build_engine
    from server.engine.hf_engine import HFEngine
    from server.model_store import resolve_model

    phi3 = tiny_phi3("longrope_full").config
    phi3.rope_parameters = {**phi3.rope_parameters, "rope_type": "dynamic"}
    assert not is_supported(phi3)
    llama_longrope = {**CONFIGS["longrope_full"]["rope_parameters"], "original_max_position_embeddings": ORIGINAL}
    assert not is_supported(transformers.LlamaConfig(**BASE, rope_parameters=llama_longrope))   # Phi-3 only
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config = transformers.LlamaConfig(**{k: v for k, v in BASE.items() if k != "initializer_range"},
                                      rope_parameters=dynamic, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "dynamic")
    transformers.AutoTokenizer.from_pretrained(str(resolve_model("default"))).save_pretrained(tmp_path / "dynamic")
    with caplog.at_level("WARNING", logger="berth.engine"):
        engine = build_engine(EngineConfig(dtype="float32"), str(tmp_path / "dynamic"))
    assert isinstance(engine, HFEngine)
    assert sum("not supported by the paged engine" in r.message for r in caplog.records) == 1


def test_engine_releases_blocks_out_of_the_window_and_matches_transformers(folders, tmp_path, default_model):
    """The whole engine on the windowed model (window 5, blocks of 2, chunked prefill): blocks that no later
    query can see go back to the pool as the sequences advance, and every sequence still gets transformers'
    greedy tokens."""
    import shutil

    from protocol.types import Finished, GenerateRequest, SamplingParams, TokenDelta
    from server.config import EngineConfig
    from server.engine.engine import Engine

    hf_model, folder = folders["window"]
    shutil.copytree(folder, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):   # ids < 128 only are used
        shutil.copy(f"{default_model}/{f}", tmp_path / "m" / f)
    config = EngineConfig(kv_cache_gib=0.01, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8, block_size=2)
    engine = Engine.from_folder(str(tmp_path / "m"), config, torch.device("cpu"), torch.float32)
    assert engine.block_manager.windows == [5]
    prompts = [PROMPT, LONG_PROMPT[:17], PROMPT[2:]]
    for i, ids in enumerate(prompts):
        engine.add(GenerateRequest(f"r{i}", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                   prompt_token_ids=ids))
    tokens, released = {f"r{i}": [] for i in range(len(prompts))}, 0
    while engine.has_unfinished():
        for rid, ev in engine.step():
            if isinstance(ev, TokenDelta):
                tokens[rid] += ev.token_ids
        engine.scheduler.check_integrity()
        held = sum(len(s.block_table) for s in engine.scheduler.running)
        released = max(released, held - engine.block_manager.num_used_blocks)
    assert released >= 6   # table entries no longer holding a block (3 sequences, up to 12 blocks each)
    hf_model.generation_config.eos_token_id = None
    for i, ids in enumerate(prompts):
        expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert tokens[f"r{i}"] == expected[0, len(ids):].tolist(), i
