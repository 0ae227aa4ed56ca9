"""Our LlamaForCausalLM vs transformers on tiny random checkpoints (fp32, CPU, no network)."""
import pytest
import torch
import transformers

from kernels.metadata import build_metadata
from server.engine.models.arch import kv_layout
from server.engine.models.llama import is_supported
from server.engine.models.weights import build_model, load_weights

BLOCK_SIZE = 4
NUM_BLOCKS = 32
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 500000.0}
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "attention_factor": 1.1,
                 "short_factor": [1.0 + 0.25 * i for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM",
                          {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                               "rope_theta": 10000.0}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 32}),
    # YaRN (Qwen2.5's long-context setting): blended frequencies and the attention factor on cos and sin
    "qwen2_yarn": ("Qwen2Config", "Qwen2ForCausalLM",
                   {"vocab_size": 256, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                           "original_max_position_embeddings": 32}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"vocab_size": 256, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24, "num_key_value_heads": 1}),
    # fused qkv_proj / gate_up_proj in the checkpoint; LongRoPE's short factors and attention factor (full
    # rotary: the native step runs it too). Longer contexts, partial rotary, sliding window: test_phi3.py
    # InternLM3 (InternLM3ForCausalLM, model_type internlm3): the Llama layer with its qkv_bias / bias fields
    # (attention and MLP biases); transformers runs it with LlamaForCausalLM, the checkpoint names its own class
    "internlm3": ("InternLM3Config", "LlamaForCausalLM", {"head_dim": 32, "qkv_bias": True, "bias": True,
                                                          "_architectures": ["InternLM3ForCausalLM"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None, "original_max_position_embeddings": 128,
                                               "rope_parameters": PHI3_LONGROPE}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    config_cls, model_cls, extra = CASES[request.param]
    extra = dict(extra)
    architectures = extra.pop("_architectures", None)
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    torch.manual_seed(0)
    hf_model = randomize_norms(getattr(transformers, model_cls)(config).eval(), biases=True)
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder, safe_serialization=True)
    if architectures:   # the class name the real checkpoints carry
        import json
        config_json = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config_json, "architectures": architectures}))
    return hf_model, str(folder), build_model(str(folder), torch.float32, "cpu")


def randomize_norms(hf_model, biases: bool = False):
    """Norm weights (and biases) moved off transformers' initial values, so that every weight matters."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name or (biases and name.endswith("bias")):
                p.add_(torch.randn_like(p) * 0.1)
    return hf_model


def saved_folders(tmp_path_factory, build, names) -> dict:
    """name -> (hf_model, folder) for each name: build(name) saved as a safetensors checkpoint."""
    out = {}
    for name in names:
        hf_model = build(name)
        folder = tmp_path_factory.mktemp(name)
        hf_model.save_pretrained(folder, safe_serialization=True)
        out[name] = (hf_model, str(folder))
    return out


def hf_logits(hf_model, prompt):
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0].float()  # (n, vocab)


def new_caches(model, num_blocks=NUM_BLOCKS):
    """Zeroed paged caches in the model's layout (MLA: one latent tensor serving as keys and values)."""
    kv_heads, head_dim, shared = kv_layout(model.config)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    keys = [torch.zeros(shape) for _ in range(model.config.num_hidden_layers)]
    return [(k, k) if shared else (k, torch.zeros(shape)) for k in keys]


def run_chunk(model, caches, tokens, start, block_table):
    """Feed tokens at positions start.. for one sequence; returns logits (len, vocab)."""
    positions = list(range(start, start + len(tokens)))
    slots = [block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]
    meta = build_metadata([len(tokens)], [start + len(tokens)], [block_table], slots, BLOCK_SIZE,
                          "cpu")
    hidden = model(torch.tensor(tokens), torch.tensor(positions), caches, meta)
    return model.compute_logits(hidden)


PROMPT = [3, 17, 99, 42, 7, 7, 120, 1, 64, 5, 88, 23, 11]


def scattered_table(start: int, n: int = 10) -> list[int]:
    return [(start + 7 * i) % 64 for i in range(n)]   # scattered, distinct blocks of a 64-block pool


