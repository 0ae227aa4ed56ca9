"""Reasoning output (DeepSeek-R1 and its distills, QwQ, Qwen3): the text between <think> and </think>
goes to `reasoning_content`, the rest to `content`, on the OpenAI chat routes, as vLLM does.

Two shapes of template exist: those whose generation prompt already opens the block (R1 distills,
QwQ: the answer starts inside the reasoning and only `</think>` appears in the output), and those where
the model writes `<think>` itself (Qwen3). ReasoningSplitter covers both (starts_inside). A tag split
across deltas is held back until it is resolved; an answer that never closes its block is reasoning
to the end (content stays empty); newlines right after `<think>` and whitespace right after
`</think>` are dropped. Without any block (a
Qwen3 answer with thinking off) everything is content. Pure: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningConfig:
    """How the served model reasons; None on the server means no reasoning parser."""
    starts_inside: bool = False          # the generation prompt ends inside <think>


def detect(chat_template: object, generation_prompt: str) -> ReasoningConfig | None:
    """--reasoning-parser auto: a template that mentions </think> reasons; the rendered generation prompt
    (the text the template appends for the assistant's turn) tells whether the block is already open."""
    if not isinstance(chat_template, str) or THINK_CLOSE not in chat_template:
        return None
    return ReasoningConfig(starts_inside=generation_prompt.rstrip().endswith(THINK_OPEN))


class ReasoningSplitter:
    def __init__(self, config: ReasoningConfig):
        self._state = "reasoning" if config.starts_inside else "start"   # start | reasoning | content
        self._held = ""
        self._reasoning_started = False
        self._content_started = False

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) to send now for this piece of the answer."""
        text, self._held = self._held + text, ""
        reasoning, content = [], []
        while text:
            if self._state == "start":
                stripped = text.lstrip()
                if not stripped:
                    self._held = text                       # only whitespace so far: undecided
                    break
                if stripped.startswith(THINK_OPEN):
                    self._state, text = "reasoning", stripped[len(THINK_OPEN):]
                elif THINK_OPEN.startswith(stripped):
                    self._held = text                       # maybe the start of <think>
                    break
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                if not self._reasoning_started:
                    text = text.lstrip("\n")
                    if not text:
                        break
                    self._reasoning_started = True
                end = text.find(THINK_CLOSE)
                if end >= 0:
                    reasoning.append(text[:end])
                    self._state, text = "content", text[end + len(THINK_CLOSE):]
                    continue
                keep = _partial_suffix(text, THINK_CLOSE)
                reasoning.append(text[:len(text) - keep])
                self._held = text[len(text) - keep:]
                break
            else:
                if not self._content_started:
                    text = text.lstrip()
                    if not text:
                        break
                    self._content_started = True
                content.append(text)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is still held back at the end of the answer."""
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return held, ""
        if self._state == "start":
            return "", held.strip() if held.strip() else ""
        return "", held


def split_reasoning(text: str, config: ReasoningConfig) -> tuple[str | None, str]:
    """A whole answer -> (reasoning or None when there was no block, content)."""
    splitter = ReasoningSplitter(config)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    reasoning = r1 + r2
    opened = config.starts_inside or text.lstrip().startswith(THINK_OPEN)
    return (reasoning if opened else None), c1 + c2


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
