"""Micro-benchmark: one decode forward of a SmolLM2-135M-sized random model (not a test).

    .venv/bin/python bench/kernels_micro.py [--threads N] [--context 256] [--iters 5]

Prints ms per decode step and tokens/s for batch 1 and 64, bf16 and fp32.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig

from kernels.metadata import build_metadata
from server.engine.models.llama import LlamaForCausalLM

BLOCK_SIZE = 16
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)


def random_model(dtype: torch.dtype) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    model = model.to(dtype=dtype).to_empty(device="cpu")
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.rebuild(dtype, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def decode_inputs(batch: int, context: int, num_layers: int, dtype: torch.dtype):
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    shape = (num_blocks, BLOCK_SIZE, 3, 64)
    caches = [(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
              for _ in range(num_layers)]
    order = torch.randperm(num_blocks - 1).tolist()
    tables = [order[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(batch)]
    slots = [t[(context - 1) // BLOCK_SIZE] * BLOCK_SIZE + (context - 1) % BLOCK_SIZE for t in tables]
    meta = build_metadata([1] * batch, [context] * batch, tables, slots, BLOCK_SIZE, "cpu")
    input_ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch,))
    positions = torch.full((batch,), context - 1, dtype=torch.int64)
    return input_ids, positions, caches, meta


def time_step(model, batch: int, context: int, dtype: torch.dtype, iters: int) -> float:
    input_ids, positions, caches, meta = decode_inputs(batch, context, len(model.model.layers), dtype)
    for _ in range(2):  # warmup
        model.compute_logits(model(input_ids, positions, caches, meta))
    start = time.perf_counter()
    for _ in range(iters):
        model.compute_logits(model(input_ids, positions, caches, meta))
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = random_model(dtype)
        for batch in map(int, args.batches.split(",")):
            seconds = time_step(model, batch, args.context, dtype, args.iters)
            print(f"{dtype_name:9s} batch {batch:3d} ctx {args.context}: {seconds * 1e3:8.1f} ms/step "
                  f"{batch / seconds:8.1f} tok/s  (threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
