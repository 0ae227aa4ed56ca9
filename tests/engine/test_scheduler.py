"""Scheduler with no model (after vLLM's tests/v1/core/test_scheduler.py): sampled ids are written by
hand or derived from (seq_id, position), and check_integrity() runs after every step."""
import random
import time

from protocol.types import SamplingParams
from server.engine.block_manager import BlockManager
from server.engine.scheduler import Scheduler, SchedulerOutput, needs_sample
from server.engine.sequence import Sequence, SequenceStatus

BS = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                   enable_prefix_caching=True) -> Scheduler:
    bm = BlockManager(num_blocks, BS, enable_prefix_caching)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len)


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 4, base: int | None = None,
             request_id: str | None = None) -> Sequence:
    start = 1000 * seq_id if base is None else base
    return Sequence(seq_id=seq_id, request_id=request_id or f"r{seq_id}",
                    token_ids=list(range(start, start + prompt_len)), num_prompt_tokens=prompt_len,
                    params=SamplingParams(), max_tokens=max_tokens)


def token_for(seq: Sequence) -> int:
    """The 'model': the next token depends only on the sequence and the position."""
    return (seq.seq_id * 31 + seq.num_tokens * 7) % 997


def step(sched: Scheduler) -> SchedulerOutput:
    """schedule -> fake forward -> update -> finish at max_tokens -> integrity."""
    out = sched.schedule()
    sampled = {s.seq.seq_id: token_for(s.seq) for s in out.scheduled if needs_sample(s)}
    sched.update(out, sampled)
    for s in out.scheduled:
        if s.seq.status is SequenceStatus.RUNNING and s.seq.num_output_tokens >= s.seq.max_tokens:
            sched.finish(s.seq)
    sched.check_integrity()
    return out


def expected_output(seq_id: int, prompt_len: int, max_tokens: int) -> list[int]:
    seq = make_seq(seq_id, prompt_len)
    for _ in range(max_tokens):
        seq.token_ids.append(token_for(seq))
    return seq.output_token_ids


def rows(out: SchedulerOutput) -> list[tuple[int, int, int]]:
    return [(s.seq.seq_id, s.start, s.num_new_tokens) for s in out.scheduled]


def test_chunked_prefill_under_small_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(0, 20, max_tokens=2)
    sched.add(seq)
    assert rows(step(sched)) == [(0, 0, 8)] and seq.num_output_tokens == 0
    assert rows(step(sched)) == [(0, 8, 8)] and seq.num_output_tokens == 0
    assert rows(step(sched)) == [(0, 16, 4)] and seq.num_output_tokens == 1
    assert rows(step(sched)) == [(0, 20, 1)] and seq.is_finished
    assert seq.output_token_ids == expected_output(0, 20, 2)
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 64


def test_decode_rows_first_and_budget_shared():
    sched = make_scheduler(max_num_batched_tokens=10)
    a, b, c = make_seq(0, 12, max_tokens=8), make_seq(1, 3, max_tokens=8), make_seq(2, 30, max_tokens=8)
    sched.add(a)
    sched.add(b)
    assert rows(step(sched)) == [(0, 0, 10)]                 # a takes the whole budget
    out = step(sched)                                       # a finishes its prompt, b gets its prompt
    assert rows(out) == [(0, 10, 2), (1, 0, 3)] and out.num_decode == 0
    sched.add(c)
    out = step(sched)
    assert rows(out) == [(0, 12, 1), (1, 3, 1), (2, 0, 8)] and out.num_decode == 2
    out = step(sched)                                       # running prefill c is behind the decodes
    assert rows(out) == [(0, 13, 1), (1, 4, 1), (2, 8, 8)] and out.num_decode == 2


def test_single_token_prefill_chunk_counts_as_decode_row_but_is_not_sampled():
    sched = make_scheduler(max_num_batched_tokens=5)
    a, b = make_seq(0, 4), make_seq(1, 9)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert rows(out) == [(1, 0, 1), (0, 0, 4)] and out.num_decode == 1
    assert [needs_sample(s) for s in out.scheduled] == [False, True]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(i, 4, max_tokens=3) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    out = step(sched)
    assert [s.seq.seq_id for s in out.scheduled] == [0, 1] and sched.num_waiting == 1
    while sched.has_unfinished():
        assert sched.num_running <= 2
        step(sched)
    assert [s.output_token_ids for s in seqs] == [expected_output(i, 4, 3) for i in range(3)]


def test_queue_time_is_the_wait_until_first_admission():
    sched = make_scheduler(max_num_seqs=1)
    first, second = make_seq(0, 4, max_tokens=2), make_seq(1, 4, max_tokens=2)
    for seq in (first, second):
        sched.add(seq)
        seq.arrival = time.monotonic()
    step(sched)
    assert first.queue_time is not None and second.queue_time is None     # still waiting
    time.sleep(0.05)
    while sched.has_unfinished():
        step(sched)
    assert second.queue_time >= 0.05 > first.queue_time >= 0


def test_fcfs_head_of_queue_is_not_skipped():
    sched = make_scheduler(num_blocks=6)
    a = make_seq(0, 12, max_tokens=4)                       # 3 blocks now, 4 at the end
    big, small = make_seq(1, 16, max_tokens=1), make_seq(2, 2, max_tokens=1)
    sched.add(a)
    step(sched)
    sched.add(big)                                          # needs 4 blocks, 3 free: waits
    sched.add(small)                                        # would fit, but must not jump the queue
    out = step(sched)
    assert rows(out) == [(0, 12, 1)] and [s.seq_id for s in sched.waiting] == [1, 2]
    while sched.has_unfinished():
        step(sched)
    assert big.output_token_ids == expected_output(1, 16, 1)


