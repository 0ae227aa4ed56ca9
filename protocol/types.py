"""Typed values that cross the engine contract (DESIGN.md, "The engine contract").

A protocol codec turns wire bytes into a GenerateRequest; the engine answers with a stream of
events (TokenDelta*, then exactly one Finished or Failed per choice index).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocol.errors import ProtocolError

# Caps (RELIABILITY.md, "Defaults to start from").
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 8
MAX_STOP_LEN = 256


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0 means off; max_tokens None means
    "as many as the context allows". Ranges are checked by validate() (ProtocolError naming the field).
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        _range("temperature", self.temperature, 0.0, 100.0)
        _range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _range("min_p", self.min_p, 0.0, 1.0)
        _range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        if self.top_k < -1:
            raise ProtocolError("top_k must be -1, 0 (off) or a positive integer", param="top_k")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ProtocolError("max_tokens must be at least 1", param="max_tokens")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ProtocolError("min_tokens must be between 0 and max_tokens", param="min_tokens")
        if not 1 <= self.n <= MAX_N:
            raise ProtocolError(f"n must be between 1 and {MAX_N}", param="n")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ProtocolError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ProtocolError(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_LEN:
                raise ProtocolError(f"each stop string must be 1 to {MAX_STOP_LEN} characters", param="stop")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ProtocolError("seed is out of range", param="seed")
        return self


def _range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high  # NaN fails both
    if not ok:
        bound = "(" if low_open else "["
        raise ProtocolError(f"{name} must be in {bound}{low}, {high}], got {value}", param=name)


@dataclass(frozen=True, slots=True)
class ToolFunction:
    """One function tool of an OpenAI `tools` list. parameters is its JSON schema (an object schema;
    {"type": "object"} when the tool gave none); strict asks for arguments that follow it exactly."""
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object"})
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """The tools of a chat request and how they may be called.
    choice: "auto" (the model decides; calls are parsed out of its text), "required" (at least one
    call), "named" (exactly the tool `name`). parallel: more than one call in one answer is allowed."""
    tools: tuple[ToolFunction, ...]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True


# Constraint kinds (structured outputs). The spec's type per kind:
#   "json"    a JSON schema dict ({"type": "object"} for response_format json_object)
#   "regex"   a regular expression str (the whole answer matches it)
#   "choice"  a tuple of str (the answer is exactly one of them)
#   "grammar" a grammar str (Lark, or llama.cpp GBNF when it uses ::=)
#   "tools"   a ToolSpec (the answer is <tool_call> blocks over those tools; see protocol/tools.py)
CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "tools")


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the generated text must match. The engine's grammar package compiles it; the codec
    only describes it (no grammar library is imported by protocol/)."""
    kind: str
    spec: object

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}")


@dataclass(slots=True)
class GenerateRequest:
    """One generation. Exactly one of prompt (raw text, no template), messages (chat: the engine
    applies the model's chat template; each message {"role", "content": str}) or prompt_token_ids."""
    request_id: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    add_generation_prompt: bool = True
    # True (EAS, WebSocket): max_tokens larger than the room left in the context is cut to fit.
    # False (OpenAI): prompt + max_tokens > max_model_len is a 400 at admission.
    cap_max_tokens: bool = False
    # Structured outputs: every choice's text must match it (None: free text).
    constraint: Constraint | None = None
    # Tools offered to the model (chat only): rendered by the chat template when it supports tools,
    # else by protocol.tools' fallback system prompt. None: no tools in the prompt.
    tools: tuple[ToolFunction, ...] | None = None


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop string or a stop token
    LENGTH = "length"    # max_tokens or the context
    ABORT = "abort"      # the client went away or the server is draining


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    token_id: int
    top: tuple[tuple[str, float, int], ...] = ()   # (token, logprob, id) best first


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New text of choice `index`. text may be "" when the tokens end mid-character or may
    begin a stop string (held back until resolved)."""
    text: str
    token_ids: tuple[int, ...]
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None
    # Optional: the request's prompt length, set by the engine at least on a choice's first delta
    # (BladeLLM chunks carry cumulative usage from the first one). None: not known yet.
    num_prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """Choice `index` ended. usage.completion_tokens counts this choice's tokens only."""
    reason: FinishReason
    usage: Usage
    index: int = 0
    # Seconds the choice waited in the engine's queue before its first step; None if it never ran.
    queue_time: float | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """The request failed after admission; error says how (status, message) for the wire."""
    error: ProtocolError
    index: int = 0


Event = TokenDelta | Finished | Failed
