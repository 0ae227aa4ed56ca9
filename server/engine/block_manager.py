"""BlockManager: KV-cache block accounting with ref counts and prefix caching (plain ints, no torch).

A block is in exactly one of two places:
  used   ref_count > 0, held by ref_count live sequences (in their block_table)
  free   ref_count == 0, in the free queue; if it still has a hash it is "evictable": a prefix hit
         takes it back out of the queue, an allocation from the head evicts it (drops its hash)

Free-queue order is eviction order (vLLM's BlockPool): allocation pops the head; a freed block with
a hash goes to the tail (least recently used is evicted first), a freed block without a hash goes to
the head (it holds nothing worth keeping). free() walks a block table in reverse, so a sequence's
tail blocks are evicted before its shared prefix.

Prefix caching: hash_i = sha256(hash_{i-1} || token ids of block i) over FULL blocks whose KV is
computed; hash_to_block_id maps a hash to one block holding it (two sequences that computed the same
block concurrently keep two blocks with the same hash; only one is in the map).

Sliding windows (`window`: every layer of the model attends to the last `window` keys, Phi-3): a block none of
whose positions any later query of its sequence can see is released after each step (release_out_of_window) and
its table entry becomes NULL_BLOCK, block 0, reserved for this and never allocated: attention still indexes
the whole table, but masks those positions, so what block 0 holds never matters. A released block keeps its
hash, so other sequences can still hit it in the prefix cache; a sequence whose hash chain meets NULL_BLOCK stops
registering new blocks (its parent hash is gone).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from server.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()   # the block's tokens, set with hash (full blocks only)


@dataclass(slots=True)
class PrefixHitStats:
    num_queries: int = 0         # prefix lookups (first allocation of a sequence)
    num_query_tokens: int = 0    # tokens looked up
    num_hit_tokens: int = 0      # tokens served from the cache


def hash_block(parent: bytes | None, token_ids: Iterable[int]) -> bytes:
    h = hashlib.sha256(parent or b"berth")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def _is_first(seq: Sequence) -> bool:
    return not seq.block_table and seq.num_computed_tokens == 0


NULL_BLOCK = 0   # table entry of a block released out of a sliding window (reserved when window is set)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None):
        assert num_blocks > (1 if window else 0) and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        first = 1 if window else 0   # block 0 is NULL_BLOCK: never allocated
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(first, num_blocks))
        self.hash_to_block_id: dict[bytes, int] = {}
        self.prefix_hit_stats = PrefixHitStats()

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - (1 if self.window else 0)

    def release_out_of_window(self, seq: Sequence) -> int:
        """Release the blocks of seq that no later query can attend to: the next query sits at position
        num_computed_tokens and sees keys from num_computed_tokens - window + 1 on. Returns how many."""
        if not self.window:
            return 0
        table, released = seq.block_table, 0
        first_needed = max(0, seq.num_computed_tokens - self.window + 1)
        for j in range(min(first_needed // self.block_size, len(table))):
            if table[j] != NULL_BLOCK:
                self._decref(table[j])
                table[j] = NULL_BLOCK
                released += 1
        return released

    def _decref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.hash is None:
                self.free_queue.move_to_end(block_id, last=False)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self.free_queue)

    @property
    def num_evictable_blocks(self) -> int:
        return sum(1 for b in self.free_queue if self.blocks[b].hash is not None)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids for the longest full-block prefix of seq (read-only). Never covers all of
        seq.token_ids: the last token is always recomputed so that its logits exist (vLLM's rule)."""
        if not self.enable_prefix_caching:
            return []
        bs, hit_ids, parent = self.block_size, [], None
        for i in range((seq.num_tokens - 1) // bs):
            token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = hash_block(parent, token_ids)
            block_id = self.hash_to_block_id.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != token_ids:
                break
            hit_ids.append(block_id)
        return hit_ids

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        hit_ids = self.match_prefix(seq) if _is_first(seq) else []
        return self._num_needed(seq, num_tokens, hit_ids) <= len(self.free_queue)

    def _num_needed(self, seq: Sequence, num_tokens: int, hit_ids: list[int]) -> int:
        num_new = self.num_blocks_for(num_tokens) - len(seq.block_table) - len(hit_ids)
        num_revived = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        return max(num_new, 0) + num_revived

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq.block_table cover num_tokens tokens in total. On the first allocation (no blocks,
        nothing computed) cached prefix blocks are reused first and seq.num_computed_tokens is set to
        the hit length (and num_cached_tokens, unless seq was preempted before). Returns False and
        changes nothing when there are not enough free blocks."""
        first = _is_first(seq)
        hit_ids = self.match_prefix(seq) if first else []
        if self._num_needed(seq, num_tokens, hit_ids) > len(self.free_queue):
            return False
        if first:
            self._record_hit(seq, hit_ids)
        for block_id in hit_ids:
            self._incref(block_id)
        seq.block_table.extend(hit_ids)
        for _ in range(self.num_blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._pop_free())
        return True

    def _record_hit(self, seq: Sequence, hit_ids: list[int]) -> None:
        num_hit_tokens = len(hit_ids) * self.block_size
        seq.num_computed_tokens = num_hit_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = min(num_hit_tokens, seq.num_prompt_tokens)
        if self.enable_prefix_caching:
            self.prefix_hit_stats.num_queries += 1
            self.prefix_hit_stats.num_query_tokens += seq.num_tokens
            self.prefix_hit_stats.num_hit_tokens += num_hit_tokens

    def _incref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:   # evict
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (tail first) and clear its block_table. Does not touch
        num_computed_tokens: the caller (Scheduler) resets it when it requeues the sequence."""
        for block_id in reversed(seq.block_table):
            if not (self.window and block_id == NULL_BLOCK):
                self._decref(block_id)
        seq.block_table.clear()

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share parent's full, computed blocks that lie inside child's tokens (n > 1 choices).

        NOTE: only FULL blocks are shared; the last partial block is recomputed by the child (it
        needs its own copy anyway once the choices diverge), and at least the child's last token is
        always recomputed so that its logits exist. child must hold no blocks yet."""
        assert not child.block_table and child.num_computed_tokens == 0
        limit = min(parent.num_computed_tokens, child.num_tokens - 1, parent.num_tokens)
        num_shared = 0
        for i in range(limit // self.block_size):
            lo, hi = i * self.block_size, (i + 1) * self.block_size
            if parent.token_ids[lo:hi] != child.token_ids[lo:hi]:
                break
            num_shared = i + 1
        for block_id in parent.block_table[:num_shared]:
            if not (self.window and block_id == NULL_BLOCK):   # released out of the window: the child's too
                self._incref(block_id)
        child.block_table.extend(parent.block_table[:num_shared])
        child.num_computed_tokens = num_shared * self.block_size
        child.num_cached_tokens = parent.num_cached_tokens

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash and register every block of seq that is full of computed tokens (call after a step).
        Hashed blocks form a prefix of a block table, so only the new tail is hashed."""
        if not self.enable_prefix_caching:
            return
        bs, table = self.block_size, seq.block_table
        num_full = min(seq.num_computed_tokens // bs, len(table))
        start = num_full
        while start > 0 and self.blocks[table[start - 1]].hash is None:
            if self.window and table[start - 1] == NULL_BLOCK:
                return   # the chain's parent was released: nothing more of this sequence is registered
            start -= 1
        parent = self.blocks[table[start - 1]].hash if start else None
        for i in range(start, num_full):
            block = self.blocks[table[i]]
            if block.hash is None:
                block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                block.hash = hash_block(parent, block.token_ids)
                self.hash_to_block_id.setdefault(block.hash, block.block_id)
            parent = block.hash

    def check_integrity(self, live_seqs: Iterable[Sequence] = ()) -> None:
        """Raise AssertionError naming the first broken invariant. live_seqs must be every sequence
        that holds blocks (the scheduler's waiting + running)."""
        held: Counter[int] = Counter()
        for seq in live_seqs:
            table = [b for b in seq.block_table if not (self.window and b == NULL_BLOCK)]
            assert len(set(table)) == len(table), f"seq {seq.seq_id}: block twice in table"
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens, \
                f"seq {seq.seq_id}: {seq.num_computed_tokens} computed tokens but {len(seq.block_table)} blocks"
            if self.window:
                needed = max(0, seq.num_computed_tokens - self.window + 1) // self.block_size
                assert all(b != NULL_BLOCK for b in seq.block_table[needed:]), \
                    f"seq {seq.seq_id}: a block inside the window was released"
            held.update(table)
        if self.window:
            null = self.blocks[NULL_BLOCK]
            assert null.ref_count == 0 and NULL_BLOCK not in self.free_queue and null.hash is None, "NULL_BLOCK in use"
        for block in self.blocks:
            if self.window and block.block_id == NULL_BLOCK:
                continue
            assert block.ref_count == held[block.block_id], \
                f"block {block.block_id}: ref_count {block.ref_count} but held by {held[block.block_id]} seqs"
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), \
                f"block {block.block_id}: ref_count {block.ref_count} vs free queue membership"
            assert (block.hash is None) == (not block.token_ids), f"block {block.block_id}: hash without tokens"
            assert block.hash is None or len(block.token_ids) == self.block_size, \
                f"block {block.block_id}: hashed but not full"
        assert len(self.free_queue) + sum(1 for b in self.blocks if b.ref_count > 0) == self.num_usable_blocks, \
            "free + used != usable blocks"
        for block_hash, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == block_hash, f"hash map points to block {block_id} with another hash"
