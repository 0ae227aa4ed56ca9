"""CUDA graphs for decode steps: nano-vllm's capture with vLLM's padded batch sizes.

At start, one graph per size in capture_sizes(max_num_seqs) records a whole decode forward (every layer and
the logits) over static device buffers. A decode step of n sequences replays the graph of padded_size(n):
its inputs go from one pinned host staging area into those buffers with non-blocking copies, so the step
never waits for the GPU; the engine's first host synchronisation is reading the sampled ids. Padding rows
have slot PAD_SLOT (stored nowhere) and context 0 (attend to nothing); their logits are dropped.

Replay needs what the graphs froze: the Triton attention backend (its store skips PAD_SLOT; its decode grid
follows meta.max_context_len, fixed here at max_model_len) and layers that store through kernels.store_kv
(latent attention writes its cache itself). unsupported_reason() says why a runner stays eager.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

import kernels
from kernels.metadata import AttentionMetadata

log = logging.getLogger("berth.engine")

PAD_SLOT = -1


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8 below max_num_seqs, and max_num_seqs."""
    small = [s for s in (1, 2, 4) if s < max_num_seqs]
    return small + list(range(8, max_num_seqs, 8)) + [max_num_seqs]


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding num_seqs rows; None when no graph does (the step runs eagerly)."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if num_seqs > 0 and i < len(sizes) else None


@dataclass(slots=True)
class DecodeInputs:
    """One decode step as the runner builds it: one entry per sequence (block_tables: its blocks so far)."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]


@dataclass(slots=True)
class Staging:
    """Host (pinned on CUDA) or device buffers of the graph inputs, for max_num_seqs rows."""
    tokens: Tensor        # (3, S) int64: input ids, positions, slots
    context_lens: Tensor  # (S,) int32
    block_tables: Tensor  # (S, W) int32, W = blocks of a max_model_len context

    @classmethod
    def empty(cls, max_num_seqs: int, max_blocks: int, device, pin: bool = False) -> "Staging":
        def zeros(*shape, dtype):
            t = torch.zeros(*shape, dtype=dtype, device=device)
            return t.pin_memory() if pin else t
        return cls(zeros(3, max_num_seqs, dtype=torch.int64), zeros(max_num_seqs, dtype=torch.int32),
                   zeros(max_num_seqs, max_blocks, dtype=torch.int32))


def fill_staging(inputs: DecodeInputs, size: int, staging: Staging) -> None:
    """Write a step padded to `size` rows into the staging buffers. Rows past the inputs: id 0, position 0,
    slot PAD_SLOT, context 0. Table entries past a row's blocks keep stale values (never read)."""
    n = len(inputs.input_ids)
    assert n <= size <= staging.context_lens.shape[0], (n, size)
    staging.tokens[:, :n] = torch.tensor([inputs.input_ids, inputs.positions, inputs.slot_mapping],
                                         dtype=torch.int64)
    staging.tokens[:2, n:size] = 0
    staging.tokens[2, n:size] = PAD_SLOT
    staging.context_lens[:n] = torch.tensor(inputs.context_lens, dtype=torch.int32)
    staging.context_lens[n:size] = 0
    width = max(len(t) for t in inputs.block_tables)
    staging.block_tables[:n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in inputs.block_tables],
                                                    dtype=torch.int32)


def graph_metadata(inputs: Staging, cu_seqlens_q: Tensor, size: int, max_context_len: int,
                   block_size: int) -> AttentionMetadata:
    """Decode metadata over the first `size` rows of the buffers. max_context_len is an upper bound (the
    Triton decode grid is sized by it), so one graph serves every context length."""
    return AttentionMetadata(cu_seqlens_q=cu_seqlens_q[:size + 1], context_lens=inputs.context_lens[:size],
                             slot_mapping=inputs.tokens[2, :size], block_tables=inputs.block_tables[:size],
                             max_seqlen_q=1, max_context_len=max_context_len, num_decode_seqs=size,
                             block_size=block_size)


