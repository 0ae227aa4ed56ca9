"""SSE stream renderers for /v1/chat/completions and /v1/completions (OpenAI and BladeLLM shapes).

The server's one streaming loop drives every renderer the same way:
    on_event(ev) for each engine event -> framed bytes to write (a Failed event ends the stream:
    it renders as on_error); on_end() once after the last event -> closing frames (usage, [DONE]);
    on_error(err) for an error after the stream started. After an error, on_event() and on_end()
    return nothing: [DONE] is written exactly once.

Chat with tools: each choice's text goes through a protocol.tools.ToolCallParser. Content comes
out as {"content"} deltas; a call as {"tool_calls": [{"index", "id", "type": "function",
"function": {"name", "arguments": ""}}]}, then {"tool_calls": [{"index", "function": {"arguments":
<fragment>}}]} deltas (the OpenAI SDK's shape); the parser is flushed before the finish chunk,
whose finish_reason is "tool_calls" when the choice made calls and the engine said stop.
Logprobs with tools: tokens whose text is held back wait for the next content chunk and ride on
it; tokens whose text went into a tool call (or into dropped whitespace) get none.
"""
from __future__ import annotations

from protocol.errors import ProtocolError
from protocol.reasoning import ReasoningConfig, ReasoningSplitter
from protocol.openai_render import CompletionLogprobs, UsageTally, chat_logprobs, check_index
from protocol.sse import DONE, encode_event
from protocol.tools import ContentDelta, ToolCallParser, ToolCallStart, ToolEvent
from protocol.types import Event, Failed, Finished, FinishReason, TokenDelta, TokenLogprob, ToolSpec


class _SseRenderer:
    def __init__(self, n: int) -> None:
        self.usage = UsageTally(n)
        self.is_done = False

    def on_event(self, ev: Event) -> list[bytes]:
        if self.is_done:
            return []
        check_index(ev.index, self.usage.n)
        match ev:
            case TokenDelta():
                self.usage.on_delta(ev)
                return self._delta(ev)
            case Finished():
                self.usage.on_finished(ev)
                return self._finished(ev)
            case Failed():
                return self.on_error(ev.error)
        raise TypeError(f"not an engine event: {type(ev).__name__}")

    def on_end(self) -> list[bytes]:
        if self.is_done:
            return []
        self.is_done = True
        return self._closing() + [DONE]

    def on_error(self, err: ProtocolError) -> list[bytes]:
        if self.is_done:
            return []
        self.is_done = True
        return [encode_event(self._error_body(err)), DONE]

    def _error_body(self, err: ProtocolError) -> dict:
        return err.to_dict()

    def _closing(self) -> list[bytes]:
        return []

    def _delta(self, ev: TokenDelta) -> list[bytes]:
        raise NotImplementedError

    def _finished(self, ev: Finished) -> list[bytes]:
        raise NotImplementedError


