"""Structured outputs on the paged engine (default model, its GGUF as served): every constrained
answer parses and validates; constrained rows never disturb free ones; preemption, abort, n > 1,
sampling knobs and a slow compile. The schemas bound strings and arrays so that an answer always ends
well inside max_tokens (a 135M model happily repeats array items forever otherwise)."""
from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest

from protocol.types import Constraint, Failed, Finished, GenerateRequest, SamplingParams, TokenDelta
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.factory import build_engine
from server.engine.model_runner import ModelRunner

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "maxLength": 30}},
    "required": ["name", "age"], "additionalProperties": False}
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "person": PERSON,
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["person", "address"], "additionalProperties": False},
    "array_enum": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "mood": {"type": "string", "enum": ["happy", "sad"]}},
        "required": ["colors", "mood"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 60},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "required": ["temperature", "count", "ratio"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "result": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                             {"type": "string", "enum": ["unknown"]}, {"type": "null"}]},
        "note": {"type": "string", "maxLength": 10}},
        "required": ["result"], "additionalProperties": False},
    "optional_only": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 15}, "done": {"type": "boolean"}},
        "additionalProperties": False},
}
PROMPT = [{"role": "user", "content": "Answer in JSON: describe Ann, 31, who lives in Paris."}]
MAX_TOKENS = 160


def run(engine, requests, on_step=None):
    for r in requests:
        engine.add(r)
    texts = {r.request_id: {} for r in requests}
    ends: dict[str, dict[int, object]] = {r.request_id: {} for r in requests}
    while engine.has_unfinished():
        for rid, ev in engine.step():
            if isinstance(ev, TokenDelta):
                texts[rid][ev.index] = texts[rid].get(ev.index, "") + ev.text
            elif isinstance(ev, (Finished, Failed)):
                ends[rid][ev.index] = ev
        engine.scheduler.check_integrity()
        if on_step is not None:
            on_step()
    return texts, ends


def request(rid, constraint=None, messages=PROMPT, **params):
    params = {"temperature": 0, "max_tokens": MAX_TOKENS, **params}
    return GenerateRequest(rid, SamplingParams(**params), messages=messages, constraint=constraint)


@pytest.fixture(scope="module")
def engine(default_gguf_model):
    return build_engine(EngineConfig(kv_cache_gib=0.25, max_model_len=2048), default_gguf_model)


def assert_valid(text: str, schema: dict, end) -> None:
    assert isinstance(end, Finished) and end.reason.value == "stop", (end, text)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_every_schema_answer_parses_and_validates(engine, sampling):
    params = {} if sampling == "greedy" else {"temperature": 1.0, "top_p": 0.95, "seed": 7}
    reqs = [request(f"{name}-{sampling}", Constraint("json", schema), **params) for name, schema in SCHEMAS.items()]
    texts, ends = run(engine, reqs)
    for name, schema in SCHEMAS.items():
        rid = f"{name}-{sampling}"
        assert_valid(texts[rid][0], schema, ends[rid][0])
    assert not engine.grammars.states and not engine.grammars.held


def test_free_requests_batched_with_constrained_ones_do_not_change(engine):
    free = [request(f"free{i}", messages=[{"role": "user", "content": q}], max_tokens=24, ignore_eos=True)
            for i, q in enumerate(["Name a fruit.", "What is 2+2?", "Say hello."])]
    alone, _ = run(engine, free)
    mixed = [request(f"c{i}", Constraint("json", SCHEMAS["nested"]), temperature=0.8, seed=i) for i in range(3)]
    together, ends = run(engine, [x for pair in zip(free, mixed) for x in pair])
    for r in free:
        assert together[r.request_id] == alone[r.request_id]
    for r in mixed:
        assert_valid(together[r.request_id][0], SCHEMAS["nested"], ends[r.request_id][0])


def test_mask_holds_under_every_sampling_knob_and_n(engine):
    digits = Constraint("regex", r"[0-9]{1,6}")
    reqs = [request("topk", digits, temperature=1.5, top_k=5, seed=1),
            request("topp", digits, temperature=2.0, top_p=0.5, seed=2),
            request("minp", digits, temperature=1.0, min_p=0.2, seed=3),
            request("pen", digits, temperature=0.9, presence_penalty=2.0, frequency_penalty=2.0,
                    repetition_penalty=1.5, seed=4),
            request("n3", Constraint("choice", ("alpha", "beta", "gamma")), temperature=1.2, n=3, seed=5),
            request("lp", digits, logprobs=True, top_logprobs=5, min_tokens=3)]
    for r in reqs:
        r.params.validate()
    engine_logprobs = []
    original = engine._emit

    def spy(seq, token_id, result, row, complete=False):
        if seq.request_id == "lp" and result.top_logprobs:
            engine_logprobs.append([tid for tid, _ in result.top_logprobs[row]])
        return original(seq, token_id, result, row, complete)

    engine._emit = spy
    try:
        texts, ends = run(engine, reqs)
    finally:
        del engine._emit
    for rid in ("topk", "topp", "minp", "pen", "lp"):
        assert texts[rid][0].isdigit() and len(texts[rid][0]) <= 6, (rid, texts[rid])
    assert sorted(texts["n3"]) == [0, 1, 2]
    assert all(texts["n3"][i] in ("alpha", "beta", "gamma") for i in range(3))
    eos = engine.tokenizer.eos_token_ids
    for top in engine_logprobs:        # top_logprobs only ever lists tokens the grammar allows
        for tid in top:
            text = engine.tokenizer.hf.decode([tid])
            assert tid in eos or (text.isdigit() and text), (tid, text)


