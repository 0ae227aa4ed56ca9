"""Structured outputs: one small interface over the grammar library (llguidance).

    service = GrammarService(hf_tokenizer, vocab_size, eos_token_ids)
    pending = service.compile(constraint)     # never blocks: compiled in a background thread, cached
    pending.done() / pending.result()         # -> CompiledGrammar, or raises GrammarError (a 400)
    matcher = compiled.matcher()              # one per sequence: fill(bitmask, row), accept(token)

The engine owns when these are called (waiting for a grammar, per-step masks, preemption); the
sampler only applies the bitmask (server.grammar.bitmask). Nothing here knows about HTTP.
"""
from server.grammar.bitmask import allocate_bitmask, apply_bitmask
from server.grammar.service import CompiledGrammar, GrammarError, GrammarService, Matcher, PendingGrammar

__all__ = ["GrammarService", "PendingGrammar", "CompiledGrammar", "Matcher", "GrammarError",
           "allocate_bitmask", "apply_bitmask"]
