"""BlockManager: allocation, ref counts, LRU eviction order, prefix hits, fork (no model, no torch)."""
import pytest

from protocol.types import SamplingParams
from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence

BS = 4


def make_seq(seq_id: int, token_ids: list[int], request_id: str | None = None) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=request_id or f"r{seq_id}", token_ids=list(token_ids),
                    num_prompt_tokens=len(token_ids), params=SamplingParams(), max_tokens=16)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """Pretend a step computed seq's tokens up to num_tokens."""
    assert bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.commit_full_blocks(seq)


def test_allocate_and_free_counts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(0, range(10))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    bm.check_integrity([seq])
    assert bm.allocate(seq, 13)            # grows by one block
    assert len(seq.block_table) == 4
    bm.check_integrity([seq])
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    bm.check_integrity([])


def test_allocate_fails_without_changing_anything():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a, b = make_seq(0, range(8)), make_seq(1, range(100, 108))
    assert bm.allocate(a, 8)
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.check_integrity([a, b])


def test_integrity_detects_broken_ref_count():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(0, range(4))
    bm.allocate(seq, 4)
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_integrity([])           # a live seq was not passed
    bm.blocks[seq.block_table[0]].ref_count = 2
    with pytest.raises(AssertionError, match="ref_count 2"):
        bm.check_integrity([seq])


def test_prefix_hit_across_two_sequences():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(0, [*range(12), 50, 51])          # 3 full blocks + 2 tokens
    compute(bm, a, a.num_tokens)
    b = make_seq(1, [*range(12), 60, 61, 62])      # same 3 full blocks, different tail
    assert bm.allocate(b, b.num_tokens)
    assert b.num_computed_tokens == 12 and b.num_cached_tokens == 12
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:3])
    assert bm.prefix_hit_stats.num_hit_tokens == 12 and bm.prefix_hit_stats.num_queries == 2
    bm.check_integrity([a, b])


def test_prefix_hit_never_covers_the_whole_prompt():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(0, range(8))                      # exactly 2 full blocks
    compute(bm, a, 8)
    b = make_seq(1, range(8))
    assert bm.allocate(b, 8)
    assert b.num_computed_tokens == 4              # the last block is recomputed: logits for token 7
    bm.check_integrity([a, b])


def test_divergent_prefix_stops_the_hit_chain():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(0, [*range(8), *range(20, 29)])
    compute(bm, a, a.num_tokens)
    b = make_seq(1, [0, 1, 2, 99, *range(4, 8), *range(20, 29)])   # differs in block 0
    bm.allocate(b, b.num_tokens)
    assert b.num_computed_tokens == 0              # chained hash: later equal blocks do not match


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(0, range(9))                      # 2 full blocks + 1 token
    compute(bm, a, 9)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_evictable_blocks == 2
    # unhashed tail block goes to the head; hashed blocks to the tail with the seq's tail first
    assert list(bm.free_queue)[:1] == [table[2]]
    assert list(bm.free_queue)[-2:] == [table[1], table[0]]
    bm.check_integrity([])
    b = make_seq(1, [*range(8), 77])               # revives both cached blocks
    assert bm.allocate(b, 9)
    assert b.block_table[:2] == table[:2] and b.num_computed_tokens == 8
    bm.check_integrity([b])


def test_eviction_takes_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = make_seq(0, range(4, 9)), make_seq(1, range(100, 105))
    compute(bm, a, 5)
    compute(bm, b, 5)
    a_block, b_block = a.block_table[0], b.block_table[0]
    bm.free(a)                                     # a's hashed block freed first: evicted first
    bm.free(b)
    c = make_seq(2, range(200, 212))
    assert bm.allocate(c, 12)                      # 3 blocks: 2 unhashed + the oldest cached one
    assert a_block in c.block_table and b_block not in c.block_table
    assert bm.blocks[b_block].hash is not None and bm.num_evictable_blocks == 1
    assert len(bm.hash_to_block_id) == 1
    bm.check_integrity([c])
    d = make_seq(3, range(4, 9))                   # a's prefix was evicted: no hit
    bm.allocate(d, 5)
    assert d.num_computed_tokens == 0
    bm.check_integrity([c, d])


def test_revived_evictable_blocks_count_against_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(0, range(9))
    compute(bm, a, 9)
    bm.free(a)
    b = make_seq(1, [*range(8), 5, 6, 7, 8, 9])    # hits 2 blocks, needs 2 more: 4 > 3
    assert not bm.can_allocate(b, b.num_tokens)
    assert not bm.allocate(b, b.num_tokens)
    assert b.num_computed_tokens == 0 and bm.num_evictable_blocks == 2
    bm.check_integrity([b])


