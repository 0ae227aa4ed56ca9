"""The grammar package alone (no engine): bitmask layout, the byte-bounded cache, tool-call grammars,
errors that name the field, and compile sharing."""
from __future__ import annotations

import json
import random

import pytest
import torch

from protocol.types import Constraint, ToolFunction, ToolSpec
from server.grammar import GrammarError, GrammarService, allocate_bitmask, apply_bitmask
from server.grammar.bitmask import allowed_tokens
from server.grammar.cache import LruBytes

WEATHER = ToolFunction("get_weather", "Weather of a city", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False}, strict=True)
TIME = ToolFunction("get_time", "Time in a zone", {"type": "object", "properties": {"zone": {"type": "string"}},
                                                   "required": ["zone"]})


@pytest.mark.parametrize("path", ["torch", "native"])
def test_bitmask_apply_matches_a_bit_by_bit_reading(path, monkeypatch):
    from kernels import native

    if path == "native" and native.load() is None:
        pytest.skip("the native extension cannot be built here")
    if path == "torch":
        monkeypatch.setattr(native, "loaded", lambda: None)
    gen = torch.Generator().manual_seed(0)
    vocab = 100                                 # wider than the mask: tokens 96.. are forbidden
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32, generator=gen)   # 96 tokens
    bitmask[1, 0] = -1                          # a word of all ones (skipped whole natively)
    logits = torch.randn(3, vocab, generator=gen)
    out = apply_bitmask(logits.clone(), [0, 2], bitmask)
    for mask_row, row in enumerate([0, 2]):
        for t in range(vocab):
            allowed = t < 96 and (int(bitmask[mask_row, t // 32]) >> (t % 32)) & 1
            assert (out[row, t] == logits[row, t]) if allowed else out[row, t] == float("-inf")
    assert torch.equal(out[1], logits[1])          # an unconstrained row is untouched
    assert allowed_tokens(allocate_bitmask(1, 40), 40).sum() == 0


def test_lru_cache_is_bounded_by_bytes_and_keeps_recent_entries():
    cache = LruBytes(100)
    for key in "abcd":
        cache.put(key, key.upper(), 30)
    assert len(cache) == 3 and cache.get("a") is None and cache.num_bytes == 90
    cache.get("b")                      # b is now the most recent: c goes next
    cache.put("e", "E", 30)
    assert cache.get("c") is None and cache.get("b") == "B" and cache.num_bytes == 90
    cache.put("huge", "H", 101)
    assert cache.get("huge") is None and cache.num_bytes == 90


@pytest.fixture(scope="module")
def service(default_gguf_model):
    from server.engine.tokenizer import Tokenizer

    tok = Tokenizer(default_gguf_model)
    svc = GrammarService(tok.hf, 49152, tok.eos_token_ids)
    svc.tok = tok
    yield svc
    svc.close()


def accepts(service, constraint, text) -> bool:
    matcher = service.compile(constraint).result(timeout=30).matcher()
    ids = service.tok.hf.encode(text, add_special_tokens=False)
    return matcher.replay(ids) and matcher.is_accepting


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


def test_required_tool_choice_accepts_calls_in_the_fixed_format_only(service):
    required = Constraint("tools", ToolSpec((WEATHER, TIME), "required"))
    assert accepts(service, required, CALL)
    assert accepts(service, required, CALL + "\n" + TIME_CALL)
    assert not accepts(service, required, "It is sunny.")
    assert not accepts(service, required, CALL.replace("Paris", "Paris\", \"extra\": \"1"))
    assert not accepts(service, required, CALL.replace("get_weather", "get_stock"))
    single = Constraint("tools", ToolSpec((WEATHER, TIME), "required", parallel=False))
    assert not accepts(service, single, CALL + "\n" + TIME_CALL)


def test_named_tool_choice_allows_that_tool_alone(service):
    named = Constraint("tools", ToolSpec((WEATHER, TIME), "named", name="get_time"))
    assert accepts(service, named, TIME_CALL)
    assert not accepts(service, named, CALL)


def test_auto_with_a_strict_tool_allows_text_or_valid_calls(service):
    auto = Constraint("tools", ToolSpec((WEATHER, TIME), "auto"))
    assert accepts(service, auto, "I cannot call a tool for that.")
    assert accepts(service, auto, CALL)
    assert not accepts(service, auto, CALL.replace('"city"', '"town"'))          # strict: schema enforced
    assert accepts(service, auto, TIME_CALL.replace('"zone"', '"tz"'))          # not strict: any object


@pytest.mark.parametrize("constraint, field", [
    (Constraint("json", {"type": "objectx"}), "response_format"),
    (Constraint("regex", "(a"), "structured_outputs"),
    (Constraint("tools", ToolSpec((WEATHER,), "named", name="nope")), "tools"),
])
def test_errors_are_400s_naming_the_field(service, constraint, field):
    with pytest.raises(GrammarError) as info:
        service.compile(constraint).result(timeout=30)
    assert info.value.status == 400 and info.value.param == field


def test_identical_constraints_share_one_compile_and_then_hit_the_cache(service):
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "description": str(random.random())}
    first, second = (service.compile(Constraint("json", json.loads(json.dumps(schema)))) for _ in range(2))
    assert first.future is second.future or second.done()
    compiled = first.result(timeout=30)
    assert service.compile(Constraint("json", schema)).done()
    assert service.compile(Constraint("json", schema)).result() is compiled
