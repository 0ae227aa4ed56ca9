"""Counters an engine exposes for /health, /metrics and the tests' invariants (RELIABILITY.md INV)."""
from dataclasses import dataclass


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_blocks_total: int = 0
    num_blocks_used: int = 0
    num_blocks_evictable: int = 0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hit_tokens: int = 0