def test_preemption_under_a_tiny_pool_keeps_answers_valid(engine):
    config = EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=256)
    runner = ModelRunner(engine.runner.model, engine.runner.device, engine.runner.dtype, 4, num_blocks=44)
    small = Engine(runner, engine.tokenizer, config, engine.max_model_len)
    # 4 different prompts of ~40 tokens + answers of ~20-40 do not fit 44 blocks of 4 tokens together
    reqs = [request(f"p{i}", Constraint("json", SCHEMAS["array_enum"]), temperature=1.0, seed=i, max_tokens=60,
                    messages=[{"role": "user", "content": f"Colors and mood of painting number {i}, as JSON."}])
            for i in range(4)]
    texts, ends = run(small, reqs)
    assert small.scheduler.num_preemptions > 0
    for r in reqs:
        assert_valid(texts[r.request_id][0], SCHEMAS["array_enum"], ends[r.request_id][0])
    assert small.block_manager.num_used_blocks == 0 and not small.grammars.states


def test_abort_mid_grammar_releases_everything(engine):
    engine.add(request("ab", Constraint("json", SCHEMAS["nested"])))
    for _ in range(6):
        engine.step()
    assert engine.grammars.states
    events = engine.abort("ab")
    assert [e.reason.value for e in events] == ["abort"]
    assert not engine.grammars.states and not engine.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0 or engine.block_manager.num_evictable_blocks >= 0
    engine.scheduler.check_integrity()


def test_a_slow_compile_does_not_delay_other_streams(engine, monkeypatch):
    service = engine.grammars.service
    original = service._compile
    release = threading.Event()

    def slow(key, constraint):
        release.wait(10)
        return original(key, constraint)

    monkeypatch.setattr(service, "_compile", slow)
    slow_schema = {**SCHEMAS["optional_only"], "description": "slow one"}   # a cache miss
    engine.add(request("slow", Constraint("json", slow_schema)))
    engine.add(request("fast", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12,
                       ignore_eos=True))
    fast_tokens, start = 0, time.monotonic()
    while fast_tokens < 12:
        for rid, ev in engine.step():
            assert rid != "slow"
            if rid == "fast" and isinstance(ev, TokenDelta):
                fast_tokens += len(ev.token_ids)
        assert time.monotonic() - start < 30
    assert engine.grammars.num_held == 1          # the fast stream finished while "slow" still waited
    release.set()
    text, end = "", None
    while engine.has_unfinished():
        for rid, ev in engine.step():
            if isinstance(ev, TokenDelta):
                text += ev.text
            elif isinstance(ev, Finished):
                end = ev
    assert_valid(text, slow_schema, end)


@pytest.mark.parametrize("constraint, message", [
    (Constraint("json", {"type": "objectx"}), "objectx"),
    (Constraint("regex", "(unclosed"), "unclosed"),
    (Constraint("grammar", "start: undefined_rule"), "undefined_rule"),
])
def test_an_invalid_constraint_fails_the_request_with_a_400(engine, constraint, message):
    texts, ends = run(engine, [request("bad", constraint)])
    (failed,) = ends["bad"].values()
    assert isinstance(failed, Failed) and failed.error.status == 400 and message in failed.error.message
    assert not engine.has_unfinished() and not engine.grammars.states
    # a cached failure is not cached: a good request right after still works
    texts, ends = run(engine, [request("good", Constraint("choice", ("yes", "no")))])
    assert texts["good"][0] in ("yes", "no")


def test_a_cached_grammar_is_ready_at_admission(engine):
    c = Constraint("json", SCHEMAS["numbers"])
    run(engine, [request("warm", c, max_tokens=80)])
    pending = engine.grammars.service.compile(c)
    assert pending.done() and pending.result().compile_seconds >= 0


def test_standard_engine_enforces_constraints_too(hf_engine):
    texts, ends = run_hf(hf_engine, [request("hf", Constraint("json", SCHEMAS["array_enum"]))])
    assert_valid(texts["hf"], SCHEMAS["array_enum"], ends["hf"])


def run_hf(engine, requests):
    for r in requests:
        engine.add(r)
    texts, ends = {r.request_id: "" for r in requests}, {}
    while engine.has_unfinished():
        for rid, ev in engine.step():
            if isinstance(ev, TokenDelta):
                texts[rid] += ev.text
            elif isinstance(ev, (Finished, Failed)):
                ends[rid] = ev
    return texts, ends
