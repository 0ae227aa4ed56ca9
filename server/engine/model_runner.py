"""ModelRunner: owns the model, the paged KV tensors, device and dtype; one forward per step."""
from __future__ import annotations

import torch

from kernels.metadata import build_metadata
from server.engine import cuda_graphs
from server.engine.models.arch import kv_layout
from server.engine.scheduler import SchedulerOutput, needs_sample


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    kv_heads, head_dim, shared = kv_layout(hf_config)
    tensors = 1 if shared else 2
    return tensors * hf_config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV cache. On the CPU through calloc (numpy): the pages stay untouched, so not resident,
    until a block is written: the pool's size costs address space, not RAM, until requests fill it."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float16):
        import numpy as np

        return torch.from_numpy(np.zeros(shape, dtype=np.float32 if dtype == torch.float32 else np.float16))
    return torch.zeros(shape, dtype=dtype, device=device)


class ModelRunner:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int, num_blocks: int):
        cfg = model.config
        kv_heads, head_dim, shared = kv_layout(cfg)
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)       # flash-attn paged layout
        # MLA (kv_layout shared): one latent row per token serves as key and value
        self.kv_caches = [(k, k) if shared else (k, _zeros(shape, dtype, device))
                          for k in (_zeros(shape, dtype, device) for _ in range(cfg.num_hidden_layers))]
        self.graphs = None   # server.engine.cuda_graphs.CudaGraphs once captured (CUDA only)

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Record decode steps as CUDA graphs when this runner can replay them (server/engine/cuda_graphs.py)."""
        self.graphs = cuda_graphs.capture(self.model, self.kv_caches, self.device, self.block_size, max_num_seqs,
                                          max_model_len)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Forward the whole batch; logits (S, V) float32 for the rows that sample, in batch order."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_lens, context_lens, block_tables, sample_rows = [], [], [], []
        for s in out.scheduled:
            seq, start, end = s.seq, s.start, s.start + s.num_new_tokens
            table = seq.block_table
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slot_mapping += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(s.num_new_tokens)
            context_lens.append(end)
            block_tables.append(table[:(end + bs - 1) // bs])
            if needs_sample(s):
                sample_rows.append(len(input_ids) - 1)
        if self.graphs is not None and self.graphs.can_run(len(input_ids), len(query_lens), len(sample_rows)):
            inputs = cuda_graphs.DecodeInputs(input_ids, positions, slot_mapping, context_lens, block_tables)
            return self.graphs.run(inputs)                                           # (B, V), replayed
        meta = build_metadata(query_lens, context_lens, block_tables, slot_mapping, bs, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)          # (T,)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)          # (T,)
        hidden = self.model(ids, pos, self.kv_caches, meta)                          # (T, H)
        if not sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        if len(sample_rows) == len(input_ids):                                       # e.g. pure decode
            return self.model.compute_logits(hidden)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))               # (S, V)
