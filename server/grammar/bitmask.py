"""Token bitmasks in llguidance's layout: row r is vocab_size bits in int32 words, little-endian
(bit t % 32 of word t // 32 set = token t allowed). Only constrained rows of a batch have a row here.

apply_bitmask runs in the native extension when it is loaded (kernels/csrc/token_mask.cpp: a word of
all ones is skipped whole, ~0.1 ms for 16 rows of 49,152 tokens), else in torch (shift and mask).
"""
from __future__ import annotations

import torch

from kernels import native

_SHIFTS = torch.arange(32, dtype=torch.int32)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """(num_rows, ceil(vocab_size / 32)) int32, all tokens forbidden until a matcher fills a row."""
    return torch.zeros(num_rows, (vocab_size + 31) // 32, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 -> (R, vocab_size) bool; tokens past the mask's width are forbidden."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1                     # (R, W, 32)
    allowed = bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)
    return allowed


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Set to -inf, IN PLACE in logits (B, V), every token that bitmask row i forbids in row rows[i];
    the other rows are untouched (an unconstrained row pays nothing). Returns logits."""
    index = torch.tensor(rows, dtype=torch.long)
    ext = native.loaded() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if ext is not None and logits.is_contiguous():
        ext.apply_token_bitmask(logits, index, bitmask)
        return logits
    allowed = allowed_tokens(bitmask[:len(rows)], logits.shape[1]).to(logits.device)
    index = index.to(logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits
