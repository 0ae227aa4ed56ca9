"""ModelRunner: owns the model, the paged KV tensors, device and dtype; one forward per step.

KV groups (models/arch.py's kv_groups; Gemma's local and global layers): slot i's K/V tensors serve layer i of
every group, and each group has its own block tables, so the step builds one AttentionMetadata per group and
hands the model one per layer."""
from __future__ import annotations

import torch

from kernels.metadata import build_metadata
from server.engine import cuda_graphs
from server.engine.models.arch import kv_groups, kv_layout
from server.engine.scheduler import SchedulerOutput, needs_sample


def kv_bytes_per_token(hf_config, dtype: torch.dtype, max_model_len: int | None = None) -> int:
    """Bytes per token of one pool block: the K/V rows of every slot (the layers of the largest KV group)."""
    kv_heads, head_dim, shared = kv_layout(hf_config)
    tensors = 1 if shared else 2
    slots = max(len(g.layers) for g in kv_groups(hf_config, max_model_len))
    return tensors * slots * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV cache. On the CPU through calloc (numpy): the pages stay untouched, so not resident,
    until a block is written: the pool's size costs address space, not RAM, until requests fill it. numpy
    advises huge pages (MADV_HUGEPAGE) for arrays of 4 MiB or more; not here: khugepaged would then fill whole
    2 MiB pages around the blocks written (64 blocks of a layer at once), in the background, on the CPUs the
    step needs (llama-3.2-1b Q8_0 served with numpy's advice off process-wide: peak RSS 1,639 -> 1,604 MiB, one
    probe run each)."""
    if device.type == "cpu" and dtype in (torch.float32, torch.float16):
        import numpy as np

        multiarray = getattr(np, "_core", getattr(np, "core", None)).multiarray
        advise = getattr(multiarray, "_set_madvise_hugepage", None)
        before = advise(False) if advise is not None else None
        try:
            return torch.from_numpy(np.zeros(shape, dtype=np.float32 if dtype == torch.float32 else np.float16))
        finally:
            if advise is not None:
                advise(before)
    return torch.zeros(shape, dtype=dtype, device=device)


class ModelRunner:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int, num_blocks: int,
                 max_model_len: int | None = None):
        cfg = model.config
        kv_heads, head_dim, shared = kv_layout(cfg)
        self.groups = kv_groups(cfg, max_model_len)
        self.group_windows = [g.window for g in self.groups]   # the BlockManager's windows
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)       # flash-attn paged layout
        # MLA (kv_layout shared): one latent row per token serves as key and value
        slots = [(k, k) if shared else (k, _zeros(shape, dtype, device))
                 for k in (_zeros(shape, dtype, device) for _ in range(max(len(g.layers) for g in self.groups)))]
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [slots[0]] * cfg.num_hidden_layers
        self.layer_groups = [0] * cfg.num_hidden_layers
        for group_index, group in enumerate(self.groups):
            for slot, layer in enumerate(group.layers):
                self.kv_caches[layer], self.layer_groups[layer] = slots[slot], group_index
        self.graphs = None   # server.engine.cuda_graphs.CudaGraphs once captured (CUDA only)

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Record decode steps as CUDA graphs when this runner can replay them (server/engine/cuda_graphs.py)."""
        if len(self.groups) > 1:   # NOTE: graphs are recorded with one block table per sequence
            cuda_graphs.log.info("CUDA graphs: off (the model's layers use %d KV groups)", len(self.groups))
            return
        self.graphs = cuda_graphs.capture(self.model, self.kv_caches, self.device, self.block_size, max_num_seqs,
                                          max_model_len)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Forward the whole batch; logits (S, V) float32 for the rows that sample, in batch order."""
        bs = self.block_size
        num_groups = len(self.groups)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mappings: list[list[int]] = [[] for _ in range(num_groups)]
        block_tables: list[list[list[int]]] = [[] for _ in range(num_groups)]
        query_lens, context_lens, sample_rows = [], [], []
        for s in out.scheduled:
            seq, start, end = s.seq, s.start, s.start + s.num_new_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            for g, table in enumerate(seq.block_tables):
                slot_mappings[g] += [table[p // bs] * bs + p % bs for p in range(start, end)]
                block_tables[g].append(table[:(end + bs - 1) // bs])
            query_lens.append(s.num_new_tokens)
            context_lens.append(end)
            if needs_sample(s):
                sample_rows.append(len(input_ids) - 1)
        if self.graphs is not None and self.graphs.can_run(len(input_ids), len(query_lens), len(sample_rows)):
            inputs = cuda_graphs.DecodeInputs(input_ids, positions, slot_mappings[0], context_lens, block_tables[0])
            return self.graphs.run(inputs)                                           # (B, V), replayed
        metas = [build_metadata(query_lens, context_lens, block_tables[g], slot_mappings[g], bs, self.device)
                 for g in range(num_groups)]
        meta = metas[0] if num_groups == 1 else [metas[g] for g in self.layer_groups]   # one per layer
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)          # (T,)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)          # (T,)
        hidden = self.model(ids, pos, self.kv_caches, meta)                          # (T, H)
        if not sample_rows:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        if len(sample_rows) == len(input_ids):                                       # e.g. pure decode
            return self.model.compute_logits(hidden)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))               # (S, V)