def test_duplicate_blocks_keep_hash_map_consistent():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(0, range(6)), make_seq(1, range(6))
    assert bm.allocate(a, 6) and bm.allocate(b, 6)   # both miss: computed concurrently
    for seq in (a, b):
        seq.num_computed_tokens = 6
        bm.commit_full_blocks(seq)
    assert bm.blocks[a.block_table[0]].hash == bm.blocks[b.block_table[0]].hash
    bm.check_integrity([a, b])
    bm.free(a)
    bm.free(b)
    c = make_seq(2, range(100, 132))               # evicts everything
    assert bm.allocate(c, 32)
    assert bm.hash_to_block_id == {}
    bm.check_integrity([c])


def test_fork_shares_full_computed_blocks_only():
    bm = BlockManager(num_blocks=16, block_size=BS)
    parent = make_seq(0, range(10))
    compute(bm, parent, 10)
    child = make_seq(1, range(10), request_id="r0")
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    assert all(bm.blocks[i].ref_count == 2 for i in parent.block_table[:2])
    assert bm.allocate(child, 10)                  # its own partial block
    assert child.block_table[2] != parent.block_table[2]
    bm.check_integrity([parent, child])
    bm.free(parent)
    bm.free(child)
    bm.check_integrity([])


def test_no_prefix_caching():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(0, range(9))
    compute(bm, a, 9)
    b = make_seq(1, range(9))
    bm.allocate(b, 9)
    assert b.num_computed_tokens == 0 and bm.hash_to_block_id == {}
    bm.check_integrity([a, b])


def test_sliding_window_releases_the_blocks_no_query_can_see():
    """window 8, blocks of 4: after 20 computed tokens the next query (position 20) sees keys 13..20, so
    blocks 0-2 (positions 0-11) go back to the pool as NULL_BLOCK entries; they stay in the prefix cache."""
    from server.engine.block_manager import NULL_BLOCK

    bm = BlockManager(num_blocks=12, block_size=BS, window=8)
    assert bm.num_free_blocks == 11 and NULL_BLOCK not in bm.free_queue   # block 0 is reserved
    seq = make_seq(0, range(21))
    compute(bm, seq, 20)
    held = list(seq.block_table)
    assert bm.release_out_of_window(seq) == 3
    assert seq.block_table[:3] == [NULL_BLOCK] * 3 and seq.block_table[3:] == held[3:]
    assert bm.num_used_blocks == 2 and all(bm.blocks[b].ref_count == 0 for b in held[:3])
    bm.check_integrity([seq])
    assert bm.release_out_of_window(seq) == 0   # idempotent
    # another sequence with the same prefix hits the blocks its first query sees; the ones before are NULL_BLOCK
    other = make_seq(1, range(21))
    assert bm.match_prefix(other) == [NULL_BLOCK] * 3 + held[3:5]
    # the released sequence keeps growing and registering blocks while its hash chain holds
    seq.token_ids += [21, 22, 23, 24]
    compute(bm, seq, 24)
    bm.release_out_of_window(seq)
    bm.check_integrity([seq])
    child = make_seq(2, seq.token_ids[:25])
    bm.fork(seq, child)   # the child shares the live blocks; the released entries stay NULL
    assert child.block_table[:4] == [NULL_BLOCK] * 4
    bm.check_integrity([seq, child])
    bm.free(child)
    bm.free(seq)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 11
    bm.check_integrity([])


def test_no_window_keeps_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(0, range(21))
    compute(bm, seq, 20)
    assert bm.release_out_of_window(seq) == 0 and bm.num_used_blocks == 5 and bm.num_free_blocks == 3


def test_kv_groups_one_pool_one_table_each_and_only_the_window_groups_release():
    """A full-attention group and a window-8 group (Gemma's global and local layers): one pool, a table per group
    of the same length; after 20 tokens the local table keeps its last 2 blocks, the global one all 5."""
    from server.engine.block_manager import NULL_BLOCK

    bm = BlockManager(num_blocks=16, block_size=BS, windows=[None, 8])
    assert bm.num_groups == 2 and bm.num_usable_blocks == 15
    seq = make_seq(0, range(21))
    compute(bm, seq, 20)
    full, local = seq.block_tables
    assert len(full) == len(local) == 5 and not set(full) & set(local) and bm.num_used_blocks == 10
    bm.check_integrity([seq])
    assert bm.release_out_of_window(seq) == 3
    assert local[:3] == [NULL_BLOCK] * 3 and NULL_BLOCK not in full and bm.num_used_blocks == 7
    bm.check_integrity([seq])
    # decode: each new block costs one block per group, and the local group gives one back as it goes
    for n in range(21, 29):
        seq.token_ids.append(n)
        compute(bm, seq, n)
        bm.release_out_of_window(seq)
        bm.check_integrity([seq])
    assert len(full) == 7 and sum(b != NULL_BLOCK for b in local) == 2 and bm.num_used_blocks == 9
    bm.free(seq)
    assert seq.block_tables == [[], []] and bm.num_used_blocks == 0
    bm.check_integrity([])


