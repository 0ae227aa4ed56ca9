"""Scheduler: continuous batching under a token budget (vLLM v1's rule, no prefill/decode phases).

Each running sequence's num_computed_tokens catches up with num_tokens: a step computes tokens
[start, start + num_new_tokens) of each scheduled sequence. A prompt is prefilled in chunks when the
budget is short, a prefix-cache hit just starts it further along, and decode is a chunk of one.
Waiting sequences are admitted FCFS; when blocks run out for a running sequence the NEWEST running
sequence is preempted (blocks freed, requeued at the front, recomputed later; its tokens are kept).
Finishing (stop, EOS, length) is the engine's decision: it calls finish() or abort().
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int   # seq.num_computed_tokens before this step


@dataclass(slots=True)
class SchedulerOutput:
    """scheduled: single-token rows first (num_decode of them), then multi-token (prefill) rows.
    A single-token row may be a prompt token (a 1-token chunk); needs_sample() tells which rows
    produce a token. preempted: sequences that lost their blocks in this step."""
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_decode: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def needs_sample(sched: ScheduledSeq) -> bool:
    """True when this step catches the sequence up, so its last row's logits are sampled."""
    return sched.start + sched.num_new_tokens == sched.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        assert max_num_seqs > 0 and max_num_batched_tokens > 0
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # admission order: oldest first, newest last
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens tokens (prompt + max_tokens) could ever run alone."""
        bm = self.block_manager
        return (num_tokens <= self.max_model_len
                and bm.blocks_to_hold(num_tokens, self.max_num_batched_tokens) <= bm.num_usable_blocks)

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:   # do not admit new work in a step that had to take blocks away
            self._schedule_waiting(out, budget)
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)   # stable: decode rows first
        out.num_decode = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, f"running seq {seq.seq_id} has nothing to compute"
            if not self._allocate_or_preempt(seq, seq.num_computed_tokens + num_new, out):
                break   # seq itself was the newest and got preempted
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        while not self.block_manager.allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_hit = len(bm.match_prefix(seq)) * bm.block_size
            num_new = min(seq.num_tokens - num_hit, budget)
            # NOTE: admission asks for blocks for the whole remaining prompt (not just this chunk) to
            # be free now, so an admitted prefill rarely forces a preemption a few steps later (a window
            # group: the blocks it holds at once, as can_ever_fit counts them).
            if not bm.can_allocate(seq, seq.num_tokens, self.max_num_batched_tokens):
                break   # FCFS: nobody skips ahead of the head of the queue
            allocated = bm.allocate(seq, num_hit + num_new)
            assert allocated and seq.num_computed_tokens == num_hit
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, num_hit))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Advance every scheduled sequence by its chunk; a sequence that caught up gets its sampled
        token (sampled maps seq_id -> token id) appended. Sequences finished or aborted since
        schedule() are skipped. Newly full blocks are registered for prefix caching."""
        for sched in output.scheduled:
            seq = sched.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            assert seq.num_computed_tokens == sched.start, f"seq {seq.seq_id} changed since schedule()"
            seq.num_computed_tokens += sched.num_new_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(sampled[seq.seq_id])
            self.block_manager.commit_full_blocks(seq)
            self.block_manager.release_out_of_window(seq)   # sliding-window models: blocks no query can see

    def finish(self, seq: Sequence) -> None:
        """Remove seq (waiting or running), free its blocks and mark it FINISHED. Idempotent."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of request_id in any state; returns them (empty when unknown)."""
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq)
        return seqs

    def check_integrity(self) -> None:
        """Scheduler and block invariants; raises AssertionError (tests call it after every step)."""
        for seq in self.running:
            assert seq.status is SequenceStatus.RUNNING, f"seq {seq.seq_id} in running is {seq.status}"
            assert seq.num_computed_tokens < seq.num_tokens <= self.max_model_len, f"seq {seq.seq_id} counts"
        for seq in self.waiting:
            assert seq.status is SequenceStatus.WAITING, f"seq {seq.seq_id} in waiting is {seq.status}"
            assert not any(seq.block_tables) and seq.num_computed_tokens == 0, f"waiting seq {seq.seq_id} holds blocks"
        assert len(self.running) <= self.max_num_seqs, "too many running sequences"
        assert len({id(s) for s in (*self.running, *self.waiting)}) == len(self.running) + len(self.waiting), \
            "a sequence is queued twice"
        self.block_manager.check_integrity([*self.running, *self.waiting])
