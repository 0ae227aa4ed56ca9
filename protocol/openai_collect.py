"""Non-stream bodies: collect a request's events, then render chat.completion / text_completion.

feed() raises the ProtocolError of a Failed event (the server answers it as an HTTP error).
With tools, a chat choice's text is parsed (protocol.tools.parse_tool_calls): message.tool_calls
only when there are calls, content None when nothing else is left, finish_reason "tool_calls"
when the engine said stop ("length" and "abort" stay). Logprobs cover all the choice's tokens.
"""
from __future__ import annotations

from protocol.reasoning import ReasoningConfig, split_reasoning
from protocol.openai_render import (CompletionLogprobs, UsageTally, chat_logprobs, check_index,
                                    merge_completion_logprobs)
from protocol.tools import parse_tool_calls
from protocol.types import Event, Failed, Finished, FinishReason, TokenDelta, TokenLogprob, ToolSpec


class _Collector:
    def __init__(self, n: int) -> None:
        self.usage = UsageTally(n)
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[tuple[TokenLogprob, ...]] | None] = [None] * n
        self._reasons: list[FinishReason | None] = [None] * n

    def feed(self, ev: Event) -> None:
        check_index(ev.index, self.usage.n)
        match ev:
            case TokenDelta():
                self.usage.on_delta(ev)
                self._texts[ev.index].append(ev.text)
                if ev.logprobs is not None:
                    if self._logprobs[ev.index] is None:
                        self._logprobs[ev.index] = []
                    self._logprobs[ev.index].append(ev.logprobs)
            case Finished():
                self.usage.on_finished(ev)
                self._reasons[ev.index] = ev.reason
            case Failed():
                raise ev.error
            case _:
                raise TypeError(f"not an engine event: {type(ev).__name__}")

    def _text(self, index: int) -> str:
        return "".join(self._texts[index])

    def _reason(self, index: int) -> str | None:
        reason = self._reasons[index]
        return reason.value if reason is not None else None


class ChatCollector(_Collector):
    def __init__(self, request_id: str, model: str, created: int, n: int, tools: ToolSpec | None = None,
                 reasoning: ReasoningConfig | None = None) -> None:
        super().__init__(n)
        self._reasoning = reasoning
        self.sources: list[dict] | None = None
        self._base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created,
                      "model": model}
        self._tool_names = [t.name for t in tools.tools] if tools is not None else None

    def _choice(self, index: int) -> tuple[dict, str | None]:
        text, reason = self._text(index), self._reason(index)
        thought = None
        if self._reasoning is not None:
            thought, text = split_reasoning(text, self._reasoning)
        extra = {"reasoning_content": thought} if thought is not None else {}
        if self._tool_names is None:
            return {"role": "assistant", "content": text, **extra}, reason
        content, calls = parse_tool_calls(text, self._tool_names)
        message = {"role": "assistant", "content": content, **extra}
        if calls:
            message["tool_calls"] = calls
            if reason == FinishReason.STOP.value:
                reason = "tool_calls"
        return message, reason

    def body(self) -> dict:
        choices = []
        for i in range(self.usage.n):
            parts = self._logprobs[i]
            logprobs = chat_logprobs(tuple(lp for part in parts for lp in part)) if parts is not None else None
            message, reason = self._choice(i)
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
        body = {**self._base, "choices": choices, "usage": self.usage.to_dict()}
        if self.sources is not None:
            body["sources"] = self.sources     # knowledge-base answers: what was retrieved (an extra field)
        return body


class CompletionCollector(_Collector):
    def __init__(self, request_id: str, model: str, created: int, n: int) -> None:
        super().__init__(n)
        self._base = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created,
                      "model": model}

    def _completion_logprobs(self, index: int) -> dict | None:
        parts = self._logprobs[index]
        if parts is None:
            return None
        renderer = CompletionLogprobs()
        # text per delta is not kept with the logprobs: offsets follow the tokens' own text
        return merge_completion_logprobs([renderer.render(part, "".join(lp.token for lp in part))
                                          for part in parts])

    def body(self) -> dict:
        choices = [{"index": i, "text": self._text(i), "logprobs": self._completion_logprobs(i),
                    "finish_reason": self._reason(i)} for i in range(self.usage.n)]
        return {**self._base, "choices": choices, "usage": self.usage.to_dict()}
