"""Sampler: logits + per-row SamplingParams -> token ids, vectorized over the batch.

Order of operations (vLLM's): grammar bitmask -> raw logprobs -> banned tokens -> penalties -> greedy argmax | temperature
-> top-k / top-p -> min-p -> exponential race. Greedy rows are an exact argmax. A row with its own
torch.Generator (request seed) draws its noise from it alone, so the same seed gives the same tokens
whatever the batch mates; other rows share the global RNG.

NOTE: logprobs are those of the RAW model distribution (log_softmax of the logits before penalties,
temperature and truncation), as vLLM v1 returns by default: they describe the model, not the sampler.
A constrained row's grammar mask comes first (as in vLLM v1, where the model runner applies it): a
token the grammar forbids is never sampled, never in top_logprobs, and the logprobs are those of the
model's distribution over what the grammar allows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import native
from protocol.types import SamplingParams
from server.grammar.bitmask import apply_bitmask

_MIN_TEMPERATURE = 1e-5   # below this a row is treated as greedy (logits / T would overflow)


@dataclass(slots=True)
class SamplingTensors:
    """Per-step sampling parameters as (B,) tensors, plus flags that let sample() skip work. Tensors a
    step does not read are None: the random-sampling ones when every row is greedy, the penalty ones
    when no row has a penalty (a greedy decode step builds no tensor at all)."""
    temperatures: torch.Tensor | None        # (B,) float32, 1.0 on greedy rows
    is_greedy: torch.Tensor | None           # (B,) bool
    top_k: torch.Tensor | None               # (B,) int64, 0 means off
    top_p: torch.Tensor | None               # (B,) float32
    min_p: torch.Tensor | None               # (B,) float32
    presence_penalties: torch.Tensor | None  # (B,) float32
    frequency_penalties: torch.Tensor | None  # (B,) float32
    repetition_penalties: torch.Tensor | None  # (B,) float32
    num_top_logprobs: list[int]       # per row, 0 when not asked
    all_greedy: bool
    any_penalties: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_logprobs: bool
    max_top_k: int = 0                # the largest top_k of any row, known on the host (no device read)

    @classmethod
    def build(cls, params_list: list[SamplingParams], device: torch.device | str) -> SamplingTensors:
        greedy = [p.temperature < _MIN_TEMPERATURE for p in params_list]
        top_k = [p.top_k if p.top_k > 0 else 0 for p in params_list]   # -1 and 0 both mean off
        all_greedy = all(greedy)
        any_penalties = any(p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1
                            for p in params_list)

        def f32(values: list[float]) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=torch.float32), device)

        random = None if all_greedy else (
            f32([1.0 if g else p.temperature for g, p in zip(greedy, params_list)]),
            to_device(torch.tensor(greedy, dtype=torch.bool), device),
            to_device(torch.tensor(top_k, dtype=torch.int64), device),
            f32([p.top_p for p in params_list]),
            f32([p.min_p for p in params_list]))
        penalties = None if not any_penalties else (
            f32([p.presence_penalty for p in params_list]),
            f32([p.frequency_penalty for p in params_list]),
            f32([p.repetition_penalty for p in params_list]))
        return cls(
            *(random or (None,) * 5), *(penalties or (None,) * 3),
            num_top_logprobs=[p.top_logprobs if p.logprobs else 0 for p in params_list],
            all_greedy=all_greedy,
            any_penalties=any_penalties,
            any_top_k=any(k > 0 for g, k in zip(greedy, top_k) if not g),
            any_top_p=any(p.top_p < 1 for g, p in zip(greedy, params_list) if not g),
            any_min_p=any(p.min_p > 0 for g, p in zip(greedy, params_list) if not g),
            any_logprobs=any(p.logprobs for p in params_list),
            max_top_k=max(top_k, default=0),
        )


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None                         # chosen token, per row (None: nobody asked)
    top_logprobs: list[list[tuple[int, float]]] | None   # per row, num_top_logprobs[row] best first


class Sampler:
    def sample(self, logits: torch.Tensor, tensors: SamplingTensors, output_token_ids: list[list[int]],
               prompt_token_ids: list[list[int]], generators: list[torch.Generator | None],
               banned_token_ids: list[list[int]] | None = None,
               grammar_mask: tuple[list[int], torch.Tensor] | None = None) -> SampleResult:
        """logits (B, V). banned_token_ids (optional, per row) are never sampled: the engine passes
        EOS and stop token ids for rows still below min_tokens. grammar_mask (rows, bitmask): bitmask
        row i says which tokens row rows[i] may take (server.grammar.bitmask); other rows are free."""
        logits = logits.float()
        if grammar_mask is not None and grammar_mask[0]:
            logits = apply_bitmask(logits, *grammar_mask)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if tensors.any_logprobs else None   # (B, V)
        if banned_token_ids is not None and any(banned_token_ids):
            logits = _ban(logits, banned_token_ids)
        if tensors.any_penalties:
            logits = apply_penalties(logits, tensors, output_token_ids, prompt_token_ids)
        if tensors.all_greedy:
            token_ids = argmax(logits)   # (B,)
        else:
            token_ids = self._sample_random(logits, tensors, generators)
        return _result(token_ids, raw_logprobs, tensors.num_top_logprobs)

    def _sample_random(self, logits: torch.Tensor, t: SamplingTensors,
                       generators: list[torch.Generator | None]) -> torch.Tensor:
        greedy_ids = argmax(logits)   # (B,)
        logits = logits / t.temperatures.unsqueeze(1)
        if t.any_top_k or t.any_top_p:
            logits = apply_top_k_top_p(logits, t.top_k if t.any_top_k else None, t.top_p if t.any_top_p else None,
                                       t.max_top_k)
        probs = torch.softmax(logits, dim=-1)   # (B, V)
        if t.any_min_p:
            probs = apply_min_p(probs, t.min_p)
        sampled_ids = inverse_cdf_sample(probs, generators)
        return torch.where(t.is_greedy, greedy_ids, sampled_ids)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`; to CUDA through pinned memory and a non-blocking copy, so building a step's
    sampling inputs never waits for the GPU (the caching host allocator keeps the pinned block until the
    copy is done)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B,) int64 row-wise argmax, as torch.argmax. On the CPU in fp32 it uses the C++ extension when
    the engine has loaded it: torch's CPU argmax is scalar (~58 us per 49152-entry row, ~0.5 ms at
    batch 16)."""
    ext = native.loaded() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    return ext.argmax_rows(logits) if ext is not None else logits.argmax(dim=-1)