class ChatStreamRenderer(_SseRenderer):
    """chat.completion.chunk events: a role chunk per choice, content deltas, a finish chunk per
    choice, then (include_usage) a usage chunk with empty choices, then [DONE]."""

    def __init__(self, request_id: str, model: str, created: int, n: int, include_usage: bool,
                 tools: ToolSpec | None = None, reasoning: ReasoningConfig | None = None) -> None:
        super().__init__(n)
        # reasoning models: <think>...</think> streams as delta.reasoning_content, the rest as usual
        self._splitters = [ReasoningSplitter(reasoning) for _ in range(n)] if reasoning is not None else None
        self._base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk",
                      "created": created, "model": model}
        self._include_usage = include_usage
        self._has_role = [False] * n
        names = [t.name for t in tools.tools] if tools is not None else None
        self._parsers = [ToolCallParser(names) for _ in range(n)] if names is not None else None
        self._held_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        # knowledge-base answers: the retrieved sources ride on the stream's first chunk (an extra field)
        self.sources: list[dict] | None = None

    def _chunk(self, choice: dict) -> bytes:
        chunk = {**self._base, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        if self.sources is not None:
            chunk["sources"], self.sources = self.sources, None
        return encode_event(chunk)

    def _role(self, index: int) -> list[bytes]:
        if self._has_role[index]:
            return []
        self._has_role[index] = True
        return [self._chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})]

    def _delta(self, ev: TokenDelta) -> list[bytes]:
        frames = self._role(ev.index)
        if self._splitters is None:
            return frames + self._content(ev.index, ev.text, ev.logprobs)
        thought, text = self._splitters[ev.index].feed(ev.text) if ev.text else ("", "")
        return frames + self._thought(ev.index, thought) + self._content(ev.index, text, ev.logprobs)

    def _thought(self, index: int, text: str) -> list[bytes]:
        if not text:
            return []
        return [self._chunk({"index": index, "delta": {"reasoning_content": text}, "logprobs": None,
                             "finish_reason": None})]

    def _content(self, index: int, text: str, logprobs) -> list[bytes]:
        if self._parsers is not None:
            self._held_logprobs[index] += logprobs or ()
            return self._tool_frames(index, self._parsers[index].feed(text) if text else [])
        if text or logprobs:
            rendered = chat_logprobs(logprobs) if logprobs is not None else None
            return [self._chunk({"index": index, "delta": {"content": text}, "logprobs": rendered,
                                 "finish_reason": None})]
        return []

    def _tool_frames(self, index: int, events: list[ToolEvent]) -> list[bytes]:
        frames = []
        for tev in events:
            held, self._held_logprobs[index] = self._held_logprobs[index], []
            if isinstance(tev, ContentDelta):
                frames.append(self._chunk({"index": index, "delta": {"content": tev.text},
                                           "logprobs": chat_logprobs(tuple(held)) if held else None,
                                           "finish_reason": None}))
                continue
            if isinstance(tev, ToolCallStart):
                call = {"index": tev.index, "id": tev.id, "type": "function",
                        "function": {"name": tev.name, "arguments": ""}}
            else:
                call = {"index": tev.index, "function": {"arguments": tev.fragment}}
            frames.append(self._chunk({"index": index, "delta": {"tool_calls": [call]}, "logprobs": None,
                                       "finish_reason": None}))
        return frames

    def _finished(self, ev: Finished) -> list[bytes]:
        frames, reason = self._role(ev.index), ev.reason.value
        if self._splitters is not None:
            thought, text = self._splitters[ev.index].finish()
            frames += self._thought(ev.index, thought) + self._content(ev.index, text, None)
        if self._parsers is not None:
            parser = self._parsers[ev.index]
            frames += self._tool_frames(ev.index, parser.finish())
            if parser.num_calls and ev.reason == FinishReason.STOP:
                reason = "tool_calls"
        return frames + [self._chunk({"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": reason})]

    def _closing(self) -> list[bytes]:
        if not self._include_usage:
            return []
        return [encode_event({**self._base, "choices": [], "usage": self.usage.to_dict()})]


class CompletionStreamRenderer(_SseRenderer):
    """text_completion chunks. flavour "openai": finish_reason null until a choice's last chunk,
    then a usage chunk if include_usage. flavour "bladellm": the seed's shape on every chunk
    (finish_reason "", cumulative usage, error_info null); the last chunk has empty text and
    finish_reason stop/length; a mid-stream error is a chunk with finish_reason "error" and
    error_info set."""

    def __init__(self, request_id: str, model: str, created: int, n: int, include_usage: bool,
                 flavour: str = "openai") -> None:
        super().__init__(n)
        self._is_blade = flavour == "bladellm"
        chunk_id = request_id if self._is_blade else f"cmpl-{request_id}"
        self._base = {"id": chunk_id, "object": "text_completion", "created": created, "model": model}
        self._include_usage = include_usage and not self._is_blade
        self._logprobs = [CompletionLogprobs() for _ in range(n)]

    def _chunk(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None,
               error_info: dict | None = None) -> bytes:
        if self._is_blade:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason or ""}
            return encode_event({**self._base, "choices": [choice],
                                 "usage": self.usage.to_dict(details=False), "error_info": error_info})
        chunk = {**self._base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                            "finish_reason": finish_reason}]}
        if self._include_usage:
            chunk["usage"] = None
        return encode_event(chunk)

    def _delta(self, ev: TokenDelta) -> list[bytes]:
        if not ev.text and not ev.logprobs:
            return []
        logprobs = None
        if ev.logprobs is not None:
            logprobs = self._logprobs[ev.index].render(ev.logprobs, ev.text)
        return [self._chunk(ev.index, ev.text, logprobs, None)]

    def _finished(self, ev: Finished) -> list[bytes]:
        return [self._chunk(ev.index, "", None, ev.reason.value)]

    def _closing(self) -> list[bytes]:
        if not self._include_usage:
            return []
        return [encode_event({**self._base, "choices": [], "usage": self.usage.to_dict()})]

    def on_error(self, err: ProtocolError) -> list[bytes]:
        if not self._is_blade or self.is_done:
            return super().on_error(err)
        self.is_done = True
        return [self._chunk(0, "", None, "error", error_info=err.to_dict()["error"]), DONE]