def test_kv_groups_prefix_hit_needs_every_full_block_and_the_window_blocks_of_the_hit():
    """Prefix hits per group: the global group must have the whole prefix, the local group only the blocks the
    first recomputed query sees. When a local block it needs was evicted, the hit shrinks to where it holds."""
    from server.engine.block_manager import NULL_BLOCK

    bm = BlockManager(num_blocks=16, block_size=BS, windows=[None, 6])
    first = make_seq(0, range(25))
    compute(bm, first, 24)
    full, local = (list(t) for t in first.block_tables)
    assert bm.release_out_of_window(first) == 4
    bm.free(first)
    other = make_seq(1, list(range(25)) + [99])
    hit_full, hit_local = bm.match_groups(other)
    # 6 blocks hit; the query at 24 sees keys 19..24: blocks 4-5 of the local table, blocks 0-3 NULL
    assert hit_full == full[:6] and hit_local == [NULL_BLOCK] * 4 + local[4:6]
    # evict local block 5 (what the hit at 6 blocks needs): the hit falls back to 5 blocks, whose query (20)
    # sees keys 15..20: local blocks 3-4; block 3 was released early but keeps its hash, so it is still there
    bm.free_queue.move_to_end(local[5], last=False)   # next in line for eviction
    filler = make_seq(9, [5, 5])
    assert bm.allocate(filler, 2) and filler.block_table == [local[5]] and bm.blocks[local[5]].hash is None
    hit_full, hit_local = bm.match_groups(other)
    assert hit_full == full[:5] and hit_local == [NULL_BLOCK] * 3 + local[3:5]
    assert bm.allocate(other, 26) and other.num_computed_tokens == 20
    assert other.block_tables[0][:5] == full[:5] and other.block_tables[1][3:5] == local[3:5]
    bm.check_integrity([other, filler])


def test_window_group_capacity_counts_only_the_window():
    """blocks_to_hold: a window group holds at most the blocks a chunk's queries see; a long sequence of a
    windowed model fits a pool far smaller than its full context, and the scheduler admits it."""
    from server.engine.block_manager import blocks_to_hold
    from server.engine.scheduler import Scheduler

    assert blocks_to_hold([None], 4, 100, 8) == 25
    assert blocks_to_hold([6], 4, 100, 8) == 5               # ceil((6 - 1 + 8) / 4) + 1
    assert blocks_to_hold([None, 6, 6], 4, 100, 8) == 35
    assert blocks_to_hold([6], 4, 8, 8) == 2                 # never more than the sequence itself
    bm = BlockManager(num_blocks=8, block_size=BS, window=6)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=200)
    assert sched.can_ever_fit(100) and not Scheduler(BlockManager(8, BS), 2, 8, 200).can_ever_fit(100)
    assert bm.capacity_tokens(8, 200) == 200
    seq = make_seq(0, range(60))
    sched.add(seq)
    for _ in range(60):   # chunked prefill then decode: never more than 5 blocks held, never stuck
        out = sched.schedule()
        assert out.scheduled and not out.preempted
        sched.update(out, {seq.seq_id: 7})
        sched.check_integrity()
        assert bm.num_used_blocks <= 5
        if seq.num_tokens >= 100:
            break
    assert seq.num_tokens >= 70


def test_fork_shares_no_window_block_the_parent_released():
    """The parent is further along than the child's first query: with window 5 and blocks of 4, a parent at 24
    computed tokens has released blocks 0-4; a child sharing k blocks would start at 4k and need block k - 1,
    released for every k <= 5: it shares none and recomputes its prompt (before the fix it shared 5 blocks and
    attended to NULL_BLOCK)."""
    from server.engine.block_manager import NULL_BLOCK

    bm = BlockManager(num_blocks=16, block_size=BS, windows=[None, 5])
    parent = make_seq(0, range(26))
    compute(bm, parent, 24)
    bm.release_out_of_window(parent)
    assert parent.block_tables[1][:5] == [NULL_BLOCK] * 5
    child = make_seq(1, list(range(21)) + [77])   # 22 tokens: up to 5 full blocks in common
    bm.fork(parent, child)
    needed = max(0, child.num_computed_tokens - 5 + 1) // BS
    assert all(b != NULL_BLOCK for b in child.block_tables[1][needed:])
    assert child.num_computed_tokens == 0 and child.block_tables == [[], []]
    bm.check_integrity([parent, child])
