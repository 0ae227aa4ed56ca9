"""The model's tokenizer and chat template, and admission checks shared by both engines."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.tools import fallback_messages, template_messages, tool_prompt_tools
from protocol.types import GenerateRequest


class Tokenizer:
    """Wraps an HF tokenizer loaded from a local folder (never from a hub)."""

    def __init__(self, folder: str | Path):
        import transformers

        self.hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.vocab_size = len(self.hf)
        self.eos_token_ids = frozenset(_eos_ids(Path(folder), self.hf))

    def encode_request(self, request: GenerateRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is not None:
            messages, tools = self._chat_messages(request)
            if self.hf.chat_template is None:
                text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
                return self.hf.encode(text, add_special_tokens=True)
            ids = self.hf.apply_chat_template(messages, tools=tools, tokenize=True,
                                              add_generation_prompt=request.add_generation_prompt)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            return list(ids)
        return self.hf.encode(request.prompt or "", add_special_tokens=True)


    def _chat_messages(self, request: GenerateRequest) -> tuple[list[dict], list[dict] | None]:
        """Messages (and tools) for the chat template. A template that renders tools gets them and the
        tool-call history as they are; any other gets protocol.tools' documented fallback prompt."""
        messages = request.messages
        has_tool_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if request.tools is None and not has_tool_history:
            return messages, None
        if self.supports_tools:
            tools = tool_prompt_tools(request.tools) if request.tools else None
            return template_messages(messages), tools
        return fallback_messages(messages, request.tools or ()), None

    def generation_prompt(self) -> str:
        """The text the chat template appends to open the assistant's turn ("" without a template)."""
        if self.hf.chat_template is None:
            return ""
        probe = [{"role": "user", "content": "x"}]
        try:
            without = self.hf.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
            with_prompt = self.hf.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that cannot render a probe has no known prompt
            return ""
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""

    @property
    def supports_tools(self) -> bool:
        template = self.hf.chat_template
        return isinstance(template, str) and "tools" in template and "tool_calls" in template


def _eos_ids(folder: Path, hf) -> set[int]:
    ids = {hf.eos_token_id} if hf.eos_token_id is not None else set()
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


@dataclass(slots=True)
class Admitted:
    prompt_token_ids: list[int]
    max_tokens: int


def admit(request: GenerateRequest, prompt_ids: list[int], max_model_len: int, vocab_size: int,
          max_new_tokens: int | None = None) -> Admitted:
    """Check a tokenized request against the context; resolve max_tokens. Raises ProtocolError(400)."""
    n = len(prompt_ids)
    if n == 0:
        raise ProtocolError("the prompt is empty", param="prompt")
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise ProtocolError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    if n >= max_model_len:
        raise ProtocolError(f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                            f"has {n} tokens: no room left to generate.",
                            param="messages" if request.messages is not None else "prompt")
    room = max_model_len - n
    wanted = request.params.max_tokens
    if max_new_tokens is not None:
        room = min(room, max_new_tokens)
        wanted = None if wanted is None else min(wanted, max_new_tokens)
    if wanted is None or (wanted > room and request.cap_max_tokens):
        return Admitted(prompt_ids, room if wanted is None else min(wanted, room))
    if wanted > room:
        raise ProtocolError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {n + wanted} tokens ({n} in the prompt, {wanted} for the completion).",
                            param="max_tokens")
    return Admitted(prompt_ids, wanted)
