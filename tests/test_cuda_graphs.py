"""server/engine/cuda_graphs on the CPU: batch sizes, padding, the staging buffers, when graphs are refused,
and the ModelRunner hook (a stand-in that runs the padded step eagerly). The capture itself: tests/gpu."""
from __future__ import annotations

import types

import pytest
import torch

import kernels
from kernels.metadata import build_metadata
from server.engine import cuda_graphs
from server.engine.cuda_graphs import (PAD_SLOT, DecodeInputs, Staging, capture_sizes, fill_staging, graph_metadata,
                                       padded_size, unsupported_reason)


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(64) == [1, 2, 4] + list(range(8, 65, 8))
    assert capture_sizes(256)[-3:] == [240, 248, 256] and len(capture_sizes(256)) == 35


@pytest.mark.parametrize("num_seqs,expected", [(1, 1), (3, 4), (4, 4), (5, 8), (9, 16), (17, 20), (20, 20),
                                               (21, None), (0, None)])
def test_padded_size_is_the_smallest_captured_size_that_holds_the_batch(num_seqs, expected):
    assert padded_size(num_seqs, capture_sizes(20)) == expected


def test_fill_staging_pads_rows_that_store_and_read_nothing():
    staging = Staging.empty(8, 6, "cpu")
    staging.block_tables.fill_(77)   # stale entries of an earlier step
    inputs = DecodeInputs(input_ids=[5, 6, 7], positions=[16, 3, 40], slot_mapping=[208, 51, 104],
                          context_lens=[17, 4, 41], block_tables=[[9, 13], [3], [2, 5, 6]])
    fill_staging(inputs, 4, staging)
    assert staging.tokens[:, :4].tolist() == [[5, 6, 7, 0], [16, 3, 40, 0], [208, 51, 104, PAD_SLOT]]
    assert staging.context_lens[:4].tolist() == [17, 4, 41, 0]
    assert staging.block_tables[:3, :3].tolist() == [[9, 13, 0], [3, 0, 0], [2, 5, 6]]
    assert staging.block_tables[0, 3:].tolist() == [77, 77, 77]     # past a row's blocks: never read
    meta = graph_metadata(staging, torch.arange(9, dtype=torch.int32), 4, max_context_len=96, block_size=16)
    assert (meta.num_decode_seqs, meta.num_seqs, meta.max_seqlen_q, meta.max_context_len) == (4, 4, 1, 96)
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4] and meta.slot_mapping.tolist() == [208, 51, 104, -1]
    assert meta.block_tables.shape == (4, 6) and meta.context_lens.dtype == torch.int32
    fill_staging(DecodeInputs([1], [0], [3], [1], [[0]]), 1, staging)   # a smaller step after a larger one
    assert staging.tokens[:, :1].tolist() == [[1], [0], [3]] and staging.context_lens[0] == 1


def tiny_model(model_type="llama", kv_lora_rank=None):
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type, kv_lora_rank=kv_lora_rank))


def test_graphs_need_cuda_the_triton_backend_and_cache_stores_through_kernels(monkeypatch):
    cuda = torch.device("cuda")
    assert "cpu" in unsupported_reason(tiny_model(), torch.device("cpu"))
    monkeypatch.setattr(kernels, "BACKEND", "flash")
    assert "flash" in unsupported_reason(tiny_model(), cuda)
    monkeypatch.setattr(kernels, "BACKEND", "triton")
    assert unsupported_reason(tiny_model(), cuda) is None
    assert "latent" in unsupported_reason(tiny_model("deepseek_v3", 512), cuda)


def test_capture_on_the_cpu_leaves_the_runner_eager():
    assert cuda_graphs.capture(tiny_model(), [], torch.device("cpu"), 16, 8, 128) is None


class EagerGraphs:
    """Stands in for CudaGraphs: the runner's hand-over (DecodeInputs), padded through fill_staging and
    graph_metadata as a replay would be, run eagerly with the reference kernels on the unpadded rows."""

    def __init__(self, runner, sizes):
        self.runner, self.sizes, self.steps = runner, sizes, []

    def can_run(self, num_tokens, num_seqs, num_sampled):
        return num_tokens == num_seqs == num_sampled and padded_size(num_seqs, self.sizes) is not None

    def run(self, inputs: DecodeInputs):
        n, size = len(inputs.input_ids), padded_size(len(inputs.input_ids), self.sizes)
        self.steps.append((n, size))
        staging = Staging.empty(self.sizes[-1], 64, "cpu")
        fill_staging(inputs, size, staging)
        assert staging.tokens[2, n:size].eq(PAD_SLOT).all() and staging.context_lens[n:size].eq(0).all()
        tables = [staging.block_tables[i, :-(-inputs.context_lens[i] // self.runner.block_size)].tolist()
                  for i in range(n)]
        meta = build_metadata([1] * n, staging.context_lens[:n].tolist(), tables, staging.tokens[2, :n].tolist(),
                              self.runner.block_size, "cpu")
        hidden = self.runner.model(staging.tokens[0, :n], staging.tokens[1, :n], self.runner.kv_caches, meta)
        return self.runner.model.compute_logits(hidden)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from bench.random_model import TINY_LLAMA, write_random_model

    return str(write_random_model(tmp_path_factory.mktemp("tiny"), TINY_LLAMA, "float32"))


def generate(engine, prompts, max_tokens=6):
    from protocol.types import GenerateRequest, SamplingParams, TokenDelta

    for i, ids in enumerate(prompts):
        engine.add(GenerateRequest(f"r{i}", SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                   prompt_token_ids=ids))
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for rid, ev in engine.step():
            if isinstance(ev, TokenDelta):
                tokens[rid] += ev.token_ids
    return tokens


def test_runner_hands_decode_steps_to_the_graphs(tiny_folder):
    from server.config import EngineConfig
    from server.engine.engine import Engine

    config = EngineConfig(kv_cache_gib=0.01, max_model_len=128, max_num_seqs=8)
    engine = Engine.from_folder(tiny_folder, config, torch.device("cpu"), torch.float32)
    prompts = [[5, 9, 77, 3, 120, 4, 4, 18, 30, 31, 32, 33, 34, 35, 36, 37, 38], [7, 8], [300, 301, 302, 1, 2]]
    eager = generate(engine, prompts)
    engine.runner.graphs = graphs = EagerGraphs(engine.runner, capture_sizes(config.max_num_seqs))
    assert generate(engine, prompts) == eager
    assert graphs.steps and all(size in (1, 2, 4) for _, size in graphs.steps) and (3, 4) in graphs.steps
