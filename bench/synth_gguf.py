"""Synthetic GGUF models: random weights in the shape of a real model, the default model's tokenizer.

Speed and memory of a model depend on its shape and quant type, not on its weights (FACTS.md, "Models
for speed and memory work"), so a random-weight file in the Llama-3.2-1B or Qwen2.5-1.5B shape
measures what the real one would, with noise for text. The writer streams tensor by tensor: an 8B
F16 file (15 GB) is written holding one tensor (at most vocab x hidden) in memory at a time.

The vocabulary is the default model's (tokenizer.* keys copied from its GGUF: 49,152 tokens), so the
embedding and LM head are smaller than the real models' (128,256 / 151,936 tokens).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STD = 0.02                 # std of the random normal weights; norms are 1, biases 0
_CHUNK = 1 << 24           # elements generated at a time (64 MiB of float32)


@dataclass(frozen=True, slots=True)
class Shape:
    name: str              # file stem, e.g. llama-3.2-1b
    arch: str              # GGUF general.architecture: llama | qwen2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5
    tied: bool = True      # no output.weight: the LM head is token_embd
    qkv_bias: bool = False
    context: int = 8192    # context_length written to the file (servers run -c 8192)
    head_size: int = 0     # attention.key_length where it is not hidden / heads (Qwen3)
    qk_norm: bool = False  # attn_q_norm / attn_k_norm per head (Qwen3)
    experts: int = 0       # routed experts per layer (0: dense), each expert_ffn wide, expert_used per token
    expert_used: int = 0
    expert_ffn: int = 0
    # DeepSeek (deepseek2): latent attention with a kv_lora-wide latent, rope_dim rotated dims, head_size the
    # non-rotated query/key dims, v_dim per head values; shared experts (each expert_ffn wide) in every MoE layer;
    # the first dense_layers layers dense (ffn wide)
    kv_lora: int = 0
    rope_dim: int = 0
    v_dim: int = 0
    shared_experts: int = 0
    dense_layers: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads


MODELS: dict[str, Shape] = {
    "1b": Shape("llama-3.2-1b", "llama", 2048, 16, 32, 8, 8192),
    "8b": Shape("llama-3.1-8b", "llama", 4096, 32, 32, 8, 14336, tied=False),
    "qwen": Shape("qwen2.5-1.5b", "qwen2", 1536, 28, 12, 2, 8960, rope_theta=1e6, rms_eps=1e-6,
                  qkv_bias=True),
    # Qwen3-30B-A3B's layer (128 experts of 768, 8 per token, head size 128, q/k norms) with 8 of its 48 layers:
    # the full model's F16 file (61 GB) does not fit this machine's disk; per-layer work, and so the speed ratio
    # of two servers, is the same at any depth
    "qwen3moe": Shape("qwen3-30b-a3b-8l", "qwen3moe", 2048, 8, 32, 4, 6144, rope_theta=1e6, rms_eps=1e-6,
                      tied=False, head_size=128, qk_norm=True, experts=128, expert_used=8, expert_ffn=768),
    # DeepSeek-V2-Lite's layers (latent attention: 16 heads, latent 512, 64 rotated + 128 other dims; 64 experts of
    # 1408, 6 per token, 2 shared; the first layer dense, 10944 wide) with 8 of its 27 layers, as llama.cpp's
    # converter writes them (attn_k_b / attn_v_b, head_count_kv 1: the latent rows are one KV head); without its
    # YaRN scaling, which changes no work
    "deepseek": Shape("deepseek-v2-lite-8l", "deepseek2", 2048, 8, 16, 1, 10944, rope_theta=10000.0, rms_eps=1e-6,
                      tied=False, head_size=128, experts=64, expert_used=6, expert_ffn=1408, kv_lora=512, rope_dim=64,
                      v_dim=128, shared_experts=2, dense_layers=1),
}


def tensor_specs(shape: Shape, vocab: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, numpy shape (rows, cols), kind) of every tensor; kind: weight | norm | bias.
    Shapes are PyTorch's (out_features, in_features); GGUF stores them reversed."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    yield "token_embd.weight", (vocab, h), "weight"
    for i in range(shape.layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (h,), "norm"
        if shape.kv_lora:
            yield from _mla_specs(shape, p)
            yield p + "ffn_norm.weight", (h,), "norm"
            if i < shape.dense_layers:
                yield from _dense_ffn_specs(shape, p, shape.ffn)
            else:
                yield from _expert_specs(shape, p)
                shared = shape.shared_experts * shape.expert_ffn
                yield p + "ffn_gate_shexp.weight", (shared, h), "weight"
                yield p + "ffn_up_shexp.weight", (shared, h), "weight"
                yield p + "ffn_down_shexp.weight", (h, shared), "weight"
            continue
        yield p + "attn_q.weight", (q, h), "weight"
        yield p + "attn_k.weight", (kv, h), "weight"
        yield p + "attn_v.weight", (kv, h), "weight"
        if shape.qkv_bias:
            yield p + "attn_q.bias", (q,), "bias"
            yield p + "attn_k.bias", (kv,), "bias"
            yield p + "attn_v.bias", (kv,), "bias"
        if shape.qk_norm:
            yield p + "attn_q_norm.weight", (shape.head_dim,), "norm"
            yield p + "attn_k_norm.weight", (shape.head_dim,), "norm"
        yield p + "attn_output.weight", (h, q), "weight"
        yield p + "ffn_norm.weight", (h,), "norm"
        if shape.experts:
            yield from _expert_specs(shape, p)
            continue
        yield from _dense_ffn_specs(shape, p, shape.ffn)
    yield "output_norm.weight", (h,), "norm"
    if not shape.tied:
        yield "output.weight", (vocab, h), "weight"


def _dense_ffn_specs(shape: Shape, p: str, ffn: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    h = shape.hidden
    yield p + "ffn_gate.weight", (ffn, h), "weight"
    yield p + "ffn_up.weight", (ffn, h), "weight"
    yield p + "ffn_down.weight", (h, ffn), "weight"


def _expert_specs(shape: Shape, p: str) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """llama.cpp's stacked experts: (experts, rows, cols); the router stays F32."""
    h, e, f = shape.hidden, shape.experts, shape.expert_ffn
    yield p + "ffn_gate_inp.weight", (e, h), "router"
    yield p + "ffn_gate_exps.weight", (e, f, h), "weight"
    yield p + "ffn_up_exps.weight", (e, f, h), "weight"
    yield p + "ffn_down_exps.weight", (e, h, f), "weight"