def unsupported_reason(model, device: torch.device) -> str | None:
    """Why decode steps of `model` on `device` cannot replay CUDA graphs, or None when they can."""
    if device.type != "cuda":
        return f"the device is {device.type}"
    if kernels.BACKEND != "triton":
        return f"the {kernels.BACKEND} attention backend (graphs pad with slot {PAD_SLOT}: Triton's store skips it)"
    from server.engine.models.mla import is_mla

    if is_mla(model.config):
        return "latent attention writes its cache itself (no padding slot)"
    return None


class CudaGraphs:
    """Captured decode graphs of one runner; run() replays the one a step fits."""

    def __init__(self, model, kv_caches: list[tuple[Tensor, Tensor]], device: torch.device, block_size: int,
                 max_num_seqs: int, max_model_len: int):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        max_blocks = -(-max_model_len // block_size)
        self.host = Staging.empty(max_num_seqs, max_blocks, "cpu", pin=True)
        self.device_inputs = Staging.empty(max_num_seqs, max_blocks, device)
        self.cu_seqlens_q = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)   # (S+1,)
        self.copied = torch.cuda.Event()       # the last step's host -> device copies
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: Tensor | None = None      # (S, V) float32, written by every graph
        self._pool = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest size first, every graph in one memory pool (nano-vllm). The padding-only inputs store
        nothing and read nothing, so capture leaves the KV cache untouched."""
        for size in reversed(self.sizes):
            meta = graph_metadata(self.device_inputs, self.cu_seqlens_q, size, self.max_model_len, self.block_size)
            tokens = self.device_inputs.tokens
            hidden = self.model(tokens[0, :size], tokens[1, :size], self.kv_caches, meta)   # warm-up: compiles
            logits = self.model.compute_logits(hidden)                                      # (size, V)
            if self.logits is None:
                self.logits = torch.empty(self.sizes[-1], logits.shape[1], dtype=logits.dtype, device=logits.device)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                hidden = self.model(tokens[0, :size], tokens[1, :size], self.kv_caches, meta)
                self.logits[:size] = self.model.compute_logits(hidden)
            self._pool = self._pool or graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def can_run(self, num_tokens: int, num_seqs: int, num_sampled: int) -> bool:
        """A pure decode step (one token per sequence, every one sampled) that a graph holds."""
        return num_tokens == num_seqs == num_sampled and padded_size(num_seqs, self.sizes) is not None

    def run(self, inputs: DecodeInputs) -> Tensor:
        """Replay the step; logits (n, V) float32, a view valid until the next run."""
        n = len(inputs.input_ids)
        size = padded_size(n, self.sizes)
        if not self.copied.query():        # the last copies still read the staging area: never so in the
            self.copied.synchronize()      # engine, which reads each step's sampled ids before the next
        fill_staging(inputs, size, self.host)
        d, h = self.device_inputs, self.host
        d.tokens.copy_(h.tokens, non_blocking=True)
        d.context_lens[:size].copy_(h.context_lens[:size], non_blocking=True)
        d.block_tables[:size].copy_(h.block_tables[:size], non_blocking=True)
        self.copied.record()
        self.graphs[size].replay()
        return self.logits[:n]


def capture(model, kv_caches: list[tuple[Tensor, Tensor]], device: torch.device, block_size: int,
            max_num_seqs: int, max_model_len: int) -> CudaGraphs | None:
    """Captured graphs for this runner, or None (logged) when it must stay eager."""
    reason = unsupported_reason(model, device)
    if reason is None:
        graphs = CudaGraphs(model, kv_caches, device, block_size, max_num_seqs, max_model_len)
        try:
            graphs.capture()
        except Exception as exc:  # noqa: BLE001 - any capture fault leaves the engine eager, never down
            reason = f"capture failed: {type(exc).__name__}: {exc}"
        else:
            log.info("CUDA graphs: decode steps of %s sequences", ", ".join(map(str, graphs.sizes)))
            return graphs
    log.info("CUDA graphs off: %s", reason)
    return None
