"""Sampler on hand-made logits (CPU)."""
import math

import pytest
import torch

from protocol.types import SamplingParams
from server.engine.sampler import (Sampler, SamplingTensors, apply_min_p, apply_penalties,
                                   apply_top_k_top_p)

V = 50


def sample(logits, params_list, outputs=None, prompts=None, generators=None, banned=None):
    b = len(params_list)
    tensors = SamplingTensors.build(params_list, "cpu")
    return Sampler().sample(logits, tensors, outputs or [[] for _ in range(b)], prompts or [[] for _ in range(b)],
                            generators or [None] * b, banned)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def logits():
    return torch.randn(4, V, generator=seeded(0)) * 3   # (B, V)


def test_greedy_is_argmax(logits):
    result = sample(logits, [SamplingParams(temperature=0.0)] * 4)
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs is None and result.top_logprobs is None


def test_greedy_rows_exact_in_a_mixed_batch(logits):
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 2
    for _ in range(5):
        ids = sample(logits, params).token_ids
        assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()


def test_top_k_one_equals_greedy(logits):
    ids = sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 4).token_ids
    assert ids == logits.argmax(-1).tolist()


def test_seed_reproducible_across_batch_composition(logits):
    params = SamplingParams(temperature=1.0, seed=7)
    gen_alone, gen_batched = seeded(7), seeded(7)
    alone = [sample(logits[1:2], [params], generators=[gen_alone]).token_ids[0] for _ in range(20)]
    mates = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0),
             SamplingParams(temperature=0.0)]
    batch = torch.stack([logits[0], logits[1], logits[3], logits[2]])   # the seeded row is row 1
    batched = [sample(batch, [mates[0], params, mates[1], mates[2]],
                      generators=[None, gen_batched, None, None]).token_ids[1] for _ in range(20)]
    assert alone == batched
    assert len(set(alone)) > 1   # it really samples


def test_unseeded_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).repeat(2000, 1)   # (2000, 4)
    torch.manual_seed(0)
    ids = torch.tensor(sample(logits, [SamplingParams(temperature=1.0)] * 2000).token_ids)
    freq = torch.bincount(ids, minlength=4).float() / 2000
    assert freq[3] == 0 and abs(freq[0] - 0.7) < 0.05 and abs(freq[2] - 0.1) < 0.03


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))   # (2, 4)
    masked = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.8]))
    assert torch.isinf(masked[0]).tolist() == [False, False, True, True]    # top_k = 2
    assert torch.isinf(masked[1]).tolist() == [False, False, True, True]    # 0.5 + 0.3 reaches 0.8
    only_k = apply_top_k_top_p(logits, torch.tensor([3, 1]), None)
    assert torch.isinf(only_k).sum(-1).tolist() == [1, 3]
    some_off = apply_top_k_top_p(logits, torch.tensor([0, 2]), None)   # 0 = off for that row
    assert torch.isinf(some_off).sum(-1).tolist() == [0, 2]
    top_p_small = apply_top_k_top_p(logits, None, torch.tensor([0.1, 0.5]))
    assert torch.isinf(top_p_small).sum(-1).tolist() == [3, 3]              # the best token always stays


def test_min_p_mask():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert (apply_min_p(probs, torch.tensor([0.4])) == 0).tolist() == [[False, False, True, True]]


def test_sampling_respects_masks():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(200, 1)
    ids = sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * 100 +
                 [SamplingParams(temperature=1.0, min_p=0.6)] * 100).token_ids
    assert set(ids[:100]) <= {0, 1} and set(ids[100:]) <= {0, 1}


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    t = SamplingTensors.build([SamplingParams(repetition_penalty=2.0)], "cpu")
    out = apply_penalties(logits, t, output_token_ids=[[1]], prompt_token_ids=[[0, 0]])
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5]]


def test_presence_and_frequency_penalties_openai_semantics():
    logits = torch.zeros(1, 5)
    t = SamplingTensors.build([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], "cpu")
    out = apply_penalties(logits, t, output_token_ids=[[2, 2, 3]], prompt_token_ids=[[4, 4]])
    assert out.tolist() == [[0.0, 0.0, -1.0, -0.75, 0.0]]   # prompt tokens are not penalized


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    assert sample(logits, [params], outputs=[[0]]).token_ids == [1]
    assert sample(logits, [SamplingParams(temperature=0.0)], outputs=[[0]]).token_ids == [0]


def test_banned_tokens_never_sampled(logits):
    best = logits[0].argmax().item()
    ids = sample(logits[:1], [SamplingParams(temperature=0.0)], banned=[[best]]).token_ids
    assert ids[0] != best


def test_logprobs_are_raw_model_logprobs(logits):
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=True)]
    result = sample(logits[:3], params)
    raw = torch.log_softmax(logits[:3], -1)
    for row, token_id in enumerate(result.token_ids):
        assert math.isclose(result.logprobs[row], raw[row, token_id].item(), rel_tol=1e-6)
    values, ids = raw[0].topk(3)
    assert [i for i, _ in result.top_logprobs[0]] == ids.tolist()
    assert [lp for _, lp in result.top_logprobs[0]] == pytest.approx(values.tolist())
    assert result.top_logprobs[1] == [] and result.top_logprobs[2] == []


def test_build_flags():
    t = SamplingTensors.build([SamplingParams(temperature=0.0, top_k=5), SamplingParams(top_k=-1)], "cpu")
    assert not t.all_greedy and not t.any_top_k and not t.any_top_p and not t.any_penalties
    assert t.top_k.tolist() == [5, 0] and t.temperatures.tolist() == [1.0, 1.0]
    greedy = SamplingTensors.build([SamplingParams(temperature=1e-9), SamplingParams(temperature=0.0)], "cpu")
    assert greedy.all_greedy and greedy.temperatures is None and greedy.presence_penalties is None
    assert t.presence_penalties is None   # no penalty anywhere: nothing to build


def test_inverse_cdf_never_picks_a_zero_probability_token_and_needs_no_normalization():
    from server.engine.sampler import inverse_cdf_sample

    torch.manual_seed(1)
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.25, 0.0, 0.25]]).repeat(3000, 1)   # row 2 sums to 0.5
    ids = inverse_cdf_sample(probs, [None] * 6000)
    assert set(ids[0::2].tolist()) == {2}
    assert set(ids[1::2].tolist()) == {1, 3} and abs((ids[1::2] == 1).float().mean() - 0.5) < 0.03
    edge = torch.tensor([[0.0, 1.0, 0.0]])
    gen = seeded(3)
    assert all(inverse_cdf_sample(edge, [gen]).item() == 1 for _ in range(200))