def _mla_specs(shape: Shape, p: str) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """DeepSeek's latent attention as llama.cpp's converter writes it (no query LoRA: V2-Lite): kv_b split into
    attn_k_b (heads, latent, nope) and attn_v_b (heads, v, latent)."""
    h, heads, nope = shape.hidden, shape.heads, shape.head_dim
    yield p + "attn_q.weight", (heads * (nope + shape.rope_dim), h), "weight"
    yield p + "attn_kv_a_mqa.weight", (shape.kv_lora + shape.rope_dim, h), "weight"
    yield p + "attn_kv_a_norm.weight", (shape.kv_lora,), "norm"
    yield p + "attn_k_b.weight", (heads, shape.kv_lora, nope), "weight"
    yield p + "attn_v_b.weight", (heads, shape.v_dim, shape.kv_lora), "weight"
    yield p + "attn_output.weight", (h, heads * shape.v_dim), "weight"


def _dtype(kind: str, weight_dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if kind in ("norm", "bias", "router") else weight_dtype


def file_bytes(shape: Shape, vocab: int, weight_dtype=np.float16) -> int:
    """Tensor data bytes of the file (the header and tokenizer add a few MB)."""
    return sum(int(np.prod(dims)) * _dtype(kind, np.dtype(weight_dtype)).itemsize
               for _, dims, kind in tensor_specs(shape, vocab))


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_kv(source: Path) -> dict[str, tuple[object, list[int]]]:
    """key -> (value, GGUF value types) of a little-endian GGUF v2/v3 file's metadata, read directly:
    gguf.GGUFReader takes seconds on a 49,152-token vocabulary (a numpy view per string)."""
    import struct

    with open(source, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ValueError(f"{source} is not a GGUF file")
        _, _, n_kv = struct.unpack_from("<IQQ", head, 4)
        data = f.read(64 << 20)     # the metadata of any model here fits (tokenizers are a few MB)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n:pos].decode("utf-8", "surrogateescape")

    def value(vtype: int):
        if vtype == 8:
            return string()
        return take(_SCALARS[vtype])

    out = {}
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        if vtype == 9:
            etype, count = take("<I"), take("<Q")
            if etype in _SCALARS and etype != 7:
                dtype = np.dtype(_SCALARS[etype])
                out[key] = (np.frombuffer(data, dtype, count, pos).tolist(), [9, etype])
                pos += dtype.itemsize * count
            else:
                out[key] = ([value(etype) for _ in range(count)], [9, etype])
        else:
            out[key] = (value(vtype), [vtype])
    return out


def tokenizer_fields(source: Path) -> list[tuple[str, object, list[int]]]:
    """(key, value, GGUF value types) of every tokenizer.* field of the source GGUF."""
    return [(k, v, types) for k, (v, types) in read_kv(source).items() if k.startswith("tokenizer.")]


def _random_tensor(rng: np.random.Generator, dims: tuple[int, ...], kind: str, dtype: np.dtype) -> np.ndarray:
    if kind == "norm":
        return np.ones(dims, dtype=dtype)
    if kind == "bias":
        return np.zeros(dims, dtype=dtype)
    out = np.empty(int(np.prod(dims)), dtype=dtype)
    scratch = np.empty(min(out.size, _CHUNK), dtype=np.float32)
    for start in range(0, out.size, _CHUNK):
        part = scratch[: min(_CHUNK, out.size - start)]
        rng.standard_normal(out=part, dtype=np.float32)
        part *= STD
        out[start:start + part.size] = part
    return out.reshape(dims)


def write_model(shape: Shape, path: Path, tokenizer_gguf: Path, weight_dtype=np.float16, seed: int = 0,
                log=print) -> Path:
    """Write a random-weight GGUF of `shape` to path (via path.partial, renamed when complete)."""
    import gguf

    weight_dtype = np.dtype(weight_dtype)
    fields = tokenizer_fields(tokenizer_gguf)
    vocab = next(len(v) for k, v, _ in fields if k == "tokenizer.ggml.tokens")
    specs = list(tensor_specs(shape, vocab))
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), shape.arch)
    writer.add_name(f"synthetic {shape.name} (random weights)")
    writer.add_type("model")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if weight_dtype == np.float16 else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    if not shape.kv_lora:
        writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(vocab)
    if shape.head_size and not shape.kv_lora:
        writer.add_key_length(shape.head_size)
        writer.add_value_length(shape.head_size)
    if shape.experts:
        writer.add_expert_count(shape.experts)
        writer.add_expert_used_count(shape.expert_used)
        writer.add_expert_feed_forward_length(shape.expert_ffn)
    if shape.kv_lora:   # the deepseek2 keys of llama.cpp's DeepseekV2Model converter (MLA as absorbed MQA)
        writer.add_leading_dense_block_count(shape.dense_layers)
        writer.add_kv_lora_rank(shape.kv_lora)
        writer.add_q_lora_rank(0)   # no query LoRA; llama.cpp infers that from 26/27 layers only, so say it
        writer.add_key_length(shape.kv_lora + shape.rope_dim)
        writer.add_value_length(shape.kv_lora)
        writer.add_key_length_mla(shape.head_dim + shape.rope_dim)
        writer.add_value_length_mla(shape.v_dim)
        writer.add_rope_dimension_count(shape.rope_dim)
        writer.add_expert_shared_count(shape.shared_experts)
        writer.add_expert_weights_scale(1.0)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    for key, value, types in fields:
        sub = gguf.GGUFValueType(types[1]) if len(types) > 1 else None
        writer.add_key_value(key, value, gguf.GGUFValueType(types[0]), sub_type=sub)
    for name, dims, kind in specs:
        dtype = _dtype(kind, weight_dtype)
        writer.add_tensor_info(name, dims, dtype, int(np.prod(dims)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.Generator(np.random.PCG64(seed))
    for index, (name, dims, kind) in enumerate(specs):
        writer.write_tensor_data(_random_tensor(rng, dims, kind, _dtype(kind, weight_dtype)))
        if log and (index + 1) % 50 == 0:
            log(f"  {shape.name}: {index + 1}/{len(specs)} tensors written")
    writer.close()
    os.replace(tmp, path)
    return path
