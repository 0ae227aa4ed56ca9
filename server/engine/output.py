"""Per-choice output bookkeeping shared by both engines: detokenize, stop checks, events."""
from __future__ import annotations

from protocol.types import Finished, FinishReason, TokenDelta, TokenLogprob, Usage
from server.engine.detokenizer import IncrementalDetokenizer


class ChoiceOutput:
    """Turns one choice's sampled tokens into TokenDelta events and decides when it is finished."""

    def __init__(self, tokenizer, params, index: int, prompt_ids: list[int], max_tokens: int,
                 eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.index = index
        self.num_prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.detok = IncrementalDetokenizer(tokenizer.hf, prompt_ids, params.stop)
        self.num_output_tokens = 0
        self.reason: FinishReason | None = None

    def add(self, token_id: int, logprob: TokenLogprob | None = None, complete: bool = False) -> TokenDelta:
        """Account for one sampled token. The delta always carries the token id; its text may be ""
        (a character still incomplete, or a possible stop string held back). complete: the text is
        done after this token (its grammar admits nothing more), so the choice stops here."""
        self.num_output_tokens += 1
        if token_id in self.stop_ids and (self.num_output_tokens > self.params.min_tokens or complete):
            text, self.reason = "", FinishReason.STOP   # EOS / stop tokens are not part of the text
        else:
            text = self.detok.add(token_id)
            if self.detok.stopped or complete:
                self.reason = FinishReason.STOP
            elif self.num_output_tokens >= self.max_tokens:
                self.reason = FinishReason.LENGTH
        if self.reason is not None and not self.detok.stopped:
            text += self.detok.flush()
        return TokenDelta(text, (token_id,), self.index, (logprob,) if logprob is not None else None,
                          self.num_prompt_tokens)

    def finished(self, reason: FinishReason | None = None, cached_tokens: int = 0,
                 queue_time: float | None = None) -> Finished:
        return Finished(reason or self.reason or FinishReason.ABORT,
                        Usage(self.num_prompt_tokens, self.num_output_tokens, cached_tokens), self.index,
                        queue_time)


def make_logprob(tokenizer, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> TokenLogprob:
    conv = tokenizer.hf.convert_ids_to_tokens
    return TokenLogprob(conv(token_id), logprob, token_id,
                        tuple((conv(i), lp, i) for i, lp in (top or ())))
