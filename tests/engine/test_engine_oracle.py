"""The paged engine against the oracle: Hugging Face transformers' greedy output on the default model (fp32)."""
from __future__ import annotations

import pytest
import torch

from protocol.types import Finished, GenerateRequest, SamplingParams, TokenDelta
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner

PROMPTS = [
    "What is the capital of Canada?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into French.",
    "What is 12 times 7?",
    "Name a famous painting by Leonardo da Vinci.",
    "Give me a tip for learning Python.",
]
NUM_TOKENS = 32


def chat(prompt: str, rid: str, max_tokens: int = NUM_TOKENS, **kw) -> GenerateRequest:
    return GenerateRequest(rid, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw),
                           messages=[{"role": "user", "content": prompt}])


def run_all(engine: Engine, requests: list[GenerateRequest]) -> dict[str, list[int]]:
    """Run to completion; token ids per request id (all choices concatenated in event order)."""
    for r in requests:
        engine.add(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: dict[str, Finished] = {}
    while engine.has_unfinished():
        for rid, ev in engine.step():
            if isinstance(ev, TokenDelta):
                tokens[rid] += ev.token_ids
            elif isinstance(ev, Finished):
                finished[rid] = ev
        engine.scheduler.check_integrity()
    assert set(finished) == set(tokens)
    return tokens


@pytest.fixture(scope="module")
def paged(served_engine) -> Engine:
    if not isinstance(served_engine, Engine):
        pytest.fail("the default model must be served by the paged engine")
    return served_engine


@pytest.fixture(scope="module")
def hf_reference(paged, default_model):
    """transformers' greedy tokens and per-step scores for each prompt (same weights, fp32)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    refs = {}
    for i, prompt in enumerate(PROMPTS):
        ids = paged.tokenizer.encode_request(chat(prompt, "x"))
        refs[f"p{i}"] = hf_greedy(model, ids, NUM_TOKENS)
    return refs


@torch.inference_mode()
def hf_greedy(model, ids: list[int], num_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own forward with its KV cache, argmax at each step (EOS does not stop it, as
    ignore_eos): the tokens and each step's logits."""
    tokens, scores, past = [], [], None
    inputs = torch.tensor([ids])
    for _ in range(num_tokens):
        out = model(input_ids=inputs, cache=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
        tokens.append(int(logits.argmax()))
        scores.append(logits)
        inputs = torch.tensor([[tokens[-1]]])
    return tokens, scores


def assert_matches(tokens: dict[str, list[int]], refs) -> None:
    for rid, got in tokens.items():
        want, scores = refs[rid]
        assert len(got) == len(want) == NUM_TOKENS
        for step, (a, b) in enumerate(zip(got, want)):
            if a != b:   # only a true tie of the two best logits may diverge
                top2 = torch.topk(scores[step].float(), 2).values
                assert (top2[0] - top2[1]).abs().item() < 1e-3, \
                    f"{rid} diverges at step {step}: ours {a}, transformers {b}, gap {(top2[0] - top2[1]).item()}"
                break


def test_greedy_alone_equals_transformers(paged, hf_reference):
    for i, prompt in enumerate(PROMPTS):
        assert_matches(run_all(paged, [chat(prompt, f"p{i}")]), hf_reference)
    assert paged.block_manager.num_used_blocks == 0


def test_greedy_batched_equals_transformers(paged, hf_reference):
    tokens = run_all(paged, [chat(p, f"p{i}") for i, p in enumerate(PROMPTS)])
    assert_matches(tokens, hf_reference)


def test_preemption_under_tiny_pool_gives_same_output(paged, hf_reference):
    config = EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    runner = ModelRunner(paged.runner.model, paged.runner.device, paged.runner.dtype, 4, num_blocks=48)
    small = Engine(runner, paged.tokenizer, config, paged.max_model_len)
    tokens = run_all(small, [chat(p, f"p{i}") for i, p in enumerate(PROMPTS)])
    assert small.scheduler.num_preemptions > 0
    assert_matches(tokens, hf_reference)
    assert small.block_manager.num_used_blocks == 0


def test_prefix_cache_hit_prefills_only_new_tokens(paged):
    first = run_all(paged, [chat(PROMPTS[0], "a")])["a"]
    req = chat(PROMPTS[0], "b")
    paged.add(req)
    seq = paged.scheduler.waiting[-1]
    out = paged.scheduler.schedule()
    scheduled = {s.seq.seq_id: s for s in out.scheduled}[seq.seq_id]
    assert seq.num_cached_tokens > 0
    assert scheduled.start == seq.num_cached_tokens
    assert scheduled.num_new_tokens == seq.num_prompt_tokens - seq.num_cached_tokens
    paged.scheduler.abort("b")        # the hand-driven step is not run; start again through the engine
    second = run_all(paged, [chat(PROMPTS[0], "c")])["c"]
    assert second == first


def test_abort_frees_every_block(paged):
    paged.add(chat(PROMPTS[1], "long", max_tokens=200))
    for _ in range(3):
        paged.step()
    assert paged.block_manager.num_used_blocks > 0
    events = paged.abort("long")
    assert [e.reason.value for e in events] == ["abort"]
    assert not paged.has_unfinished()
    assert paged.block_manager.num_used_blocks == 0
    paged.scheduler.check_integrity()


def test_n_choices_and_seeds(paged):
    req = GenerateRequest("n", SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7),
                          prompt="Once upon a time")
    a = run_all(paged, [req])
    req2 = GenerateRequest("n", SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7),
                           prompt="Once upon a time")
    assert run_all(paged, [req2]) == a


def test_n_choices_share_the_prompt_blocks(paged):
    long_prompt = "Tell me a story about a lighthouse keeper. " * 6
    paged.add(GenerateRequest("share", SamplingParams(temperature=0, max_tokens=6, n=3, ignore_eos=True),
                              prompt=long_prompt))
    finished, tokens = {}, {0: [], 1: [], 2: []}
    while paged.has_unfinished():
        for _, ev in paged.step():
            if isinstance(ev, TokenDelta):
                tokens[ev.index] += ev.token_ids
            elif isinstance(ev, Finished):
                finished[ev.index] = ev
        paged.scheduler.check_integrity()
    assert tokens[0] == tokens[1] == tokens[2]                 # greedy: identical choices
    prompt_len = finished[0].usage.prompt_tokens
    full = (prompt_len - 1) // paged.block_manager.block_size * paged.block_manager.block_size
    assert finished[1].usage.cached_tokens == finished[2].usage.cached_tokens == full > 0
    assert paged.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_weights_still_answer_ottawa(paged, method):
    """--quantization int8 / int4 on the default model (a separate model copy; the fp32 one is untouched)."""
    from server.engine.models.weights import build_model

    model = build_model(str(paged.runner.model.config._name_or_path), torch.float32, "cpu")
    model.quantize(method)
    runner = ModelRunner(model, paged.runner.device, torch.float32, 16, num_blocks=64)
    engine = Engine(runner, paged.tokenizer, EngineConfig(), paged.max_model_len)
    tokens = run_all(engine, [GenerateRequest("q", SamplingParams(temperature=0, max_tokens=12),
                                              messages=[{"role": "user", "content": PROMPTS[0]}])])
    assert "Ottawa" in paged.tokenizer.hf.decode(tokens["q"])
