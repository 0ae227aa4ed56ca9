"""Sequence: the engine's state for one choice of one request (state only, no behaviour).

The Scheduler and the BlockManager mutate it; the Engine reads it. Invariants:
  0 <= num_computed_tokens < num_tokens   while RUNNING and not caught up (a step may catch it up;
                                          update() then appends the sampled token)
  block_table covers at least num_computed_tokens tokens (len(block_table) * block_size); every table of
  block_tables (one per KV group, block_table is the first) has the same length
  WAITING sequences hold no blocks and have num_computed_tokens == 0
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocol.types import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, kw_only=True)
class Sequence:
    """token_ids is prompt + output (the Sequence owns this list; it only grows).

    num_cached_tokens is the prefix-cache hit of the first admission (usage.cached_tokens);
    re-admissions after preemption do not change it. max_tokens is resolved by the engine.
    """
    seq_id: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    index: int = 0
    arrival: float = 0.0
    first_scheduled: float | None = None      # time.monotonic() of its first admission to running
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    block_tables: list[list[int]] = field(default_factory=lambda: [[]])   # one per KV group (BlockManager)
    block_hashes: list[bytes] = field(default_factory=list)   # prefix-cache hash of each full block of token_ids

    @property
    def block_table(self) -> list[int]:
        """The first KV group's block table (the only one for most models)."""
        return self.block_tables[0]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
