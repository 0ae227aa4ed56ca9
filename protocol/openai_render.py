"""Pieces shared by the OpenAI / BladeLLM stream renderers and collectors: usage, logprobs, ids.

Ids: chat "chatcmpl-<request_id>", OpenAI completions "cmpl-<request_id>", BladeLLM the bare
request id (as in the seed's sample).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocol.types import Finished, TokenDelta, TokenLogprob

MIN_LOGPROB = -9999.0       # JSON has no -Infinity; vLLM clamps the same way


@dataclass(slots=True)
class UsageTally:
    """Usage of a request with n choices: the prompt counts once, completion tokens add up.

    Until a choice finishes, its completion tokens are counted from its deltas' token ids; its
    Finished.usage then replaces that count (the engine's count is authoritative).
    """
    n: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens_by_choice: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.completion_tokens_by_choice = [0] * self.n

    def on_delta(self, ev: TokenDelta) -> None:
        if ev.num_prompt_tokens is not None:
            self.prompt_tokens = ev.num_prompt_tokens
        self.completion_tokens_by_choice[ev.index] += len(ev.token_ids)

    def on_finished(self, ev: Finished) -> None:
        self.prompt_tokens = ev.usage.prompt_tokens
        self.cached_tokens = ev.usage.cached_tokens
        self.completion_tokens_by_choice[ev.index] = ev.usage.completion_tokens

    def to_dict(self, details: bool = True) -> dict:
        completion_tokens = sum(self.completion_tokens_by_choice)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": self.prompt_tokens + completion_tokens}
        if details:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


def check_index(index: int, n: int) -> None:
    if not 0 <= index < n:
        raise ValueError(f"event for choice {index} of a request with n={n}")


def _logprob(value: float) -> float:
    if math.isfinite(value):
        return max(value, MIN_LOGPROB)
    return MIN_LOGPROB if value < 0 else 0.0    # -inf clamps; NaN / +inf would be an engine bug


def chat_logprobs(logprobs: tuple[TokenLogprob, ...]) -> dict:
    """The chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    return {"content": [_chat_token(lp) for lp in logprobs]}


def _chat_token(lp: TokenLogprob) -> dict:
    return {"token": lp.token, "logprob": _logprob(lp.logprob), "bytes": list(lp.token.encode("utf-8")),
            "top_logprobs": [{"token": token, "logprob": _logprob(value), "bytes": list(token.encode("utf-8"))}
                             for token, value, _ in lp.top]}


@dataclass(slots=True)
class CompletionLogprobs:
    """The completions shape {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, built
    delta by delta; text_offset counts characters from the start of the choice's text."""
    text_len: int = 0

    def render(self, logprobs: tuple[TokenLogprob, ...], text: str) -> dict:
        offsets, offset = [], self.text_len
        for lp in logprobs:
            offsets.append(offset)
            offset += len(lp.token)
        self.text_len += len(text)
        return {"tokens": [lp.token for lp in logprobs],
                "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
                "top_logprobs": [{token: _logprob(value) for token, value, _ in lp.top} for lp in logprobs],
                "text_offset": offsets}


def merge_completion_logprobs(parts: list[dict]) -> dict:
    """Concatenate per-delta completion logprobs into one object (non-stream body)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [item for part in parts for item in part[key]] for key in keys}
