"""GGUF files served natively (server/engine/models/gguf_loader.py) against transformers.

Tiny random checkpoints are written as GGUF the way llama.cpp's converter writes them (Llama's q/k rows
interleaved per head, names blk.N.*), in F32 and in quant types:
- F32: the native model's logits equal transformers' on the same checkpoint (fp32 tolerance) and greedy
  decoding through the paged cache gives the same tokens.
- Q8_0 / Q4_0 / Q4_1: against transformers run on the file's own dequantised weights; the native kernels
  round activations to int8 per group of 32, so logits stay within 3% of the logit range.
"""
import json
import math
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers

from server.engine.models.gguf_loader import GGUF_LINK, GgufError, build_gguf_model, config_from_metadata, read_metadata
from tests.engine.test_models import PROMPT, hf_logits, new_caches, run_chunk

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF rotate-half -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf_model, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 array (GGUF row order) of an HF Llama/Qwen2/Phi-3 state dict (Phi-3 as llama.cpp's
    Phi3MiniModel converter writes it: fused attn_qkv, ffn_up holding gate|up, LongRoPE factor tensors)."""
    cfg, sd = hf_model.config, {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
    rope = getattr(cfg, "rope_parameters", None) or {}
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        out["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
        out["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            for suffix in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{suffix}"
                if key not in sd:
                    continue
                value = sd[key]
                if arch == "llama" and gg in ("attn_q", "attn_k"):
                    value = _permute(value, cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads)
                out[f"blk.{i}.{gg}.{suffix}"] = value
    return out


def write_gguf(path, hf_model, arch: str, qtype: str, tensors: dict[str, np.ndarray] | None = None,
               extra_kv=None) -> dict[str, np.ndarray]:
    """Write the GGUF (the tensors of gguf_tensors unless given; extra_kv(writer) adds keys); returns each tensor
    as the file holds it, dequantised (fp32, GGUF row order)."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    if arch == "phi3":   # the keys llama.cpp's Phi3MiniModel converter writes
        rope = cfg.rope_parameters
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            orig = cfg.original_max_position_embeddings
            scale = cfg.max_position_embeddings / orig
            w.add_rope_scaling_attn_factors(rope.get("attention_factor") or
                                            (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0))
    if extra_kv is not None:
        extra_kv(w)
    stored = {}
    for name, value in (gguf_tensors(hf_model, arch) if tensors is None else tensors).items():
        if value.ndim >= 2 and qtype != "F32" and "ffn_gate_inp" not in name:   # routers stay F32, as llama-quantize keeps them
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


def hf_from_stored(hf_model, stored: dict[str, np.ndarray], arch: str):
    """A copy of hf_model holding the GGUF's dequantised weights (HF row order)."""
    import copy

    cfg, model = hf_model.config, copy.deepcopy(hf_model)
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_qkv": "self_attn.qkv_proj"}
    if arch == "phi3":
        names["ffn_up"] = "mlp.gate_up_proj"
    sd = model.state_dict()
    with torch.no_grad():
        for name, value in stored.items():
            if not name.startswith("blk.") or not name.endswith(".weight") or value.ndim != 2:
                continue
            _, i, gg, _ = name.split(".")
            if arch == "llama" and gg in ("attn_q", "attn_k"):
                value = _unpermute(value, cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads)
            sd[f"model.layers.{i}.{names[gg]}.weight"].copy_(torch.from_numpy(value))
        sd["model.embed_tokens.weight"].copy_(torch.from_numpy(stored["token_embd.weight"]))
        if "output.weight" in stored:
            sd["lm_head.weight"].copy_(torch.from_numpy(stored["output.weight"]))
    return model


def make_folder(tmp_path, gguf_path) -> str:
    reader = gguf.GGUFReader(str(gguf_path))
    config = config_from_metadata(read_metadata(reader), {t.name for t in reader.tensors})
    folder = tmp_path / "sidecar"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    os.symlink(gguf_path, folder / GGUF_LINK)
    return str(folder)


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request):
    config_cls, model_cls, extra = CASES[request.param]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return request.param, model