def chunks_then_decode(model, prompt: list[int], cut1: int, cut2: int, first_block: int = 11):
    """Logits (len(prompt), vocab) of prompt fed as a prefill of prompt[:cut1], a chunk over that cached prefix
    (prompt[cut1:cut2]), then one decode step per remaining token, over scattered blocks of a fresh cache."""
    caches, blocks = new_caches(model, 64), scattered_table(first_block)
    got = [run_chunk(model, caches, prompt[:cut1], 0, blocks), run_chunk(model, caches, prompt[cut1:cut2], cut1, blocks)]
    got += [run_chunk(model, caches, [t], p, blocks) for p, t in enumerate(prompt) if p >= cut2]
    return torch.cat(got)


def native_and_pytorch_logits(model, prompt: list[int], cut1: int, cut2: int) -> tuple:
    """chunks_then_decode on the C++ step, then on the PyTorch path (model.native_step toggled)."""
    results = []
    for native_step in (True, False):
        model.native_step = native_step
        results.append(chunks_then_decode(model, prompt, cut1, cut2, first_block=3))
    model.native_step = True
    return results[0], results[1]


def assert_greedy_matches(hf_model, model, prompt: list[int], new_tokens: int) -> None:
    """Greedy decoding through the paged cache (a prefill, then one-token steps over scattered blocks) gives
    transformers' generate tokens."""
    caches, blocks = new_caches(model, 64), scattered_table(7, 12)
    tokens = list(prompt)
    logits = run_chunk(model, caches, tokens, 0, blocks)
    for _ in range(new_tokens):
        tokens.append(int(logits[-1].argmax()))
        logits = run_chunk(model, caches, tokens[-1:], len(tokens) - 1, blocks)
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert tokens == expected[0].tolist()


def mixed_batch_logits(model, prompts: list[list[int]]):
    """One step with two decode rows (prompts[0], prompts[1], their earlier tokens already cached) and a
    prefill row (prompts[2]); the last logits of each row, (3, vocab)."""
    caches, tables = new_caches(model, 64), [scattered_table(1), scattered_table(2), scattered_table(3)]
    for p, t in zip(prompts[:2], tables[:2]):
        run_chunk(model, caches, p[:-1], 0, t)
    lens = [len(p) for p in prompts]
    slots = [t[q // BLOCK_SIZE] * BLOCK_SIZE + q % BLOCK_SIZE
             for t, qs in zip(tables, [[lens[0] - 1], [lens[1] - 1], range(lens[2])]) for q in qs]
    meta = build_metadata([1, 1, lens[2]], lens, tables, slots, BLOCK_SIZE, "cpu")
    ids = torch.tensor([prompts[0][-1], prompts[1][-1]] + prompts[2])
    positions = torch.tensor([lens[0] - 1, lens[1] - 1] + list(range(lens[2])))
    hidden = model(ids, positions, caches, meta)
    return model.compute_logits(hidden[[0, 1, len(ids) - 1]])


def test_prefill_matches_transformers(checkpoint):
    hf_model, _, model = checkpoint
    logits = run_chunk(model, new_caches(model), PROMPT, 0, [5, 2, 9, 0])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_logits(hf_model, PROMPT), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_then_decode_matches_transformers(checkpoint):
    hf_model, _, model = checkpoint
    caches, block_table = new_caches(model), [11, 3, 30, 7]  # non-contiguous blocks
    expected = hf_logits(hf_model, PROMPT)
    got = [run_chunk(model, caches, PROMPT[:6], 0, block_table)]
    got.append(run_chunk(model, caches, PROMPT[6:9], 6, block_table))  # chunk over a cached prefix
    got += [run_chunk(model, caches, [t], p, block_table) for p, t in enumerate(PROMPT) if p >= 9]
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=1e-4)


