"""Gemma 2 (Gemma2ForCausalLM) and Gemma 3 text (Gemma3ForCausalLM) on the paged engine against transformers
(tiny random configs, fp32).

Configs (sliding_window 4, so the 13-token prompt outgrows it; norms randomised around transformers' zero init):
- gemma2: four layers (local, global, local, global: Gemma 2's alternation; two KV groups of two slots), attention logit soft-capping 2.0 and final logit
  soft-capping 1.5 (small enough that both change the logits: test_soft_capping_changes_the_logits),
  query_pre_attn_scalar 24 (not head_dim), tied embeddings.
- gemma3: six layers (five local, one global: Gemma 3's default pattern, the one llama.cpp assumes for a GGUF),
  q/k norms, local layers on RoPE base 10000, global layers on base 1000 with linear scaling (factor 2), untied
  output layer, no soft-capping.
- gemma2_gguf: gemma2 with query_pre_attn_scalar = head_dim, the value llama.cpp derives for a GGUF that is not
  the 27B model (the GGUF has no key for it).
Gemma runs on the native C++ step (its (1 + w) norms, output norms, GELU-tanh, per-layer windows and RoPE tables,
soft-capping and scale): the comparisons with transformers below run the C++ step where the extension is built,
and test_native_and_pytorch_paths_agree checks it against the PyTorch path.
"""
import copy

import gguf
import numpy as np
import pytest
import torch
import transformers

from server.engine.models.gguf_loader import build_gguf_model, config_from_metadata
from server.engine.models.llama import GemmaRMSNorm, is_supported, layer_windows
from server.engine.models.weights import build_model
from tests.engine.test_gguf_models import make_folder
from tests.engine.test_models import (PROMPT, assert_greedy_matches, chunks_then_decode, hf_logits, mixed_batch_logits,
                                      native_and_pytorch_logits, new_caches, randomize_norms, run_chunk,
                                      saved_folders, scattered_table)

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, rms_norm_eps=1e-6, initializer_range=0.1, sliding_window=4, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
CONFIGS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=4, attn_logit_softcapping=2.0, final_logit_softcapping=1.5,
                    query_pre_attn_scalar=24)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=6, query_pre_attn_scalar=16, rope_parameters=GEMMA3_ROPE,
                    tie_word_embeddings=False)),
    "gemma2_gguf": ("Gemma2Config", "Gemma2ForCausalLM",
                    dict(num_hidden_layers=2, attn_logit_softcapping=2.0, final_logit_softcapping=1.5,
                         query_pre_attn_scalar=16)),
}
CASES = ["gemma2", "gemma3"]


def tiny_gemma(name: str):
    config_cls, model_cls, extra = CONFIGS[name]
    config = getattr(transformers, config_cls)(**copy.deepcopy({**BASE, **extra}))   # (configs edit their dicts)
    torch.manual_seed(0)
    hf_model = getattr(transformers, model_cls)(config).eval()
    return randomize_norms(hf_model)   # transformers starts norms at fixed values


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return saved_folders(tmp_path_factory, tiny_gemma, CONFIGS)


@pytest.fixture(params=CASES)
def case(request, folders):
    hf_model, folder = folders[request.param]
    return request.param, hf_model, build_model(folder, torch.float32, "cpu")


def test_configs_are_supported_with_their_layers(case):
    name, hf_model, model = case
    assert is_supported(hf_model.config)
    assert model.native_capable
    assert layer_windows(hf_model.config) == ([4, None] * 2 if name == "gemma2" else [4] * 5 + [None])
    attn = [layer.self_attn for layer in model.model.layers]
    assert [a.sliding_window for a in attn] == layer_windows(hf_model.config)
    assert [a.softcap for a in attn] == ([2.0] * 4 if name == "gemma2" else [None] * 6)
    assert attn[0].scale == (24 ** -0.5 if name == "gemma2" else 16 ** -0.5)
    assert attn[0].has_qk_norm == (name == "gemma3")
    assert (model.model.rotary_emb_local is not None) == (name == "gemma3")
    assert model.tie_word_embeddings == (name == "gemma2")


