"""The engine's side of structured outputs: which sequences have a grammar, where each one stands.

A request with a constraint asks the GrammarService for its grammar at admission. If it is not
compiled yet (a cache miss), the request's first choice is HELD here, outside the scheduler, until
it is (vLLM's WAITING_FOR_FSM): other sequences keep stepping meanwhile. Each choice then has its own
matcher, created on its first sample and advanced by every token it samples. Preemption releases a
matcher; the next sample replays the choice's output tokens into a fresh one (recompute keeps the
tokens, so the replay lands on the same state). Finish and abort drop it.
"""
from __future__ import annotations

import concurrent.futures

import torch

from protocol.errors import ProtocolError
from server.engine.sequence import Sequence
from server.grammar import GrammarService, Matcher, PendingGrammar, allocate_bitmask


class SequenceGrammar:
    __slots__ = ("pending", "matcher", "num_accepted")

    def __init__(self, pending: PendingGrammar):
        self.pending = pending
        self.matcher: Matcher | None = None
        self.num_accepted = 0

    def sync(self, output_token_ids: list[int]) -> Matcher:
        """The matcher positioned after output_token_ids (replayed into a fresh copy when released)."""
        if self.matcher is None:
            self.matcher, self.num_accepted = self.pending.result().matcher(), 0
        if self.num_accepted < len(output_token_ids):
            if not self.matcher.replay(output_token_ids[self.num_accepted:]):
                raise ProtocolError(f"grammar replay failed: {self.matcher.error}", status=500)
            self.num_accepted = len(output_token_ids)
        return self.matcher

    def release(self) -> None:
        self.matcher, self.num_accepted = None, 0


class GrammarBook:
    def __init__(self, service: GrammarService, max_rows: int):
        self.service = service
        self.states: dict[int, SequenceGrammar] = {}          # seq_id -> its grammar position
        self.held: list[Sequence] = []                         # first choices waiting for a compile
        self._bitmask = allocate_bitmask(max_rows, service.vocab_size)

    @property
    def num_held(self) -> int:
        return len(self.held)

    def attach(self, seq: Sequence, pending: PendingGrammar) -> None:
        self.states[seq.seq_id] = SequenceGrammar(pending)

    def is_constrained(self, seq: Sequence) -> bool:
        return seq.seq_id in self.states

    def hold(self, seq: Sequence) -> None:
        self.held.append(seq)

    def poll(self) -> tuple[list[Sequence], list[tuple[Sequence, ProtocolError]]]:
        """Held sequences whose grammar is now compiled, and those whose compile failed."""
        ready, failed, still = [], [], []
        for seq in self.held:
            pending = self.states[seq.seq_id].pending
            if not pending.done():
                still.append(seq)
                continue
            error = pending.future.exception()
            if error is None:
                ready.append(seq)
            else:
                failed.append((seq, error if isinstance(error, ProtocolError)
                               else ProtocolError(f"grammar compile failed: {error}", status=500)))
        self.held = still
        return ready, failed

    def wait(self, timeout: float) -> None:
        """Block until a held sequence's grammar is done (or timeout): the engine has nothing else."""
        futures = [self.states[s.seq_id].pending.future for s in self.held]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def mask(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
        """(rows, bitmask) for the constrained rows of a sampling batch; None when there are none."""
        rows = [row for row, seq in enumerate(seqs) if seq.seq_id in self.states]
        if not rows:
            return None
        if len(rows) > self._bitmask.shape[0]:
            self._bitmask = allocate_bitmask(len(rows), self.service.vocab_size)
        for i, row in enumerate(rows):
            seq = seqs[row]
            self.states[seq.seq_id].sync(seq.output_token_ids).fill(self._bitmask, i)
        return rows, self._bitmask

    def accept(self, seq: Sequence, token_id: int) -> bool:
        """Advance seq's matcher by its sampled token (before the scheduler appends it). Returns
        whether the grammar is complete after it. Raises ProtocolError if the grammar rejects it."""
        state = self.states[seq.seq_id]
        matcher = state.sync(seq.output_token_ids)
        if not matcher.accept(token_id):
            raise ProtocolError(f"a sampled token broke the grammar: {matcher.error}", status=500)
        state.num_accepted += 1
        return matcher.is_terminated

    def release(self, seq: Sequence) -> None:
        state = self.states.get(seq.seq_id)
        if state is not None:
            state.release()

    def drop(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)
        if seq in self.held:
            self.held.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Held sequences of request_id, removed (their states too)."""
        gone = [s for s in self.held if s.request_id == request_id]
        for seq in gone:
            self.drop(seq)
        return gone