def _ban(logits: torch.Tensor, banned_token_ids: list[list[int]]) -> torch.Tensor:
    rows = [r for r, ids in enumerate(banned_token_ids) for _ in ids]
    cols = [i for ids in banned_token_ids for i in ids]
    logits = logits.clone()
    logits[rows, cols] = float("-inf")
    return logits


def _token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(B, V) int counts of each token id per row."""
    max_len = max((len(ids) for ids in token_ids), default=0)
    padded = torch.full((len(token_ids), max_len), vocab_size, dtype=torch.int64)   # (B, L), pad = V
    for row, ids in enumerate(token_ids):
        padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.int64)   # (B, V + 1)
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return to_device(counts[:, :vocab_size], device)


def apply_penalties(logits: torch.Tensor, t: SamplingTensors, output_token_ids: list[list[int]],
                    prompt_token_ids: list[list[int]]) -> torch.Tensor:
    """Repetition penalty (HF: over prompt + output, divide positive logits, multiply negative ones);
    presence and frequency penalties (OpenAI: over output only, subtract)."""
    vocab_size = logits.shape[1]
    output_counts = _token_counts(output_token_ids, vocab_size, logits.device)   # (B, V)
    seen = (_token_counts(prompt_token_ids, vocab_size, logits.device) > 0) | (output_counts > 0)
    rep = t.repetition_penalties.unsqueeze(1)   # (B, 1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - t.frequency_penalties.unsqueeze(1) * output_counts
    return logits - t.presence_penalties.unsqueeze(1) * (output_counts > 0)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      max_k: int | None = None) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top_k (0 = off) and outside its top_p nucleus
    (the smallest set whose probability reaches top_p; the best token is always kept). Ties at the
    k-th value are kept. max_k: top_k's largest value when the caller knows it (no device read)."""
    vocab_size = logits.shape[1]
    if top_p is None:   # top-k alone: a partial topk is cheaper than a full sort
        k = top_k.clamp(min=1, max=vocab_size)   # (B,)
        num_best = int(k.max()) if max_k is None else min(max(max_k, 1), vocab_size)
        best = logits.topk(num_best, dim=-1).values   # (B, max_k)
        kth = best.gather(1, (k - 1).unsqueeze(1)).masked_fill((top_k <= 0).unsqueeze(1), float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)   # (B, V)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)   # (B,)
        kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))   # (B, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs   # (B, V) probability of strictly better tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens whose probability is below min_p times the row's best probability."""
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values   # (B, 1)
    return probs.masked_fill(probs < threshold, 0.0)


def inverse_cdf_sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One uniform draw per row, located in the row's cumulative distribution. probs (B, V) need not
    sum to 1 (top-k/p and min-p leave zeros). Seeded rows draw from their own generator, one number per
    step, independent of the batch.
    NOTE: replaces the exponential race argmax(p / E): on the CPU `exponential_` over (B, 49152) cost
    19 ms at B=16 and 76 ms at B=64 per step; this costs 0.5 and 2 ms."""
    cdf = probs.cumsum(dim=-1)                                   # (B, V)
    total = cdf[:, -1:]                                          # (B, 1)
    u = torch.empty_like(total)
    if any(gen is None for gen in generators):
        u.uniform_()                                             # the global RNG
    for row, gen in enumerate(generators):
        if gen is not None:
            u[row].uniform_(generator=gen)
    # u * total < total always (nextafter), and right=True skips zero-probability tokens: the chosen i
    # has cdf[i-1] <= u < cdf[i], so probs[i] > 0
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _result(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, num_top: list[int]) -> SampleResult:
    if raw_logprobs is None:
        return SampleResult(token_ids.tolist(), None, None)
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()   # (B,)
    max_top = max(num_top)
    top: list[list[tuple[int, float]]] = [[] for _ in num_top]
    if max_top > 0:
        values, ids = raw_logprobs.topk(max_top, dim=-1)   # (B, max_top)
        for row, (vals, row_ids) in enumerate(zip(values.tolist(), ids.tolist())):
            top[row] = list(zip(row_ids[:num_top[row]], vals[:num_top[row]]))
    return SampleResult(token_ids.tolist(), chosen, top)
