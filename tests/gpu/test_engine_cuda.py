"""The paged engine on a GPU against transformers' greedy output, token for token, on tiny random-weight
Llama and Qwen2 models built here (bench/random_model.py): with CUDA graphs and without, fp32 and bf16.
Where the outputs part, the two best logits of transformers' step must be a tie (tests/engine/
test_engine_oracle.py's rule; a wider tie for bf16, whose kernels round differently). Also: decode steps
replay graphs and never synchronise with the host before the sampled ids are read."""
from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (bench/gpu.sh runs these on a GPU)", allow_module_level=True)

import kernels  # noqa: E402
from bench.random_model import TINY_LLAMA, write_random_model  # noqa: E402
from protocol.types import GenerateRequest, SamplingParams, TokenDelta  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402

CUDA = torch.device("cuda")
MODELS = {   # head sizes 64 and 128, GQA 2 and 4, Qwen2's qkv biases and tied embeddings
    "llama": dict(TINY_LLAMA, hidden_size=256, initializer_range=0.1),
    "qwen2": dict(TINY_LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=512,
                  intermediate_size=512, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                  initializer_range=0.1),
}
TIE = {torch.float32: 1e-3, torch.bfloat16: 0.1}
NUM_TOKENS = 24
PROMPT_LENS = [5, 17, 33, 64, 100, 7]


@pytest.fixture(scope="module", params=sorted(MODELS))
def folder(request, tmp_path_factory):
    return str(write_random_model(tmp_path_factory.mktemp(request.param), MODELS[request.param], "float32"))


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def paged_engine(folder: str, dtype: torch.dtype, cuda_graphs: bool = True, **kw) -> Engine:
    config = EngineConfig(max_num_seqs=8, kv_cache_gib=0.25, max_model_len=512, cuda_graphs=cuda_graphs, **kw)
    return Engine.from_folder(folder, config, CUDA, dtype)


def run_all(engine: Engine, prompt_ids: list[list[int]]) -> dict[str, list[int]]:
    for i, ids in enumerate(prompt_ids):
        engine.add(GenerateRequest(f"p{i}", SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True),
                                   prompt_token_ids=ids))
    tokens = {f"p{i}": [] for i in range(len(prompt_ids))}
    while engine.has_unfinished():
        for rid, ev in engine.step():
            if isinstance(ev, TokenDelta):
                tokens[rid] += ev.token_ids
        engine.scheduler.check_integrity()
    assert engine.block_manager.num_used_blocks == 0
    return tokens


@torch.inference_mode()
def hf_greedy(model, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    tokens, scores, past, inputs = [], [], None, torch.tensor([ids], device=CUDA)
    for _ in range(NUM_TOKENS):
        out = model(input_ids=inputs, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
        tokens.append(int(logits.argmax()))
        scores.append(logits)
        inputs = torch.tensor([[tokens[-1]]], device=CUDA)
    return tokens, scores


def assert_matches(got: dict[str, list[int]], refs: dict[str, tuple], tie: float) -> None:
    for rid, ours in got.items():
        want, scores = refs[rid]
        assert len(ours) == len(want) == NUM_TOKENS
        for step, (a, b) in enumerate(zip(ours, want)):
            if a != b:
                top2 = torch.topk(scores[step], 2).values
                gap = (top2[0] - top2[1]).item()
                assert gap < tie, f"{rid} diverges at step {step}: ours {a}, transformers {b}, gap {gap}"
                break


def references(folder: str, dtype: torch.dtype, prompt_ids: list[list[int]]) -> dict[str, tuple]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).to(device=CUDA, dtype=dtype).eval()
    return {f"p{i}": hf_greedy(model, ids) for i, ids in enumerate(prompt_ids)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_transformers_with_cuda_graphs(folder, dtype):
    engine = paged_engine(folder, dtype)
    assert engine.runner.block_size == kernels.block_size_for(CUDA)
    assert (engine.runner.graphs is not None) == (kernels.BACKEND == "triton")
    prompt_ids = prompts(engine.tokenizer.vocab_size)
    assert_matches(run_all(engine, prompt_ids), references(folder, dtype, prompt_ids), TIE[dtype])


def test_eager_and_chunked_prefill_equal_transformers(folder):
    """No graphs, prompts cut into 16-token chunks over their cached prefix, a prefix-cache hit on rerun."""
    engine = paged_engine(folder, torch.float32, cuda_graphs=False, max_num_batched_tokens=16)
    assert engine.runner.graphs is None
    prompt_ids = prompts(engine.tokenizer.vocab_size)
    refs = references(folder, torch.float32, prompt_ids)
    assert_matches(run_all(engine, prompt_ids), refs, TIE[torch.float32])
    assert_matches(run_all(engine, prompt_ids), refs, TIE[torch.float32])


@pytest.mark.skipif(kernels.BACKEND != "triton", reason="CUDA graphs need the Triton backend")
def test_decode_steps_replay_graphs_without_host_sync(folder):
    from server.engine.sampler import SamplingTensors, argmax

    engine = paged_engine(folder, torch.bfloat16)
    replays = []
    run = engine.runner.graphs.run
    engine.runner.graphs.run = lambda inputs: replays.append(len(inputs.input_ids)) or run(inputs)
    for i, ids in enumerate(prompts(engine.tokenizer.vocab_size)[:3]):
        engine.add(GenerateRequest(f"s{i}", SamplingParams(temperature=0.8, top_k=20, max_tokens=8, ignore_eos=True),
                                   prompt_token_ids=ids))
    while engine.scheduler.num_waiting or not replays:
        engine.step()                                   # prefills, then the first decode step
    out = engine.scheduler.schedule()
    params = [s.seq.params for s in out.scheduled]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = engine.runner.run(out)                 # replayed: staging copies are non-blocking
        tensors = SamplingTensors.build(params, logits.device)
        sampled = engine.sampler._sample_random(logits.float(), tensors, [None] * len(params))
        greedy = argmax(logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert replays[-1] == 3 and sampled.shape == greedy.shape == (3,)
