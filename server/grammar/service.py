"""GrammarService: one tokenizer info per model, grammars compiled off the step loop and cached.

Compiling means building an llguidance matcher for the grammar (parse, lexer, first mask): about 2 ms
for a typical schema, up to seconds for a huge one. It runs on one background thread (llguidance
releases the GIL), so the engine's step loop never waits for it: a request whose grammar is not ready
yet waits outside the scheduler (vLLM's WAITING_FOR_FSM). A compiled grammar is a matcher in its start
state; each sequence gets a copy (about 25 us). The cache is keyed by the constraint's canonical text
and bounded by an estimate of bytes: 16 KiB + 8 bytes per grammar character (measured: a 1.4 KB
grammar's matcher adds ~15 KiB of RSS).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass

import torch

from protocol.errors import ProtocolError
from protocol.types import Constraint, ToolSpec
from server.grammar.cache import LruBytes
from server.grammar.compile import GrammarSpecError, grammar_text

log = logging.getLogger("berth.grammar")

DEFAULT_CACHE_BYTES = 64 << 20
_ENTRY_BYTES = 16 << 10
_FIELD = {"json": "response_format", "tools": "tools"}   # the request field a bad constraint came from


class GrammarError(ProtocolError):
    """A constraint berth cannot enforce (malformed, or a schema feature the library lacks): a 400."""

    def __init__(self, constraint: Constraint, reason: str):
        what = {"json": "JSON schema", "tools": "tool definitions", "regex": "regex", "choice": "choice list",
                "grammar": "grammar"}[constraint.kind]
        first = reason.strip().splitlines()[0] if reason.strip() else "invalid"
        super().__init__(f"unsupported or invalid {what}: {first}"[:1000], status=400,
                         param=_FIELD.get(constraint.kind, "structured_outputs"))


def cache_key(constraint: Constraint) -> str:
    spec = constraint.spec
    if isinstance(spec, ToolSpec):
        spec = {"tools": [[t.name, t.parameters, t.strict] for t in spec.tools], "choice": spec.choice,
                "name": spec.name, "parallel": spec.parallel}
    return constraint.kind + ":" + json.dumps(spec, sort_keys=True, ensure_ascii=False, default=list)


class Matcher:
    """One sequence's position in its grammar."""
    __slots__ = ("_m",)

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row]."""
        target = bitmask[row]
        self._m.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and the matcher is in error) if the grammar rejects it."""
        return self._m.consume_token(token_id)

    def replay(self, token_ids: list[int]) -> bool:
        return self._m.consume_tokens(token_ids) if token_ids else True

    @property
    def is_terminated(self) -> bool:
        """Nothing but the end of the text can follow."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete answer (more may still follow)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error()


@dataclass(slots=True)
class CompiledGrammar:
    template: object           # llguidance.LLMatcher in its start state (never advanced)
    compile_seconds: float

    def matcher(self) -> Matcher:
        return Matcher(self.template.deep_copy())


class PendingGrammar:
    """A grammar being compiled (or already compiled: a cache hit is born done)."""
    __slots__ = ("_future",)

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> CompiledGrammar:
        """The compiled grammar; raises GrammarError when it cannot be compiled."""
        return self._future.result(timeout)

    @property
    def future(self) -> concurrent.futures.Future:
        return self._future


class GrammarService:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.vocab_size = vocab_size
        self.cache = LruBytes(cache_bytes)
        self._hf_tokenizer = hf_tokenizer
        self._eos = sorted(eos_token_ids)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="berth-grammar")
        self._tokenizer: concurrent.futures.Future | None = None
        self._inflight: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> PendingGrammar:
        """Never blocks. Identical constraints compiled concurrently share one compilation."""
        key = cache_key(constraint)
        hit = self.cache.get(key)
        if hit is not None:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(hit)
            return PendingGrammar(done)
        with self._lock:
            future = self._inflight.get(key)
            if future is None:
                if self._tokenizer is None:
                    self._tokenizer = self._pool.submit(self._build_tokenizer)
                future = self._pool.submit(self._compile, key, constraint)
                self._inflight[key] = future
        return PendingGrammar(future)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _build_tokenizer(self):
        import llguidance.hf

        start = time.perf_counter()
        tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                 eos_token=self._eos or None)
        log.info("grammar tokenizer info built in %.2f s", time.perf_counter() - start)
        return tokenizer

    def _compile(self, key: str, constraint: Constraint) -> CompiledGrammar:
        import llguidance

        try:
            tokenizer = self._tokenizer.result()
            start = time.perf_counter()
            try:
                grammar = grammar_text(constraint)
            except GrammarSpecError as exc:
                raise GrammarError(constraint, str(exc)) from None
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
            if is_error:
                raise GrammarError(constraint, messages[0] if messages else "invalid")
            template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if template.is_error():
                raise GrammarError(constraint, template.get_error())
            compiled = CompiledGrammar(template, time.perf_counter() - start)
            self.cache.put(key, compiled, _ENTRY_BYTES + 8 * len(grammar))
            return compiled
        finally:
            with self._lock:
                self._inflight.pop(key, None)
