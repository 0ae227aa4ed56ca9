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

KV groups (`windows`, one entry per group: server/engine/models/arch.py's kv_groups): each sequence has one block
table per group (seq.block_tables, all the same length), every group draws blocks from this one pool, and a
block belongs to the group that allocated it (its prefix-cache entry too). A group whose layers attend to the
last `window` keys (Phi-3's every layer, Gemma's local layers) releases after each step the blocks none of whose
positions any later query can see (release_out_of_window): the entry becomes NULL_BLOCK, block 0, reserved for
this and never allocated; attention still indexes the whole table but masks those positions, so what block 0
holds never matters. A released block keeps its hash, so other sequences can still hit it. A prefix hit covers
k blocks when every full-attention group has the k first blocks cached and every window group the blocks the
query at position k * block_size can see (the ones before are NULL_BLOCK in the hit table). Hashes are kept per
sequence (seq.block_hashes), so a chain never breaks at a released block.
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
    group: int = 0                    # the KV group whose prefix-cache map holds its hash


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
    return not any(seq.block_tables) and seq.num_computed_tokens == 0


def blocks_to_hold(windows: Iterable[int | None], block_size: int, num_tokens: int, max_chunk: int) -> int:
    """The most blocks a sequence of num_tokens tokens holds at once, computed in chunks of at most max_chunk
    tokens, over KV groups with these windows: every block in a full-attention group; in a window group those
    the chunk's queries can see (its blocks from the first visible one to the chunk's last)."""
    n = -(-num_tokens // block_size)
    return sum(n if not w else min(n, window_blocks(w, block_size, max_chunk)) for w in windows)


def window_blocks(window: int, block_size: int, max_chunk: int) -> int:
    """The most blocks a window group holds for a chunk of at most max_chunk tokens: the first block its queries
    can see through the chunk's last."""
    return -(-(window - 1 + max_chunk) // block_size) + 1


NULL_BLOCK = 0   # table entry of a block released out of a sliding window (reserved when a group has a window)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None, windows: Iterable[int | None] | None = None):
        """windows: each KV group's window (None: full attention); `window` is the one-group shorthand."""
        self.windows: list[int | None] = list(windows) if windows is not None else [window]
        assert self.windows and (windows is None or window is None)
        self.reserve_null = any(self.windows)
        assert num_blocks > (1 if self.reserve_null else 0) and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        first = 1 if self.reserve_null else 0   # block 0 is NULL_BLOCK: never allocated
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(first, num_blocks))
        self.hash_to_block_ids: list[dict[bytes, int]] = [{} for _ in self.windows]   # one map per group
        self.prefix_hit_stats = PrefixHitStats()

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def hash_to_block_id(self) -> dict[bytes, int]:
        """The first group's prefix-cache map (the only one for most models)."""
        return self.hash_to_block_ids[0]

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - (1 if self.reserve_null else 0)

    def _is_null(self, block_id: int) -> bool:
        return self.reserve_null and block_id == NULL_BLOCK

    def _first_needed(self, window: int | None, num_computed: int) -> int:
        """The first block the query at position num_computed can see, for a group with this window."""
        return max(0, num_computed - window + 1) // self.block_size if window else 0

    def _tables(self, seq: Sequence) -> list[list[int]]:
        if len(seq.block_tables) != self.num_groups:
            assert not any(seq.block_tables), f"seq {seq.seq_id}: block tables of another group layout"
            seq.block_tables = [[] for _ in self.windows]
        return seq.block_tables

    def release_out_of_window(self, seq: Sequence) -> int:
        """Release the blocks of seq that no later query can attend to: the next query sits at position
        num_computed_tokens and sees keys from num_computed_tokens - window + 1 on. Returns how many."""
        released = 0
        for window, table in zip(self.windows, seq.block_tables):
            if not window:
                continue
            end = min(self._first_needed(window, seq.num_computed_tokens), len(table))
            start = end
            while start > 0 and not self._is_null(table[start - 1]):   # released blocks are a prefix
                start -= 1
            for j in range(start, end):
                self._decref(table[j])
                table[j] = NULL_BLOCK
            released += end - start
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

    def blocks_to_hold(self, num_tokens: int, max_chunk: int) -> int:
        return blocks_to_hold(self.windows, self.block_size, num_tokens, max_chunk)

    def capacity_tokens(self, max_chunk: int, limit: int) -> int:
        """The longest sequence (at most limit tokens) that fits this pool alone (blocks_to_hold)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.blocks_to_hold(mid, max_chunk) <= self.num_usable_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_hashes extended to its first num_blocks full blocks (tokens only grow: hashes stay valid)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The first group's cached blocks of match_groups (its table for the hit)."""
        return self.match_groups(seq)[0]

    def match_groups(self, seq: Sequence) -> list[list[int]]:
        """Each group's table for the longest full-block prefix of seq found in the cache (read-only; every
        table the same length, NULL_BLOCK where a window group needs no block). Never covers all of
        seq.token_ids: the last token is always recomputed so that its logits exist (vLLM's rule)."""
        if not self.enable_prefix_caching:
            return [[] for _ in self.windows]
        bs, limit = self.block_size, (seq.num_tokens - 1) // self.block_size
        hashes = self._hashes(seq, limit)
        found: list[list[int | None]] = []
        k = limit
        for g, window in enumerate(self.windows):
            ids: list[int | None] = []
            for i in range(limit if window else k):
                block_id = self.hash_to_block_ids[g].get(hashes[i])
                if block_id is not None and self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                    block_id = None   # a hash collision
                if block_id is None and not window:
                    break
                ids.append(block_id)
            if not window:
                k = min(k, len(ids))
            found.append(ids)
        while True:   # the longest k every window group can serve; lowering k for one group may fail another
            new_k = k
            for window, ids in zip(self.windows, found):
                if window:
                    new_k = self._window_hit(ids, window, new_k)
            if new_k == k:
                break
            k = new_k
        tables = []
        for window, ids in zip(self.windows, found):
            first = self._first_needed(window, k * bs)
            tables.append([NULL_BLOCK] * first + [b for b in ids[first:k]])
        return tables

    def _window_hit(self, ids: list[int | None], window: int, k: int) -> int:
        """The largest k' <= k such that ids holds every block the query at k' * block_size can see."""
        run = [0] * (k + 1)   # run[j]: cached blocks in a row ending just before block j
        for j in range(k):
            run[j + 1] = run[j] + 1 if ids[j] is not None else 0
        while k > 0 and run[k] < k - self._first_needed(window, k * self.block_size):
            k -= 1
        return k

    def can_allocate(self, seq: Sequence, num_tokens: int, max_chunk: int | None = None) -> bool:
        """Whether allocate(seq, num_tokens) would succeed now. max_chunk (admission of a whole prompt that is
        prefilled in chunks of at most max_chunk tokens): a window group is counted for the blocks it holds at
        once (blocks_to_hold) rather than for num_tokens."""
        tables = self.match_groups(seq) if _is_first(seq) else [[] for _ in self.windows]
        return self._num_needed(seq, num_tokens, tables, max_chunk) <= len(self.free_queue)

    def _num_needed(self, seq: Sequence, num_tokens: int, hits: list[list[int]], max_chunk: int | None = None) -> int:
        n, needed = self.num_blocks_for(num_tokens), 0
        for window, table, hit in zip(self.windows, self._tables(seq), hits):
            new = max(n - len(table) - len(hit), 0)
            if window and max_chunk is not None:
                new = min(new, window_blocks(window, self.block_size, max_chunk))
            needed += new + sum(1 for b in hit if not self._is_null(b) and self.blocks[b].ref_count == 0)
        return needed

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make every table of seq cover num_tokens tokens in total. On the first allocation (no blocks,
        nothing computed) cached prefix blocks are reused first and seq.num_computed_tokens is set to
        the hit length (and num_cached_tokens, unless seq was preempted before). Returns False and
        changes nothing when there are not enough free blocks."""
        first = _is_first(seq)
        hits = self.match_groups(seq) if first else [[] for _ in self.windows]
        tables = self._tables(seq)
        if self._num_needed(seq, num_tokens, hits) > len(self.free_queue):
            return False
        if first:
            self._record_hit(seq, hits[0])
        n = self.num_blocks_for(num_tokens)
        for table, hit in zip(tables, hits):
            for block_id in hit:
                if not self._is_null(block_id):
                    self._incref(block_id)
            table.extend(hit)
            for _ in range(n - len(table)):
                table.append(self._pop_free())
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
            cache = self.hash_to_block_ids[block.group]
            if cache.get(block.hash) == block_id:
                del cache[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (tail first) and clear its block tables. Does not touch
        num_computed_tokens: the caller (Scheduler) resets it when it requeues the sequence."""
        tables = seq.block_tables
        for j in reversed(range(len(tables[0]))):
            for table in tables:
                if not self._is_null(table[j]):
                    self._decref(table[j])
        for table in tables:
            table.clear()

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share parent's full, computed blocks that lie inside child's tokens (n > 1 choices).

        NOTE: only FULL blocks are shared; the last partial block is recomputed by the child (it
        needs its own copy anyway once the choices diverge), and at least the child's last token is
        always recomputed so that its logits exist. A window group must still hold every block the child's
        first query sees (the parent, further along, may have released some): fewer blocks are shared then.
        child must hold no blocks yet."""
        assert not child.block_table and child.num_computed_tokens == 0
        limit = min(parent.num_computed_tokens, child.num_tokens - 1, parent.num_tokens)
        num_shared = 0
        for i in range(limit // self.block_size):
            lo, hi = i * self.block_size, (i + 1) * self.block_size
            if parent.token_ids[lo:hi] != child.token_ids[lo:hi]:
                break
            num_shared = i + 1
        while num_shared and any(self._is_null(b) for window, table in zip(self.windows, parent.block_tables)
                                 for b in table[self._first_needed(window, num_shared * self.block_size):num_shared]):
            num_shared -= 1
        for table, parent_table in zip(self._tables(child), parent.block_tables):
            for block_id in parent_table[:num_shared]:
                if not self._is_null(block_id):   # released out of the window: the child's too
                    self._incref(block_id)
            table.extend(parent_table[:num_shared])
        child.num_computed_tokens = num_shared * self.block_size
        child.num_cached_tokens = parent.num_cached_tokens

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Hash and register every block of seq that is full of computed tokens (call after a step).
        In each table the hashed blocks after the released ones form a prefix, so only the new tail is hashed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        hashes = self._hashes(seq, num_full)
        for g, table in enumerate(seq.block_tables):
            start = num_full
            while start > 0 and not self._is_null(table[start - 1]) and self.blocks[table[start - 1]].hash is None:
                start -= 1
            for i in range(start, num_full):
                block = self.blocks[table[i]]
                if block.hash is None:
                    block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                    block.hash, block.group = hashes[i], g
                    self.hash_to_block_ids[g].setdefault(block.hash, block.block_id)

    def check_integrity(self, live_seqs: Iterable[Sequence] = ()) -> None:
        """Raise AssertionError naming the first broken invariant. live_seqs must be every sequence
        that holds blocks (the scheduler's waiting + running)."""
        held: Counter[int] = Counter()
        for seq in live_seqs:
            if not any(seq.block_tables):
                continue
            assert len(seq.block_tables) == self.num_groups, f"seq {seq.seq_id}: {len(seq.block_tables)} tables"
            assert len({len(t) for t in seq.block_tables}) == 1, f"seq {seq.seq_id}: tables of different lengths"
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens, \
                f"seq {seq.seq_id}: {seq.num_computed_tokens} computed tokens but {len(seq.block_table)} blocks"
            for window, table in zip(self.windows, seq.block_tables):
                live = [b for b in table if not self._is_null(b)]
                needed = self._first_needed(window, seq.num_computed_tokens)
                assert all(not self._is_null(b) for b in table[needed:]), \
                    f"seq {seq.seq_id}: a block inside the window was released"
                held.update(live)
            all_live = [b for t in seq.block_tables for b in t if not self._is_null(b)]
            assert len(set(all_live)) == len(all_live), f"seq {seq.seq_id}: block twice in its tables"
        if self.reserve_null:
            null = self.blocks[NULL_BLOCK]
            assert null.ref_count == 0 and NULL_BLOCK not in self.free_queue and null.hash is None, "NULL_BLOCK in use"
        for block in self.blocks:
            if self._is_null(block.block_id):
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
        for g, cache in enumerate(self.hash_to_block_ids):
            for block_hash, block_id in cache.items():
                block = self.blocks[block_id]
                assert block.hash == block_hash and block.group == g, \
                    f"group {g}'s hash map points to block {block_id} with another hash or group"