def _arch(case: str) -> str:
    return "qwen2" if case.startswith("qwen2") else "llama"


def test_f32_gguf_matches_transformers(hf_case, tmp_path):
    case, hf_model = hf_case
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_model, _arch(case), "F32")
    model, nbytes = build_gguf_model(make_folder(tmp_path, path), torch.device("cpu"))
    assert nbytes > 0
    logits = run_chunk(model, new_caches(model), PROMPT, 0, [5, 2, 9, 0])
    torch.testing.assert_close(logits, hf_logits(hf_model, PROMPT), atol=1e-4, rtol=1e-4)


def test_f32_gguf_greedy_decode_through_the_paged_cache_matches_transformers(hf_case, tmp_path):
    case, hf_model = hf_case
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_model, _arch(case), "F32")
    model, _ = build_gguf_model(make_folder(tmp_path, path), torch.device("cpu"))
    caches, table = new_caches(model), [11, 3, 30, 7, 1, 2]
    tokens = list(PROMPT)
    logits = run_chunk(model, caches, tokens, 0, table)
    for _ in range(6):
        tokens.append(int(logits[-1].argmax()))
        logits = run_chunk(model, caches, tokens[-1:], len(tokens) - 1, table)
    expected = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)[0].tolist()
    assert tokens == expected


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_matches_its_dequantised_weights(hf_case, tmp_path, qtype):
    case, hf_model = hf_case
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, hf_model, _arch(case), qtype)
    model, _ = build_gguf_model(make_folder(tmp_path, path), torch.device("cpu"))
    assert model.model.layers[0].self_attn.qkv_proj.weight.numel() == 0    # no float copy of the weight
    ref = hf_logits(hf_from_stored(hf_model, stored, _arch(case)), PROMPT)
    logits = run_chunk(model, new_caches(model), PROMPT, 0, [5, 2, 9, 0])
    span = float(ref.max() - ref.min())
    assert float((logits - ref).abs().max()) <= 0.03 * span


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0"])
def test_tied_embedding_rows_come_from_the_output_layer_when_it_holds_them_exactly(tmp_path, qtype):
    config = transformers.LlamaConfig(**{**TINY, "tie_word_embeddings": True})
    torch.manual_seed(0)
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, transformers.LlamaForCausalLM(config).eval(), "llama", qtype)
    model, _ = build_gguf_model(make_folder(tmp_path, path), torch.device("cpu"))
    embed = model.embed_lookup
    # Q5_0's output layer is re-quantised to int8: the rows stay in the file
    assert (embed.head is model.lm_head_linear.native) == (qtype != "Q5_0")
    ids = torch.tensor([3, 0, 127, 64, 3])
    torch.testing.assert_close(embed(ids), torch.from_numpy(stored["token_embd.weight"])[ids], rtol=0, atol=0)


def test_loading_imports_no_compiler_stack(tmp_path):
    # torch._dynamo (with triton, inductor, sympy) costs a CPU server ~90 MB resident: building the model on the
    # meta device must not run meta arithmetic (weights.WeightsOnMeta)
    torch.manual_seed(0)
    path = tmp_path / "m.gguf"
    write_gguf(path, transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval(), "llama", "Q8_0")
    folder = make_folder(tmp_path, path)
    code = ("import sys, torch; from server.engine.models.gguf_loader import build_gguf_model; "
            f"build_gguf_model({folder!r}, torch.device('cpu')); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unsupported_architecture_and_type_are_named(tmp_path):
    with pytest.raises(GgufError, match="architecture 'gpt2'"):
        config_from_metadata({"general.architecture": "gpt2"}, set())
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 2), ("embedding_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_context_length(128)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_vocab_size(128)
    for name, value in gguf_tensors(hf_model, "llama").items():
        if name == "blk.0.attn_q.weight":   # a type berth has no kernel for
            kind = gguf.GGMLQuantizationType.IQ4_NL
            w.add_tensor(name, np.zeros((64, 64 // 32 * 18), np.uint8), raw_dtype=kind)
        else:
            w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GgufError, match="IQ4_NL"):
        build_gguf_model(make_folder(tmp_path, path), torch.device("cpu"))
