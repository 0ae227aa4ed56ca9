"""IncrementalDetokenizer: token ids -> stable text deltas, with stop strings (one per choice).

Decoding (vLLM's prefix/read offsets, mini-sglang's DecodeStatus): only a small window of recent ids
is decoded per token. ids[prefix_offset:read_offset] is the text already emitted at the window's
start (decoded for context, so a token's leading space or a merged character comes out right);
ids[prefix_offset:] decoded, minus that prefix, is the candidate new text. While it ends with
U+FFFD (an incomplete UTF-8 character) nothing is emitted and the window grows.

Stop strings: the longest suffix of the new text that could still begin a stop string is held back;
when a stop string completes, the text before it is emitted, the stop text is dropped and `stopped`
is set. Text already emitted never contains a stop string, so a stop can only start in held text.

The tokenizer needs one method: decode(ids: list[int], skip_special_tokens: bool) -> str
(any HF tokenizer).
"""
from __future__ import annotations

_INITIAL_CONTEXT = 5   # prompt ids kept as decoding context for the first output token (vLLM's)
_MAX_DEAD_IDS = 64     # ids before the window are dropped once there are this many


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self.stopped = False
        self.text = ""                # everything emitted so far
        self._held = ""               # decoded text withheld because it may begin a stop string
        self._ids = list(prompt_token_ids[-_INITIAL_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Feed one output token; return the newly stable text ("" when nothing is ready)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        return self._emit(self._held + self._decode_window(final=False), final=False)

    def flush(self) -> str:
        """At finish: release the held text and any undecodable tail (unless a stop string hit)."""
        if self.stopped:
            return ""
        return self._emit(self._held + self._decode_window(final=True), final=True)

    def _decode_window(self, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > _MAX_DEAD_IDS:
            del self._ids[:self._prefix_offset]
            self._prefix_offset, self._read_offset = 0, self._read_offset - self._prefix_offset
        return full[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _emit(self, pending: str, final: bool) -> str:
        cut = self._find_stop(pending)
        if cut is not None:
            out, self._held, self.stopped = pending[:cut], "", True
        else:
            num_held = 0 if final else self._num_held(pending)
            out, self._held = pending[:len(pending) - num_held], pending[len(pending) - num_held:]
        self.text += out
        return out

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _num_held(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
