"""The reasoning split (protocol/reasoning.py) on scripted token streams, and its place in the chat bodies."""
from __future__ import annotations

import itertools
import json

import pytest

from protocol.openai_collect import ChatCollector
from protocol.openai_stream import ChatStreamRenderer
from protocol.reasoning import ReasoningConfig, ReasoningSplitter, detect, split_reasoning
from protocol.sse import SseDecoder
from protocol.types import Finished, FinishReason, TokenDelta, ToolFunction, ToolSpec, Usage

QWEN3 = ReasoningConfig(starts_inside=False)
R1 = ReasoningConfig(starts_inside=True)
CASES = [   # (config, whole answer, reasoning (None: no block), content)
    (QWEN3, "<think>\nLet me add 2 and 2.\n</think>\n\nIt is 4.", "Let me add 2 and 2.\n", "It is 4."),
    (QWEN3, "  <think>a</think>b", "a", "b"),
    (QWEN3, "It is 4.", None, "It is 4."),
    (QWEN3, "<thinking is fun>", None, "<thinking is fun>"),
    (QWEN3, "<think>never closed, cut by max_tokens", "never closed, cut by max_tokens", ""),
    (QWEN3, "<think></think>Only content", "", "Only content"),
    (R1, "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n", "The answer is 4."),
    (R1, "still thinking when max_tokens hit", "still thinking when max_tokens hit", ""),
    (R1, "a</think>b</think>c", "a", "b</think>c"),
]


def splits(text: str, pieces: int):
    """Every way to cut text into `pieces` consecutive parts (tags split across tokens included)."""
    for cuts in itertools.combinations(range(1, len(text)), pieces - 1):
        bounds = (0, *cuts, len(text))
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("config, text, reasoning, content", CASES)
def test_whole_answers(config, text, reasoning, content):
    assert split_reasoning(text, config) == (reasoning, content)


@pytest.mark.parametrize("config, text, reasoning, content", CASES)
def test_every_streaming_split_gives_the_same_answer(config, text, reasoning, content):
    for pieces in (1, 2, 3):
        for parts in splits(text, pieces):
            splitter = ReasoningSplitter(config)
            out = [splitter.feed(p) for p in parts] + [splitter.finish()]
            assert "".join(r for r, _ in out) == (reasoning or ""), parts
            assert "".join(c for _, c in out) == content, parts


def test_a_tag_split_across_tokens_is_held_back_not_leaked():
    splitter = ReasoningSplitter(QWEN3)
    assert splitter.feed("<th") == ("", "")
    assert splitter.feed("ink>plan") == ("plan", "")
    assert splitter.feed(" more</th") == (" more", "")          # "</th" is held, never shown as reasoning
    assert splitter.feed("ink>answer") == ("", "answer")


def test_detect_from_the_template():
    assert detect("{{ messages }}", "<|im_start|>assistant\n") is None
    assert detect("{% if '</think>' in content %}...", "<|im_start|>assistant\n") == QWEN3
    assert detect("...</think>...", "<｜Assistant｜><think>\n") == R1
    assert detect(None, "") is None


def events(text: str, pieces: int = 4):
    step = max(1, len(text) // pieces)
    for i in range(0, len(text), step):
        yield TokenDelta(text[i:i + step], (1,), 0, None, 5)
    yield Finished(FinishReason.STOP, Usage(5, 7), 0)


def test_chat_bodies_carry_reasoning_content_and_tool_calls_from_the_content_only():
    answer = ('I should call the tool.</think>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'
              "\n</tool_call>")
    tools = ToolSpec((ToolFunction("get_time"),), "auto")
    collector = ChatCollector("r", "m", 0, 1, tools, R1)
    for ev in events(answer):
        collector.feed(ev)
    message = collector.body()["choices"][0]["message"]
    assert message["reasoning_content"] == "I should call the tool."
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "get_time"
    assert collector.body()["choices"][0]["finish_reason"] == "tool_calls"
    plain = ChatCollector("r", "m", 0, 1, None, QWEN3)
    for ev in events("No block here."):
        plain.feed(ev)
    assert plain.body()["choices"][0]["message"] == {"role": "assistant", "content": "No block here."}


def test_stream_sends_reasoning_deltas_then_content():
    renderer = ChatStreamRenderer("r", "m", 0, 1, False, None, QWEN3)
    frames = [f for ev in events("<think>step one, step two</think>\n\nFinal answer.", 7)
              for f in renderer.on_event(ev)] + renderer.on_end()
    decoder = SseDecoder()
    chunks = [json.loads(p) for f in frames for p in decoder.feed(f) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning == "step one, step two" and content == "Final answer."
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
