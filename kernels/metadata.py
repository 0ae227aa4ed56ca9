"""AttentionMetadata: everything a paged-attention call needs about one flattened batch.

Built once per step by `build_metadata` and shared by every layer, so per-layer code never
creates index tensors or calls `.item()`.

Batch order (the runner's invariant): the first `num_decode_seqs` sequences have exactly one
query token each (the decode fast path); the rest are prefill / chunked-prefill rows of any
length, possibly with a cached prefix already in the paged cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(slots=True)
class PrefillSpan:
    """One prefill row: queries `q_start:q_end` of the flattened batch; `context_len` keys in cache."""
    q_start: int
    q_end: int
    context_len: int
    block_ids: Tensor  # (ceil(context_len / block_size),) int64, this row's blocks in order
    causal_mask: Tensor | None  # (q_len, context_len) bool, True = attend; None when no cached prefix

    @property
    def q_len(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_cached_tokens(self) -> int:
        return self.context_len - self.q_len


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs. `context_lens` counts tokens in the cache AFTER this step's
    tokens are stored (num_computed_before + num_new). `block_tables` is padded with 0."""
    cu_seqlens_q: Tensor  # (B+1,) int32
    context_lens: Tensor  # (B,) int32
    slot_mapping: Tensor  # (T,) int64, block_id * block_size + offset per new token
    block_tables: Tensor  # (B, max_blocks) int32
    max_seqlen_q: int
    max_context_len: int
    num_decode_seqs: int
    block_size: int = 16
    cu_seqlens_k: Tensor | None = None  # (B+1,) int32, cumsum of context_lens (flash varlen)
    # (context_lens, padded block tables) of the decode rows: decode_block_ids and decode_mask are built
    # from them on first use (the native C++ step never reads them)
    decode_rows: tuple[list[int], list[list[int]]] | None = None
    _decode_tensors: tuple[Tensor | None, Tensor | None] | None = None
    prefill_spans: list[PrefillSpan] = field(default_factory=list)
    _token_rows: Tensor | None = None
    # sliding-window masks built on first use and shared by every layer of the step (kernels.reference)
    window_masks: dict = field(default_factory=dict)

    @property
    def token_rows(self) -> Tensor:
        """(T,) int32: each query token's sequence (its row in block_tables). Built on first use (the
        native C++ step reads it)."""
        if self._token_rows is None:
            seqs = torch.arange(self.num_seqs, dtype=torch.int32, device=self.cu_seqlens_q.device)
            self._token_rows = (seqs if self.num_decode_seqs == self.num_seqs else
                                torch.repeat_interleave(seqs, self.cu_seqlens_q.diff()))
        return self._token_rows

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def decode_block_ids(self) -> Tensor | None:
        """(num_decode_seqs * num_decode_blocks,) int64: the blocks to gather for all decode rows."""
        return self._decode_helpers()[0]

    @property
    def decode_mask(self) -> Tensor | None:
        """(num_decode_seqs, 1, 1, num_decode_blocks * block_size) bool: valid key positions."""
        return self._decode_helpers()[1]

    def _decode_helpers(self) -> tuple[Tensor | None, Tensor | None]:
        if self._decode_tensors is None:
            lens, tables = self.decode_rows or ([], [])
            self._decode_tensors = _decode_helpers(lens, tables, self.block_size, self.context_lens.device)
        return self._decode_tensors


def build_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                   slot_mapping: list[int], block_size: int, device) -> AttentionMetadata:
    """Build metadata from plain lists (one entry per sequence, decode rows first)."""
    num_seqs = len(query_lens)
    assert len(context_lens) == num_seqs == len(block_tables)
    assert all(q <= c for q, c in zip(query_lens, context_lens)), "query longer than context"
    num_decode_seqs = _count_leading_decodes(query_lens)
    cu_q, cu_k = _cumsum(query_lens), _cumsum(context_lens)
    max_blocks = max((len(t) for t in block_tables), default=0)
    padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
    spans = [_prefill_span(cu_q[i], cu_q[i + 1], context_lens[i], block_tables[i], block_size, device)
             for i in range(num_decode_seqs, num_seqs)]
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(num_seqs, max_blocks),
        max_seqlen_q=max(query_lens, default=0),
        max_context_len=max(context_lens, default=0),
        num_decode_seqs=num_decode_seqs,
        block_size=block_size,
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        decode_rows=(context_lens[:num_decode_seqs], padded[:num_decode_seqs]),
        prefill_spans=spans,
    )


def _count_leading_decodes(query_lens: list[int]) -> int:
    n = 0
    while n < len(query_lens) and query_lens[n] == 1:
        n += 1
    return n


def _cumsum(values: list[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _decode_helpers(context_lens: list[int], block_tables: list[list[int]], block_size: int,
                    device) -> tuple[Tensor | None, Tensor | None]:
    """Block ids to gather for all decode rows at once, and the mask of valid key positions."""
    if not context_lens:
        return None, None
    num_blocks = -(-max(context_lens) // block_size)
    ids = torch.tensor([t[:num_blocks] for t in block_tables], dtype=torch.int64, device=device)
    lens = torch.tensor(context_lens, dtype=torch.int64, device=device)
    positions = torch.arange(num_blocks * block_size, device=device)  # (L,)
    mask = positions[None, :] < lens[:, None]  # (Bd, L)
    return ids.view(-1), mask[:, None, None, :]


def _prefill_span(q_start: int, q_end: int, context_len: int, block_table: list[int],
                  block_size: int, device) -> PrefillSpan:
    num_blocks = -(-context_len // block_size)
    assert len(block_table) >= num_blocks, "block table shorter than context"
    block_ids = torch.tensor(block_table[:num_blocks], dtype=torch.int64, device=device)
    q_len = q_end - q_start
    mask = None
    if q_len != context_len:
        # query i sits at absolute position (context_len - q_len + i): it sees keys 0..that position.
        q_pos = torch.arange(context_len - q_len, context_len, device=device)
        mask = torch.arange(context_len, device=device)[None, :] <= q_pos[:, None]  # (q_len, ctx)
    return PrefillSpan(q_start, q_end, context_len, block_ids, mask)