def test_mixed_batch_matches_separate_runs(checkpoint):
    """Two decode rows and a prefill row in one forward give the same logits as alone."""
    hf_model, _, model = checkpoint
    caches, tables = new_caches(model), [[1, 4, 6, 8], [2, 10, 12, 14], [3, 5, 7, 9]]
    prompts = [PROMPT[:9], PROMPT[2:12], PROMPT[:5]]
    for prompt, table in zip(prompts[:2], tables[:2]):
        run_chunk(model, caches, prompt[:-1], 0, table)
    slots = [t[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
             for t, ps in zip(tables, [[8], [9], range(5)]) for p in ps]
    meta = build_metadata([1, 1, 5], [9, 10, 5], tables, slots, BLOCK_SIZE, "cpu")
    ids = torch.tensor([prompts[0][-1], prompts[1][-1]] + prompts[2])
    hidden = model(ids, torch.tensor([8, 9, 0, 1, 2, 3, 4]), caches, meta)
    logits = model.compute_logits(hidden[[0, 1, 6]])
    expected = torch.stack([hf_logits(hf_model, p)[-1] for p in prompts])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_bf16_model_runs_close(checkpoint):
    hf_model, folder, _ = checkpoint
    model = build_model(folder, torch.bfloat16, "cpu")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    caches = [(k.bfloat16(), v.bfloat16()) for k, v in new_caches(model)]
    logits = run_chunk(model, caches, PROMPT, 0, [5, 2, 9, 0])
    expected = hf_logits(hf_model, PROMPT)
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.7
    torch.testing.assert_close(logits, expected, atol=0.15, rtol=0.1)


def test_is_supported_and_bad_checkpoint(tmp_path):
    config = transformers.LlamaConfig(**TINY, architectures=["LlamaForCausalLM"])
    assert is_supported(config)
    assert not is_supported(transformers.GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert is_supported(transformers.Qwen3Config(**TINY))  # no architectures: model_type decides
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not is_supported(transformers.LlamaConfig(**TINY, rope_parameters=dynamic,
                                                     architectures=["LlamaForCausalLM"]))
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = build_model(str(tmp_path), torch.float32, "cpu")
    from safetensors.torch import save_file
    (tmp_path / "model.safetensors").unlink()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_weights(model, str(tmp_path))
    save_file({"model.bogus.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="bogus"):
        load_weights(model, str(tmp_path))


@pytest.mark.parametrize("method,min_cosine,min_agree", [("int8", 0.99, 0.9), ("int4", 0.95, 0.75)])
def test_quantized_weights_keep_logits_close(tmp_path, method, min_cosine, min_agree):
    """Weight-only int8 / int4 (opt-in --quantization) stays close to the float model."""
    import transformers

    from server.engine.models.llama import Linear
    from server.engine.models.weights import build_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    ours = build_model(str(tmp_path), torch.float32, "cpu")
    ids = torch.randint(0, 128, (12,))
    from kernels.metadata import build_metadata

    def logits(model):
        caches = [(torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)) for _ in range(2)]
        meta = build_metadata([12], [12], [[0]], list(range(12)), 16, "cpu")
        return model.compute_logits(model(ids, torch.arange(12), caches, meta))
    before = logits(ours)
    ours.quantize(method)
    assert all(getattr(m, method) is not None for m in ours.modules() if isinstance(m, Linear))
    after = logits(ours)
    assert (torch.nn.functional.cosine_similarity(before, after, dim=1) > min_cosine).all()
    assert (before.argmax(-1) == after.argmax(-1)).float().mean() >= min_agree


@pytest.mark.parametrize("method,native_kernel", [("int8", True), ("int4", False), ("int4", True)])
def test_quantized_linear_uses_float_weight_for_large_inputs(method, native_kernel, monkeypatch):
    """Small inputs (decode) multiply the quantized weight; inputs over QUANTIZED_MAX_ROWS (prefill) the
    kept float weight, which runs faster there than torch's int8/int4 kernels; keep_float=False drops it
    and quantizes every product. The native int4 kernel, faster than fp32 GEMM, takes every size."""
    from kernels import native
    from server.engine.models import llama

    monkeypatch.setattr(llama, "QUANTIZED_MAX_ROWS", 4)
    if not native_kernel:
        monkeypatch.setattr(native, "load", lambda: None)
    elif method == "int4" and native.load() is None:
        pytest.fail("the native extension must be built for this test (python -m kernels.native)")
    torch.manual_seed(0)
    layer = llama.Linear(64, [32, 32])
    layer.weight.data.normal_(0, 0.1)
    exact = lambda x: torch.nn.functional.linear(x, layer.weight)  # noqa: E731
    layer.quantize(method)
    small, large = torch.randn(4, 64), torch.randn(5, 64)
    if method == "int4" and native_kernel:
        assert not torch.equal(layer(large), exact(large))
        torch.testing.assert_close(layer(large), native.load().q4_linear(large, layer.int4.q4_packed,
                                                                        layer.int4.q4_scale_min))
    else:
        assert torch.equal(layer(large), exact(large))
    assert not torch.equal(layer(small), exact(small))
    assert torch.nn.functional.cosine_similarity(layer(small), exact(small), dim=1).min() > 0.95
    layer.quantize(method, keep_float=False)
    assert layer.weight.numel() == 0
    assert layer(large).shape == (5, 64)