def test_preemption_newest_first_nothing_lost():
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    seqs = [make_seq(i, 7, max_tokens=10) for i in range(3)]   # 2 blocks each, 5 at the end
    for seq in seqs:
        sched.add(seq)
    preempted: list[int] = []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out = step(sched)
        if out.preempted:
            newest = max(s.seq_id for s in sched.running + out.preempted)
            assert out.preempted[0].seq_id == newest
            assert all(s.num_computed_tokens == 0 and not s.block_table for s in out.preempted)
            assert sched.waiting[0] is out.preempted[-1]
        preempted += [s.seq_id for s in out.preempted]
    assert not sched.has_unfinished() and sched.num_preemptions == len(preempted) > 0
    assert preempted[0] == 2
    for i, seq in enumerate(seqs):
        assert seq.is_finished and seq.output_token_ids == expected_output(i, 7, 10)
    assert sched.block_manager.num_free_blocks == 8


def test_preempted_sequence_recomputes_prompt_and_outputs():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    a, b = make_seq(0, 6, max_tokens=6), make_seq(1, 5, max_tokens=4)
    sched.add(a)
    sched.add(b)
    out = step(sched)                                        # 2 blocks each: the pool is full
    while not out.preempted:
        out = step(sched)
    assert a.num_computed_tokens == 9 and a.num_tokens == 10  # a needed a 3rd block: b was preempted
    assert [s.seq_id for s in out.preempted] == [1] and b.num_output_tokens == 3
    assert b.status is SequenceStatus.WAITING and rows(out) == [(0, 8, 1)]
    first_admitted = b.first_scheduled
    while b.status is SequenceStatus.WAITING:
        step(sched)
    assert b.num_preemptions == 1 and b.first_scheduled == first_admitted   # queue time is the first wait
    while sched.has_unfinished():
        step(sched)
    assert a.output_token_ids == expected_output(0, 6, 6) and b.output_token_ids == expected_output(1, 5, 4)


def test_abort_waiting_running_and_mid_prefill_frees_everything():
    sched = make_scheduler(num_blocks=16, max_num_seqs=2, max_num_batched_tokens=8)
    decoding, prefilling, waiting = make_seq(0, 3, max_tokens=50), make_seq(1, 20), make_seq(2, 4)
    for seq in (decoding, prefilling, waiting):
        sched.add(seq)
    step(sched)
    step(sched)
    assert decoding.num_output_tokens > 0 and 0 < prefilling.num_computed_tokens < 20
    assert waiting.status is SequenceStatus.WAITING
    for seq in (prefilling, waiting, decoding):
        assert sched.abort(seq.request_id) == [seq]
        assert seq.is_finished and seq.block_table == []
        sched.check_integrity()
    assert sched.abort("unknown") == [] and not sched.has_unfinished()
    bm = sched.block_manager
    assert bm.num_free_blocks == 16 and bm.num_used_blocks == 0


def test_abort_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    a, b = make_seq(0, 5), make_seq(1, 5)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.abort("r0")
    sched.update(out, {0: 7, 1: 8})
    assert a.num_output_tokens == 0 and b.output_token_ids == [8]
    sched.check_integrity()


def test_abort_returns_every_choice_of_a_request():
    sched = make_scheduler()
    choices = [make_seq(i, 5, request_id="req") for i in range(3)]
    for seq in choices:
        sched.add(seq)
    step(sched)
    assert set(map(id, sched.abort("req"))) == set(map(id, choices))
    sched.check_integrity()


def test_prefix_cache_hit_skips_cached_tokens():
    sched = make_scheduler()
    a = make_seq(0, 10, max_tokens=1, base=0)
    sched.add(a)
    while sched.has_unfinished():
        step(sched)
    b = make_seq(1, 14, max_tokens=1, base=0)               # shares a's 8-token (2-block) prefix
    sched.add(b)
    assert rows(step(sched)) == [(1, 8, 6)]
    assert b.num_cached_tokens == 8 and b.output_token_ids == expected_output(1, 14, 1)


def test_can_ever_fit():
    sched = make_scheduler(num_blocks=4, max_model_len=32)
    assert sched.can_ever_fit(16) and not sched.can_ever_fit(17)
    big = make_scheduler(num_blocks=64, max_model_len=32)
    assert big.can_ever_fit(32) and not big.can_ever_fit(33)


def test_randomized_against_integrity():
    rng = random.Random(1234)
    for trial in range(12):
        sched = make_scheduler(num_blocks=rng.choice([8, 10, 16]), max_num_seqs=rng.choice([2, 4, 8]),
                               max_num_batched_tokens=rng.choice([4, 9, 32]), max_model_len=32,
                               enable_prefix_caching=trial % 2 == 0)
        seqs: list[Sequence] = []
        for _ in range(300):
            action = rng.random()
            if action < 0.25 and len(seqs) < 40:
                seq = make_seq(len(seqs), rng.randint(1, 20), rng.randint(1, 12), base=rng.choice([0, 500]))
                if sched.can_ever_fit(seq.num_prompt_tokens + seq.max_tokens):
                    sched.add(seq)
                    seqs.append(seq)
            elif action < 0.3 and seqs:
                sched.abort(rng.choice(seqs).request_id)
                sched.check_integrity()
            else:
                step(sched)
        for _ in range(500):
            if not sched.has_unfinished():
                break
            step(sched)
        assert not sched.has_unfinished()
        assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
        for seq in seqs:
            assert seq.is_finished
            if seq.num_output_tokens == seq.max_tokens:   # not aborted: exact tokens
                assert seq.output_token_ids == expected_output(seq.seq_id, seq.num_prompt_tokens,
                                                               seq.max_tokens)