def test_prefill_matches_transformers(case):
    _, hf_model, model = case
    logits = run_chunk(model, new_caches(model, 64), PROMPT, 0, scattered_table(5))
    torch.testing.assert_close(logits, hf_logits(hf_model, PROMPT), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_over_a_cached_prefix_then_decode_matches_transformers(case):
    _, hf_model, model = case
    torch.testing.assert_close(chunks_then_decode(model, PROMPT, 3, len(PROMPT) - 4), hf_logits(hf_model, PROMPT),
                               atol=1e-4, rtol=1e-4)
    from kernels import native
    assert (getattr(model, "_native", None) is not None) == (native.load() is not None)   # the C++ step


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_native_and_pytorch_paths_agree(case, quantization):
    """The C++ step against the PyTorch path: a prefill, a chunk over the cached prefix that outgrows the window,
    and decode steps; int4 runs the one-team step."""
    from kernels import native

    if native.load() is None:
        pytest.skip("the native extension is not built here")
    _, _, model = case
    model = copy.deepcopy(model)
    if quantization == "int4":
        model.quantize("int4")
    native_logits, torch_logits = native_and_pytorch_logits(model, PROMPT, 3, 8)
    assert model._native.team == (quantization == "int4")
    if quantization == "none":
        torch.testing.assert_close(native_logits, torch_logits, atol=2e-5, rtol=1e-4)
    else:
        assert torch.nn.functional.cosine_similarity(native_logits, torch_logits, dim=1).min() > 0.999


def test_batched_with_other_sequences_matches_transformers(case):
    """Two decode rows and a prefill row in one step give each sequence transformers' logits."""
    _, hf_model, model = case
    n = len(PROMPT)
    prompts = [PROMPT[:n - 4], PROMPT[2:n - 1], PROMPT[:n - 6]]
    logits = mixed_batch_logits(model, prompts)
    expected = torch.stack([hf_logits(hf_model, p)[-1] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_greedy_decode_through_the_paged_cache_matches_transformers(case):
    _, hf_model, model = case
    assert_greedy_matches(hf_model, model, PROMPT, 6)


def test_soft_capping_changes_the_logits(folders):
    """The test config's caps are small enough to matter: transformers without them is far from berth's logits."""
    hf_model, folder = folders["gemma2"]
    model = build_model(folder, torch.float32, "cpu")
    ours = run_chunk(model, new_caches(model, 64), PROMPT, 0, scattered_table(5))
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped = copy.deepcopy(hf_model)
        setattr(uncapped.config, field, None)
        for layer in uncapped.model.layers:
            layer.self_attn.attn_logit_softcapping = uncapped.config.attn_logit_softcapping
        assert float((hf_logits(uncapped, PROMPT) - ours).abs().max()) > 1e-2, field


def test_bf16_model_runs_close(folders):
    """bf16 weights and activations (the CUDA default): close to transformers' fp32 logits."""
    hf_model, folder = folders["gemma3"]
    model = build_model(folder, torch.bfloat16, "cpu")
    caches = [(k.bfloat16(), v.bfloat16()) for k, v in new_caches(model, 64)]
    logits = run_chunk(model, caches, PROMPT, 0, scattered_table(5))
    expected = hf_logits(hf_model, PROMPT)
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.7
    torch.testing.assert_close(logits, expected, atol=0.15, rtol=0.1)


def test_int8_while_loading_stays_close(folders):
    """Weight-only int8 as the checkpoint streams in (the four norms and q/k norms load beside it)."""
    hf_model, folder = folders["gemma3"]
    model = build_model(folder, torch.float32, "cpu", quantization="int8")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.int8 is not None and qkv.weight.numel() == 0
    logits = run_chunk(model, new_caches(model, 64), PROMPT, 0, scattered_table(5))
    assert torch.nn.functional.cosine_similarity(logits, hf_logits(hf_model, PROMPT), dim=1).min() > 0.99


# ---- GGUF (llama.cpp's converter: Gemma2Model / Gemma3Model) ---------------------------------------------

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm"}


def write_gemma_gguf(path, hf_model, arch: str, qtype: str) -> dict[str, np.ndarray]:
    """Write the GGUF as llama.cpp's converter does (norm weights + 1, no lm_head when tied, the keys it
    writes); returns each 2-D tensor as the file holds it, dequantised (fp32)."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        rope = cfg.rope_parameters["full_attention"]
        w.add_rope_freq_base(rope["rope_theta"])
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"] + 1}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, gg in GGUF_NAMES.items():
            key = f"model.layers.{i}.{hf}.weight"
            if key in sd:
                tensors[f"blk.{i}.{gg}.weight"] = sd[key] + 1 if hf.endswith("norm") else sd[key]
    stored = {}
    for name, value in tensors.items():
        if value.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            q = gguf.quants.quantize(value, kind)
            w.add_tensor(name, q, raw_dtype=kind)
            stored[name] = gguf.quants.dequantize(q, kind).reshape(value.shape)
        else:
            w.add_tensor(name, np.ascontiguousarray(value))
            stored[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def hf_from_stored(hf_model, stored: dict[str, np.ndarray]):
    """A copy of hf_model holding the GGUF's dequantised matrices."""
    model = copy.deepcopy(hf_model)
    sd, back = model.state_dict(), {gg: hf for hf, gg in GGUF_NAMES.items()}
    with torch.no_grad():
        for name, value in stored.items():
            if name.startswith("blk.") and value.ndim == 2:
                _, i, gg, _ = name.split(".")
                sd[f"model.layers.{i}.{back[gg]}.weight"].copy_(torch.from_numpy(value))
        sd["model.embed_tokens.weight"].copy_(torch.from_numpy(stored["token_embd.weight"]))
        if "output.weight" in stored:
            sd["lm_head.weight"].copy_(torch.from_numpy(stored["output.weight"]))
    return model


@pytest.mark.parametrize("config_name,arch", [("gemma2_gguf", "gemma2"), ("gemma3", "gemma3")])
def test_f32_gguf_loads_natively_and_matches_transformers(folders, tmp_path, config_name, arch):
    """Norm weights stored as 1 + weight (GemmaRMSNorm's own + 1 turned off), layer pattern and
    query_pre_attn_scalar as llama.cpp derives them, Gemma 3's local RoPE base (llama.cpp's 10000) and the
    global layers' linear scaling; prefill and decode through the paged cache."""
    hf_model, _ = folders[config_name]
    path = tmp_path / "m.gguf"
    write_gemma_gguf(path, hf_model, arch, "F32")
    folder = make_folder(tmp_path, path)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.model_type == hf_model.config.model_type and is_supported(config)
    assert config.layer_types == hf_model.config.layer_types
    model, _ = build_gguf_model(folder, torch.device("cpu"))
    assert not any(m.unit_offset for m in model.modules() if isinstance(m, GemmaRMSNorm))
    caches, blocks = new_caches(model, 64), scattered_table(9)
    logits = run_chunk(model, caches, PROMPT[:-2], 0, blocks)
    logits = torch.cat([logits] + [run_chunk(model, caches, [t], p, blocks) for p, t in enumerate(PROMPT) if p >= 11])
    torch.testing.assert_close(logits, hf_logits(hf_model, PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config_name,arch,qtype", [("gemma2_gguf", "gemma2", "Q4_0"), ("gemma3", "gemma3", "Q8_0")])
def test_quantized_gguf_matches_its_dequantised_weights(folders, tmp_path, config_name, arch, qtype):
    """Tensors kept in the file's quant type (native kernels): within 3% of the logit range of transformers run
    on the file's dequantised weights (the bound test_gguf_models.py uses)."""
    hf_model, _ = folders[config_name]
    path = tmp_path / "m.gguf"
    stored = write_gemma_gguf(path, hf_model, arch, qtype)
    model, _ = build_gguf_model(make_folder(tmp_path, path), torch.device("cpu"))
    assert model.model.layers[0].self_attn.qkv_proj.native is not None
    ref = hf_logits(hf_from_stored(hf_model, stored), PROMPT)
    logits = run_chunk(model, new_caches(model, 64), PROMPT, 0, scattered_table(9))
    assert float((logits - ref).abs().max()) <= 0.03 * float(ref.max() - ref.min())


def test_gguf_metadata_follows_llama_cpp_defaults():
    """Keys a Gemma GGUF may lack: llama.cpp's layer patterns (2 and 6), its softcap defaults (transformers'
    too), the 27B models' query_pre_attn_scalar (hidden / heads, by layer count), Gemma 3's local RoPE base."""
    def meta(arch, layers, **extra):
        base = {"general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": 4608,
                f"{arch}.feed_forward_length": 64, f"{arch}.attention.head_count": 32,
                f"{arch}.attention.key_length": 128, f"{arch}.vocab_size": 8}
        return {**base, **{f"{arch}.{k}": v for k, v in extra.items()}}
    g2 = config_from_metadata(meta("gemma2", 46), set())
    assert g2["query_pre_attn_scalar"] == 144 and g2["sliding_window"] == 4096
    assert g2["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert "attn_logit_softcapping" not in g2    # Gemma2Config's default, 50.0, as llama.cpp's
    g3 = config_from_metadata(meta("gemma3", 8, **{"attention.sliding_window": 512}), set())
    assert g3["model_type"] == "gemma3_text" and g3["query_pre_attn_scalar"] == 128
    assert g3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2
    assert g3["rope_local_base_freq"] == 10000.0 and g3["final_logit_softcapping"] is None
    assert config_from_metadata(meta("gemma3", 62, **{"attention.sliding_window": 512}), set())[
        "query_pre_attn_scalar"] == 4608 // 32


def test_unsupported_gemma_variants_stay_off_the_paged_engine(folders):
    """Bidirectional attention, an unknown activation, the multimodal gemma3 config: transformers serves them."""
    config = copy.deepcopy(folders["gemma3"][0].config)
    config.use_bidirectional_attention = True
    assert not is_supported(config)
    config = copy.deepcopy(folders["gemma2"][0].config)
    config.hidden_activation = "relu"
    assert not is_supported(config)
    multimodal = transformers.Gemma3Config(architectures=["Gemma3ForConditionalGeneration"])
    assert not is_supported(multimodal)


def test_engine_serves_gemma_on_the_paged_engine(folders, tmp_path, caplog):
    """End to end: the factory picks the paged engine with the native step, and two batched requests
    (prompt token ids, greedy) give transformers' tokens, through the scheduler, the model runner and the
    sliding-window layers."""
    import shutil

    from protocol.types import GenerateRequest, SamplingParams
    from server.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.factory import build_engine
    from server.model_store import resolve_model
    from tests.engine.test_engine_oracle import run_all

    hf_model, folder = folders["gemma2"]
    shutil.copytree(folder, tmp_path / "m")
    transformers.AutoTokenizer.from_pretrained(str(resolve_model("default"))).save_pretrained(tmp_path / "m")
    with caplog.at_level("INFO", logger="berth.engine"):
        engine = build_engine(EngineConfig(dtype="float32", max_model_len=64, kv_cache_gib=0.01, block_size=4),
                              str(tmp_path / "m"))
    assert isinstance(engine, Engine)
    from kernels import native
    if native.load() is not None:
        assert any("native step" in r.message for r in caplog.records)
    prompts = {"a": PROMPT, "b": PROMPT[:8] + [5, 9, 33]}
    requests = [GenerateRequest(rid, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                prompt_token_ids=ids) for rid, ids in prompts.items()]
    got = run_all(engine, requests)
    for rid, ids in prompts.items():
        expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got[rid] == expected[0, len(ids):].tolist(), rid


def test_kv_groups_split_local_and_global_layers():
    """arch.kv_groups: one group where every layer attends alike; Gemma's local and global layers in groups of one
    size (vLLM's rule), full attention first, and a window of at least max_model_len counted as none."""
    from server.engine.models.arch import kv_groups

    def gemma(model_type, layers, **extra):
        cls = transformers.Gemma2Config if model_type == "gemma2" else transformers.Gemma3TextConfig
        return cls(**{**BASE, "num_hidden_layers": layers, **extra})

    gemma2 = kv_groups(gemma("gemma2", 26))   # alternating: 13 and 13
    assert [g.window for g in gemma2] == [None, 4] and [len(g.layers) for g in gemma2] == [13, 13]
    assert gemma2[0].layers == tuple(range(1, 26, 2)) and gemma2[1].layers == tuple(range(0, 26, 2))
    gemma3 = kv_groups(gemma("gemma3_text", 26))   # five local to one global: 22 and 4, groups of 4
    assert [g.window for g in gemma3] == [None] + [4] * 6
    assert [len(g.layers) for g in gemma3] == [4, 4, 4, 4, 4, 4, 2] and gemma3[0].layers == (5, 11, 17, 23)
    assert sorted(i for g in gemma3 for i in g.layers) == list(range(26))
    assert [g.window for g in kv_groups(gemma("gemma3_text", 26), max_model_len=4)] == [None]
    # the pool pays for one slot set per block: 4 layers' K and V rows per token for that Gemma 3, not 26
    from server.engine.model_runner import kv_bytes_per_token
    assert kv_bytes_per_token(gemma("gemma3_text", 26), torch.float32) == 2 * 4 * 2 * 16 * 4
    assert kv_bytes_per_token(gemma("gemma3_text", 26), torch.float32, max_model_len=4) == 2 * 26 * 2 * 16 * 4
    llama = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4)
    assert kv_groups(llama) == [kv_groups(llama)[0]] and kv_groups(llama)[0].layers == (0, 1, 2)
    phi3 = transformers.Phi3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, sliding_window=5)
    assert [(g.layers, g.window) for g in kv_groups(phi3)] == [((0, 1), 5)]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("native_step", [True, False])
def test_engine_local_layers_keep_only_their_window_and_match_transformers(folders, tmp_path, default_model, name,
                                                                          native_step):
    """The whole engine with Gemma's KV groups (window 4, blocks of 2, chunked prefill, three sequences, then the
    same prompts again over the prefix cache): the local layers' tables give back the blocks no later query sees,
    the KV pool has one slot set per group size rather than a tensor per layer, and every sequence gets
    transformers' greedy tokens, on the C++ step and on the PyTorch path."""
    import shutil

    from protocol.types import GenerateRequest, SamplingParams
    from server.config import EngineConfig
    from server.engine.block_manager import NULL_BLOCK
    from server.engine.engine import Engine
    from tests.engine.test_engine_oracle import run_all

    hf_model, folder = folders[name]
    shutil.copytree(folder, tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):   # ids < 128 only are used
        shutil.copy(f"{default_model}/{f}", tmp_path / "m" / f)
    config = EngineConfig(kv_cache_gib=0.01, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8, block_size=2)
    engine = Engine.from_folder(str(tmp_path / "m"), config, torch.device("cpu"), torch.float32)
    engine.runner.model.native_step = native_step
    layers = hf_model.config.num_hidden_layers
    windows = engine.block_manager.windows
    assert windows[0] is None and set(windows[1:]) == {4} and len(windows) == (2 if name == "gemma2" else 6)
    # slot tensors: gemma2 two groups of two layers, gemma3 one global and five local groups of one layer
    assert len({id(k) for k, _ in engine.runner.kv_caches}) == (2 if name == "gemma2" else 1) < layers
    prompts = [PROMPT, PROMPT[:9] + [77, 5, 61, 2, 9, 40], PROMPT[3:]]
    released = 0

    def step_and_count():
        nonlocal released
        out = []
        while engine.has_unfinished():
            out += engine.step()
            engine.scheduler.check_integrity()
            for seq in engine.scheduler.running:
                for window, table in zip(windows, seq.block_tables):
                    assert (NULL_BLOCK in table) <= bool(window)   # the global table keeps every block
                released = max(released, sum(t.count(NULL_BLOCK) for s in engine.scheduler.running
                                             for t in s.block_tables[1:]))
        return out

    hf_model.generation_config.eos_token_id = None
    for wave in range(2):   # the second wave hits the prefix cache: global blocks, and local ones in the window
        requests = [GenerateRequest(f"r{wave}{i}", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                    prompt_token_ids=ids) for i, ids in enumerate(prompts)]
        for r in requests:
            engine.add(r)
        tokens = {r.request_id: [] for r in requests}
        for rid, ev in step_and_count():
            tokens[rid] += getattr(ev, "token_ids", [])
        for i, ids in enumerate(prompts):
            expected = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert tokens[f"r{wave}{i}"] == expected[0, len(ids):].tolist(), (wave, i)
    assert released >= 6
    assert engine.block_manager.prefix_hit_stats.num_hit_tokens > 0
