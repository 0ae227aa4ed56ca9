"""Serve a GGUF file as it is: memory-mapped, each tensor kept in (or next to) its own quant type.

    folder = write_sidecar(gguf_path, folder)          # config.json + tokenizer files + model.gguf link, once
    model = build_gguf_model(folder, device, max_positions)

The sidecar folder holds only metadata (config from the GGUF header, the tokenizer transformers builds
from the GGUF's tokenizer.* fields, the chat template) and a `model.gguf` link to the file, so the rest
of berth (Tokenizer, AutoConfig, the factory) reads it like any Hugging Face folder; no weight is ever
written out. The weights go tensor by tensor from the memory-mapped file into the native kernels'
layouts (kernels/gguf_repack.py says which type goes where); norms stay fp32, float tensors keep their
dtype, the embedding table stays in the file's type and is dequantised per looked-up row (a tied model's from
its output layer's layout where that holds the file's values exactly: GgufEmbedding).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kernels.gguf_repack import (FLOAT_TYPES, NATIVE_TYPES, NativeQ4, dequantize, dequantize_rows, q4_rows, q8_rows,
                                 repack, target_of)
from kernels.quant import NATIVE_MAX_K, Q8Weight

log = logging.getLogger("berth.engine")

GGUF_LINK = "model.gguf"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                 "deepseek2": "DeepseekV2ForCausalLM"}
# GGUF architecture -> transformers model_type, where they differ (a llama file with experts is Mixtral)
MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# llama.cpp's sliding-window layer patterns (llama-model.cpp set_swa_pattern: layer i is local unless
# i % n == n - 1), used when the file has no attention.sliding_window_pattern
GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
# llama.cpp's f_attention_scale: the 27B models scale by hidden / heads, the others by head_dim (the
# query_pre_attn_scalar of their HF configs); recognised, as llama.cpp does, by their layer count
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Phi-3's LongRoPE factors: small F32 tensors in the file, moved into config.json's rope_scaling
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}


class GgufError(ValueError):
    """A GGUF berth cannot serve natively: one line naming the architecture, tensor or type."""


def gguf_of(folder: str | Path) -> Path | None:
    path = Path(folder) / GGUF_LINK
    return path if path.exists() else None


# ---- metadata -> config.json -------------------------------------------------------------------

def read_metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.bos_token_id",
                                                               "tokenizer.ggml.eos_token_id",
                                                               "tokenizer.ggml.eot_token_id"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - an odd field we do not need
            continue
    out["_vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    for tensor in reader.tensors:
        if tensor.name in ROPE_FACTOR_TENSORS:
            values = np.asarray(tensor.data, np.float32).reshape(-1)
            out[f"_{ROPE_FACTOR_TENSORS[tensor.name]}"] = [float(x) for x in values]
    return out


def config_from_metadata(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GgufError(f"GGUF architecture {arch!r} is not served natively (supported: {', '.join(ARCHITECTURES)})")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": MODEL_TYPES.get(arch, arch),
        "hidden_size": hidden, "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length", 0)), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(get("vocab_size", meta.get("_vocab_size") or 0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif get("rope.scaling.type") == "yarn":   # Qwen2.5's long context, DeepSeek V2/V3
        config["rope_scaling"] = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor")),
                                  "original_max_position_embeddings": int(get("rope.scaling.original_context_length"))}
        for key in ("beta_fast", "beta_slow"):
            if get(f"rope.scaling.yarn_{key}") is not None:
                config["rope_scaling"][key] = float(get(f"rope.scaling.yarn_{key}"))
    elif get("rope.scaling.type") not in (None, "none"):
        raise GgufError(f"GGUF rope scaling {get('rope.scaling.type')!r} is not supported natively")
    if arch == "qwen2":
        config["attention_bias"] = False   # Qwen2's q/k/v bias is implied by model_type
    if arch == "deepseek2":
        config.update(_deepseek_config(get, config, tensor_names))
    elif get("expert_count"):
        config.update(_moe_config(arch, get, config, tensor_names))
    if arch in GEMMA_SWA_PATTERN:
        del config["hidden_act"]   # Gemma's is hidden_activation
        config.update(_gemma_config(arch, get, config))
    if arch == "phi3":   # llama.cpp's Phi3MiniModel converter: fused attn_qkv, ffn_up = gate|up
        head_dim = config["head_dim"]
        rotary = int(get("rope.dimension_count", head_dim))
        if rotary != head_dim:
            config["partial_rotary_factor"] = rotary / head_dim
        config["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length",
                                                             config["max_position_embeddings"]))
        config["sliding_window"] = int(get("attention.sliding_window", 0)) or None   # 0: none (Phi-4)
        if "_long_factor" in meta or "_short_factor" in meta:
            if "_long_factor" not in meta or "_short_factor" not in meta:
                raise GgufError("GGUF phi3 has only one of rope_factors_long / rope_factors_short")
            config["rope_scaling"] = {"rope_type": "longrope", "long_factor": meta["_long_factor"],
                                      "short_factor": meta["_short_factor"],
                                      "original_max_position_embeddings": config["original_max_position_embeddings"]}
            if get("rope.scaling.attn_factor") is not None:
                config["rope_scaling"]["attention_factor"] = float(get("rope.scaling.attn_factor"))
    for name in ("bos", "eos"):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            config[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{name}_token_id"])
    return config


def _moe_config(arch: str, get, config: dict, tensor_names: set[str]) -> dict:
    """Mixture-of-experts fields from llama.cpp's keys: a llama file with experts is Mixtral (always renormalised
    top-k); qwen2moe renormalises never and has a gated shared expert, qwen3moe always (llama.cpp's norm_w).
    Layers without a router tensor are dense (Qwen-MoE's mlp_only_layers)."""
    experts, used = int(get("expert_count")), int(get("expert_used_count"))
    if arch == "llama":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": experts,
                "num_experts_per_tok": used}
    if arch not in ("qwen2moe", "qwen3moe"):
        raise GgufError(f"GGUF architecture {arch!r} with experts is not served natively")
    out = {"num_experts": experts, "num_experts_per_tok": used, "norm_topk_prob": arch == "qwen3moe",
           "moe_intermediate_size": int(get("expert_feed_forward_length")), "decoder_sparse_step": 1,
           "mlp_only_layers": [i for i in range(config["num_hidden_layers"])
                               if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]}
    if arch == "qwen2moe":
        out["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length", 0))
    if get("feed_forward_length") is None:
        config["intermediate_size"] = out["moe_intermediate_size"]
    return out


def _deepseek_config(get, config: dict, tensor_names: set[str]) -> dict:
    """DeepSeek V2 / V3 (llama.cpp's deepseek2) fields. Sigmoid gating (expert_gating_func 2) is V3's router,
    softmax V2's (group-limited when the file has expert groups). The MLA sizes: key_length_mla / value_length_mla
    where the file has them (key_length is then kv_lora_rank + rope dims, llama.cpp's absorbed MQA view), else
    key_length / value_length. YaRN's mscale_all_dim comes back from yarn_log_multiplier (0.1 * mscale_all_dim);
    mscale is taken equal to it (DeepSeek's released configs), i.e. no extra factor on cos and sin."""
    rope = int(get("rope.dimension_count"))
    key = int(get("attention.key_length_mla", 0) or get("attention.key_length"))
    sigmoid = int(get("expert_gating_func", 1) or 1) == 2
    groups = int(get("expert_group_count", 1) or 1)
    out = {
        "architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "kv_lora_rank": int(get("attention.kv_lora_rank")), "q_lora_rank": get("attention.q_lora_rank"),
        "qk_rope_head_dim": rope, "qk_nope_head_dim": key - rope, "head_dim": rope,
        "v_head_dim": int(get("attention.value_length_mla", 0) or get("attention.value_length")),
        "num_key_value_heads": config["num_attention_heads"],
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "n_routed_experts": int(get("expert_count", 0) or 0) or None,
        "num_experts_per_tok": int(get("expert_used_count", 0) or 0) or None,
        "moe_intermediate_size": int(get("expert_feed_forward_length", 0) or 0) or None,
        "n_shared_experts": int(get("expert_shared_count", 0) or 0),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0) or 1.0),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "n_group": groups, "topk_group": int(get("expert_group_used_count", 1) or 1),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
    }
    if not sigmoid:
        out["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    if out["q_lora_rank"] is not None:
        out["q_lora_rank"] = int(out["q_lora_rank"])
    if config.get("rope_scaling") and get("rope.scaling.yarn_log_multiplier") is not None:
        mscale_all_dim = float(get("rope.scaling.yarn_log_multiplier")) / 0.1
        config["rope_scaling"].update(mscale=mscale_all_dim, mscale_all_dim=mscale_all_dim)
    return out


def _gemma_config(arch: str, get, config: dict) -> dict:
    """Gemma 2 / 3 fields of config.json from a GGUF written by llama.cpp's converter (Gemma2Model / Gemma3Model),
    with llama.cpp's defaults where the file is silent. Norm weights in the file hold 1 + weight (the
    converter adds the 1): the loader turns GemmaRMSNorm's own + 1 off (build_gguf_model)."""
    layers = config["num_hidden_layers"]
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):   # one bool per layer: True = sliding window
        sliding = [bool(x) for x in pattern]
    else:
        n = int(pattern or GEMMA_SWA_PATTERN[arch])
        sliding = [i % n < n - 1 for i in range(layers)]
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    out = {
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(get("attention.sliding_window", 4096)),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "query_pre_attn_scalar": (hidden // heads if layers == GEMMA_27B_LAYERS[arch] else config["head_dim"]),
    }
    if arch == "gemma2":   # absent keys: transformers' and llama.cpp's defaults (50, 30)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if get(key) is not None:
                out[key] = float(get(key))
    else:
        cap = get("final_logit_softcapping")
        out["final_logit_softcapping"] = float(cap) if cap else None
        out["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))   # llama.cpp's local-layer default
    return out


def write_sidecar(gguf: Path, folder: Path) -> Path:
    """Write folder/{config.json, generation_config.json, tokenizer files, model.gguf -> gguf} (atomic)."""
    import shutil

    import transformers
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf), "r")
    meta = read_metadata(reader)
    config = config_from_metadata(meta, {t.name for t in reader.tensors})
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(set(eos))}))
    _tokenizer_of(gguf).save_pretrained(str(tmp))
    os.symlink(gguf.resolve(), tmp / GGUF_LINK)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _tokenizer_of(gguf: Path):
    """The tokenizer transformers builds from the file's tokenizer.* fields. AutoTokenizer also parses the model's
    config and refuses architectures transformers cannot load from GGUF (deepseek2): for those the same builder
    runs on the tokenizer fields alone (they describe the tokenizer whatever the architecture)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ValueError as exc:
        if "not supported" not in str(exc):
            raise
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(gguf))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    config = {k: v for k, v in {**tokenizer_config, **extra}.items() if v is not None}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **config)


# ---- tensors -> model ---------------------------------------------------------------------------

class GgufEmbedding:
    """Token embedding rows looked up in the file's own type: only the rows a step needs are dequantised.
    With `head` (a tied model whose output layer holds the same values exactly: Q8_0, Q4_0, Q4_1) the rows come
    from the output layer's native layout instead of the file: random token ids fault in nearly every page of
    the mapped table (the kernel maps 64 KiB around each fault), a second resident copy of it."""

    def __init__(self, raw: np.ndarray, ggml_type: str, hidden: int, head: NativeQ4 | Q8Weight | None = None):
        self.ggml_type, self.hidden, self.head = ggml_type, hidden, head
        if head is not None:
            self.table = head.q4_packed if isinstance(head, NativeQ4) else head.qweight   # (counted once)
        elif ggml_type in FLOAT_TYPES:
            self.table = _float_tensor(raw, ggml_type, hidden)
        else:
            # (V, row bytes) uint8 viewing the memory-mapped file: only looked-up rows are ever read in
            self.table = torch.from_numpy(raw)
        self.nbytes = self.table.nbytes

    def __call__(self, ids: Tensor) -> Tensor:
        if self.head is not None:
            rows = q4_rows if isinstance(self.head, NativeQ4) else q8_rows
            return rows(self.head, ids.cpu()).to(ids.device)
        if self.ggml_type in FLOAT_TYPES:
            return torch.nn.functional.embedding(ids.cpu(), self.table).float().to(ids.device)
        return dequantize_rows(self.table[ids.cpu()].numpy(), self.ggml_type, self.hidden).to(ids.device)


EXACT_LAYOUTS = ("Q8_0", "Q4_0", "Q4_1")   # GGUF types whose native layout holds the file's values exactly


def _float_tensor(raw: np.ndarray, ggml_type: str, k: int) -> Tensor:
    if ggml_type == "BF16":
        return torch.from_numpy(np.array(raw).view(np.int16)).view(torch.bfloat16).reshape(-1, k)
    return torch.from_numpy(np.array(raw)).reshape(-1, k)


def _reverse_permute_rows(n_rows: int, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the two RoPE halves of each q/k head (Llama only); the row order
    that undoes it (transformers' reverse permute, on row indices: quant blocks run along rows)."""
    idx = np.arange(n_rows)
    dim = n_rows // heads // 2
    return idx.reshape(heads, dim, 2).swapaxes(2, 1).reshape(n_rows)


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF value types
_STRING, _ARRAY = 8, 9


class GgufIndex:
    """The tensor index of a GGUF file, read straight from its header, and its data memory-mapped.

    NOTE: gguf.GGUFReader parses every metadata array element into its own numpy view: 6 s for the default
    model's 49k-token vocabulary before a single weight is read (more for 128k-token vocabularies). The
    loader only needs the tensor index, so this reads it in ~0.1 s; the sidecar (written once) still uses
    GGUFReader for the metadata."""

    def __init__(self, path: str | Path):
        import struct

        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.mm = np.memmap(path, dtype=np.uint8, mode="c")   # copy-on-write: writable views, never written
        buf, pos = self.mm, 0

        def unpack(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            value = struct.unpack_from(fmt, buf, pos)
            pos += size
            return value if len(value) > 1 else value[0]

        def string() -> str:
            nonlocal pos
            n = unpack("<Q")
            text = bytes(buf[pos:pos + n]).decode("utf-8", "replace")
            pos += n
            return text

        def skip_value(kind: int):
            nonlocal pos
            if kind in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[kind]
            elif kind == _STRING:
                n = unpack("<Q")   # (not `pos += unpack(...)`: that adds to pos as read before the call)
                pos += n
            elif kind == _ARRAY:
                elem, count = unpack("<IQ")
                if elem in _SCALAR_SIZES:
                    pos += _SCALAR_SIZES[elem] * count
                else:
                    for _ in range(count):
                        skip_value(elem)
            else:
                raise GgufError(f"GGUF metadata value type {kind} is unknown")

        if bytes(buf[:4]) != b"GGUF":
            raise GgufError("not a GGUF file (bad magic bytes)")
        pos = 4
        version, n_tensors, n_kv = unpack("<IQQ")
        if version < 2:
            raise GgufError(f"GGUF version {version} is too old (2 or later)")
        alignment = 32
        for _ in range(n_kv):
            key, kind = string(), unpack("<I")
            if key == "general.alignment" and kind == 4:
                alignment = unpack("<I")
            else:
                skip_value(kind)
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = unpack("<I")
            dims = [unpack("<Q") for _ in range(n_dims)]
            kind, offset = unpack("<IQ")
            infos.append((name, dims, kind, offset))
        start = -(-pos // alignment) * alignment
        self.tensors = {}
        for name, dims, kind, offset in infos:
            qtype = GGMLQuantizationType(kind)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            k, rows = dims[0], int(np.prod(dims[1:])) if len(dims) > 1 else 1
            row_bytes = k // block * block_bytes
            self.tensors[name] = (qtype.name, dims, start + offset, rows, row_bytes)

    def get(self, name: str, required: bool = True):
        if name not in self.tensors:
            if required:
                raise GgufError(f"GGUF tensor {name!r} is missing")
            return None
        return name

    def type_of(self, name: str) -> str:
        return self.tensors[name][0]

    def k_of(self, name: str) -> int:
        return int(self.tensors[name][1][0])

    def raw(self, name: str) -> np.ndarray:
        """(rows, row bytes) uint8, memory-mapped; float types viewed as (rows, K) of their dtype."""
        kind, dims, offset, rows, row_bytes = self.tensors[name]
        data = self.mm[offset:offset + rows * row_bytes].reshape(rows, row_bytes)
        if kind == "F32":
            return data.view(np.float32)
        if kind == "F16":
            return data.view(np.float16)
        return data

    def release(self, name: str, row0: int = 0, row1: int | None = None) -> None:
        """Drop the file pages of a tensor (rows [row0, row1)) already converted from this process's memory
        (they count in its RSS while mapped; the page cache keeps them for the next start)."""
        kind, dims, offset, rows, row_bytes = self.tensors[name]
        row1 = rows if row1 is None else row1
        self._drop(offset + row0 * row_bytes, offset + row1 * row_bytes)

    def release_all(self) -> None:
        """Drop every page of the file read so far (header, norms, ...): views re-read what they need."""
        self._drop(0, len(self.mm))

    def _drop(self, begin: int, end: int) -> None:
        import mmap

        raw = getattr(self.mm, "_mmap", None)
        if raw is None or not hasattr(raw, "madvise"):
            return
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            raw.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass

    def rows(self, name: str, order: np.ndarray | None = None) -> tuple[np.ndarray, str, int]:
        """(rows, ...) array (reordered copy with `order`), type, K."""
        kind = self.type_of(name)
        if kind not in NATIVE_TYPES + FLOAT_TYPES:
            raise GgufError(f"GGUF tensor {name!r} has type {kind}, which berth has no kernel for "
                            f"(supported: {', '.join(NATIVE_TYPES + FLOAT_TYPES)})")
        data = self.raw(name)
        return (data if order is None else data[order]), kind, self.k_of(name)

    def vector(self, name: str, required: bool = True) -> Tensor | None:
        if self.get(name, required) is None:
            return None
        kind = self.type_of(name)
        values = self.raw(name)
        if kind == "BF16":
            return _float_tensor(values, kind, values.shape[1] // 2).float().reshape(-1)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(-1))

    def rows_of(self, name: str) -> int:
        return self.tensors[name][3]


def _linear_weight(parts: list[tuple[np.ndarray, str, int]], dense_dtype: torch.dtype | None):
    """Fuse row blocks (q|k|v or gate|up) into one weight: ('native', NativeQ4 | Q8Weight) or ('float', tensor)."""
    kinds = {kind for _, kind, _ in parts}
    k = parts[0][2]
    if dense_dtype is not None:    # not a CPU: one dense copy in the compute dtype
        return "float", torch.cat([torch.from_numpy(dequantize(r, kind, k)) for r, kind, _ in parts]).to(dense_dtype)
    if kinds <= set(FLOAT_TYPES) and len(kinds) == 1:
        return "float", torch.cat([_float_tensor(r, kind, k) for r, kind, _ in parts])
    if k % 32 or k > NATIVE_MAX_K:
        dtype = torch.bfloat16
        return "float", torch.cat([torch.from_numpy(dequantize(r, kind, k)) for r, kind, _ in parts]).to(dtype)
    if len(kinds) == 1 and len(parts) > 1:   # one type: the rows fuse before conversion (one pass, no cat)
        kind = next(iter(kinds))
        fused = np.concatenate([r for r, _, _ in parts])
        if all(r.shape[0] % 8 == 0 for r, _, _ in parts) or target_of(kind, fused.shape[0]) == "q8":
            return "native", repack(fused, kind, k)
    if len(parts) == 1:     # (single quantized tensors normally go through _chunked)
        return "native", repack(parts[0][0], parts[0][1], k)
    if all(kind in NATIVE_TYPES and target_of(kind, r.shape[0]) == "q4" for r, kind, _ in parts):
        packed = [repack(r, kind, k, "q4") for r, kind, _ in parts]
        return "native", NativeQ4(torch.cat([p.q4_packed for p in packed]),
                                  torch.cat([p.q4_scale_min for p in packed]), sum(p.out_features for p in packed))
    # any other mix: everything on the int8 kernel (exact for Q8_0, a fine re-quantisation otherwise)
    packed = [repack(r, kind, k, "q8") for r, kind, _ in parts]
    if len(packed) > 1 and any(p.out_features % 8 for p in packed):
        raise GgufError("fused GGUF tensors need row counts that are multiples of 8")
    return "native", Q8Weight(torch.cat([p.qweight for p in packed]), torch.cat([p.scales for p in packed]),
                              sum(p.out_features for p in packed))


CHUNK_ROWS = 4096   # rows of a single (unfused) tensor converted at a time, its file pages released after each


def _chunked(tensors: "GgufIndex", name: str):
    """A single quantized tensor converted in row chunks into a preallocated native layout, each chunk's
    file pages released as it is done: the output layer (the largest tensor) never holds two full copies."""
    raw, kind, k = tensors.rows(name)
    n = raw.shape[0]
    target = target_of(kind, n)
    groups = k // 32
    if target == "q4":
        packed = torch.empty(n // 8, groups, 4, 32, dtype=torch.uint8)
        scale_min = torch.empty(n // 8, groups, 2, 8, dtype=torch.float16)
    else:
        blocks = -(-n // 8)
        qweight = torch.zeros(blocks, groups, 8, 32, dtype=torch.int8)
        scales = torch.zeros(blocks, groups, 8, dtype=torch.float16)
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)
        part = repack(raw[r0:r1], kind, k, target)
        b0 = r0 // 8
        if target == "q4":
            packed[b0:b0 + part.q4_packed.shape[0]] = part.q4_packed
            scale_min[b0:b0 + part.q4_packed.shape[0]] = part.q4_scale_min
        else:
            qweight[b0:b0 + part.qweight.shape[0]] = part.qweight
            scales[b0:b0 + part.qweight.shape[0]] = part.scales
        del part
        tensors.release(name, r0, r1)
    return NativeQ4(packed, scale_min, n) if target == "q4" else Q8Weight(qweight, scales, n)


def _set_linear(linear, parts, dense_dtype, tensors: "GgufIndex | None" = None, names: tuple = ()) -> int:
    if (len(names) == 1 and dense_dtype is None and parts[0][1] in NATIVE_TYPES and parts[0][2] % 32 == 0
            and parts[0][2] <= NATIVE_MAX_K):
        value = _chunked(tensors, names[0])
        linear.native = value
        linear.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        return value.nbytes if isinstance(value, NativeQ4) else value.qweight.nbytes + value.scales.nbytes
    kind, value = _linear_weight(parts, dense_dtype)
    for name in names:   # converted: its file pages can go
        tensors.release(name)
    if kind == "native":
        linear.native = value
        linear.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        return value.nbytes if isinstance(value, NativeQ4) else value.qweight.nbytes + value.scales.nbytes
    expected = (sum(linear.shard_sizes), parts[0][2])
    if tuple(value.shape) != expected:
        raise GgufError(f"GGUF weight of shape {tuple(value.shape)} where the model expects {expected}")
    linear.weight = nn.Parameter(value.contiguous(), requires_grad=False)
    return value.nbytes


LLAMA_PERMUTED = ("llama", "mixtral")


def _set_mla(attn, tensors: "GgufIndex", i: int, dense_dtype) -> int:
    """A DeepSeek layer's latent attention. kv_b_proj comes as one tensor (attn_kv_b, older files) or as llama.cpp's
    absorbed pair: attn_k_b (heads, rank, nope: each head's W_uk transposed) and attn_v_b (heads, v, rank), which
    become MLAttention's absorbed matrices directly (float: they multiply per head)."""
    p = f"blk.{i}."
    total = 0
    if attn.q_lora_rank:
        total += _set_linear(attn.q_a_proj, [tensors.rows(p + "attn_q_a.weight")], dense_dtype, tensors)
        attn.q_a_layernorm.weight = nn.Parameter(tensors.vector(p + "attn_q_a_norm.weight"), requires_grad=False)
        total += _set_linear(attn.q_b_proj, [tensors.rows(p + "attn_q_b.weight")], dense_dtype, tensors)
    else:
        total += _set_linear(attn.q_proj, [tensors.rows(p + "attn_q.weight")], dense_dtype, tensors)
    total += _set_linear(attn.kv_a_proj_with_mqa, [tensors.rows(p + "attn_kv_a_mqa.weight")], dense_dtype, tensors)
    attn.kv_a_layernorm.weight = nn.Parameter(tensors.vector(p + "attn_kv_a_norm.weight"), requires_grad=False)
    if tensors.get(p + "attn_kv_b.weight", required=False) is not None:
        total += _set_linear(attn.kv_b_proj, [tensors.rows(p + "attn_kv_b.weight")], dense_dtype, tensors)
        attn.absorbed()
    else:
        heads = attn.num_heads
        w_uk = _dense(tensors, p + "attn_k_b.weight").view(heads, attn.rank, attn.nope).transpose(1, 2)
        w_uv = _dense(tensors, p + "attn_v_b.weight").view(heads, attn.v_dim, attn.rank)
        attn._absorbed = (w_uk.contiguous(), w_uv.contiguous())
        attn.kv_b_proj.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    total += sum(w.nbytes for w in attn._absorbed)
    total += _set_linear(attn.o_proj, [tensors.rows(p + "attn_output.weight")], dense_dtype, tensors)
    return total   # model types whose q/k rows llama.cpp's converter interleaves


def _set_experts(moe, tensors: "GgufIndex", i: int, dense_dtype) -> int:
    """One layer's experts from llama.cpp's stacked tensors (ffn_{gate,up,down}_exps: expert e owns rows
    e * rows .. (e + 1) * rows), each expert's gate|up fused and kept in the file's types; the router
    (ffn_gate_inp) and Qwen2-MoE's shared expert gate in float, the shared experts (ffn_*_shexp) as dense layers."""
    total = 0
    p = f"blk.{i}."
    moe.gate.weight = nn.Parameter(_dense(tensors, p + "ffn_gate_inp.weight"), requires_grad=False)
    if moe.settings["score_bias"]:   # DeepSeek V3's e_score_correction_bias
        moe.gate.e_score_correction_bias = nn.Parameter(tensors.vector(p + "exp_probs_b.bias"), requires_grad=False)
    gate, up, down = (tensors.rows(p + f"ffn_{x}_exps.weight") for x in ("gate", "up", "down"))
    n = len(moe.experts)
    for e, expert in enumerate(moe.experts):
        def part(t):
            raw, kind, k = t
            rows = raw.shape[0] // n
            return raw[e * rows:(e + 1) * rows], kind, k
        total += _set_linear(expert.gate_up_proj, [part(gate), part(up)], dense_dtype, tensors)
        total += _set_linear(expert.down_proj, [part(down)], dense_dtype, tensors)
    if moe.shared_experts is not None:
        shared = moe.shared_experts
        total += _set_linear(shared.gate_up_proj, [tensors.rows(p + "ffn_gate_shexp.weight"),
                                                   tensors.rows(p + "ffn_up_shexp.weight")], dense_dtype, tensors)
        total += _set_linear(shared.down_proj, [tensors.rows(p + "ffn_down_shexp.weight")], dense_dtype, tensors)
    if moe.settings["shared_gate"]:
        moe.shared_expert_gate.weight = nn.Parameter(_dense(tensors, p + "ffn_gate_inp_shexp.weight").reshape(1, -1),
                                                     requires_grad=False)
    return total


def _dense(tensors: "GgufIndex", name: str) -> Tensor:
    """A small tensor (router, gate vector) as fp32 whatever its type in the file."""
    raw, kind, k = tensors.rows(tensors.get(name))
    if kind in FLOAT_TYPES:
        return _float_tensor(raw, kind, k).float()
    return torch.from_numpy(dequantize(raw, kind, k)).float()


def build_gguf_model(folder: str | Path, device: torch.device, max_positions: int | None = None):
    """LlamaForCausalLM whose weights come from folder/model.gguf in native layouts (CPU) or as dense
    `bf16` tensors (other devices). Returns (model, weight bytes)."""
    from transformers import AutoConfig

    from server.engine.models.llama import Linear, LlamaForCausalLM, is_supported
    from server.engine.models.mla import MLAttention
    from server.engine.models.moe import SparseMoe
    from server.engine.models.weights import WeightsOnMeta

    device = torch.device(device)
    path = gguf_of(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if not is_supported(config):
        raise GgufError(f"unsupported model: model_type={config.model_type}")
    tensors = GgufIndex(path)
    arch = config.model_type
    gemma = arch in ("gemma2", "gemma3_text")
    dense_dtype = None if device.type == "cpu" else torch.bfloat16
    with WeightsOnMeta():
        model = LlamaForCausalLM(config, max_positions)
    total = 0
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = tensors.get(f"blk.{i}.attn_qkv.weight", required=False)   # Phi-3: q|k|v rows already fused
        if isinstance(attn, MLAttention):
            total += _set_mla(attn, tensors, i, dense_dtype)
        elif qkv is not None:
            total += _set_linear(attn.qkv_proj, [tensors.rows(qkv)], dense_dtype, tensors, (qkv,))
        else:
            q, k, v = (tensors.get(f"blk.{i}.attn_{x}.weight") for x in "qkv")
            q_order = _reverse_permute_rows(tensors.rows_of(q), heads) if arch in LLAMA_PERMUTED else None
            k_order = _reverse_permute_rows(tensors.rows_of(k), kv_heads) if arch in LLAMA_PERMUTED else None
            total += _set_linear(attn.qkv_proj, [tensors.rows(q, q_order), tensors.rows(k, k_order),
                                                 tensors.rows(v)], dense_dtype, tensors, (q, k, v))
        if not isinstance(attn, MLAttention) and attn.qkv_proj.bias is not None:
            bq, bk, bv = (tensors.vector(f"blk.{i}.attn_{x}.bias") for x in "qkv")
            if arch in LLAMA_PERMUTED:
                bq, bk = bq[torch.from_numpy(q_order)], bk[torch.from_numpy(k_order)]
            attn.qkv_proj.bias = nn.Parameter(torch.cat([bq, bk, bv]), requires_grad=False)
        names = [f"blk.{i}.{x}.weight" for x in ("attn_output", "ffn_gate", "ffn_up", "ffn_down")]
        if not isinstance(attn, MLAttention):
            total += _set_linear(attn.o_proj, [tensors.rows(names[0])], dense_dtype, tensors, names[:1])
        if isinstance(mlp, SparseMoe):
            total += _set_experts(mlp, tensors, i, dense_dtype)
        elif arch == "phi3":   # no ffn_gate: ffn_up holds gate|up (2 x intermediate rows)
            total += _set_linear(mlp.gate_up_proj, [tensors.rows(names[2])], dense_dtype, tensors, names[2:3])
        else:
            total += _set_linear(mlp.gate_up_proj, [tensors.rows(names[1]), tensors.rows(names[2])], dense_dtype,
                                 tensors, names[1:3])
        if not isinstance(mlp, SparseMoe):
            total += _set_linear(mlp.down_proj, [tensors.rows(names[3])], dense_dtype, tensors, names[3:])
        layer.input_layernorm.weight = nn.Parameter(tensors.vector(f"blk.{i}.attn_norm.weight"), requires_grad=False)
        if gemma:   # post_attention_norm, ffn_norm (before the MLP), post_ffw_norm
            for module, name in ((layer.post_attention_layernorm, "post_attention_norm"),
                                 (layer.pre_feedforward_layernorm, "ffn_norm"),
                                 (layer.post_feedforward_layernorm, "post_ffw_norm")):
                module.weight = nn.Parameter(tensors.vector(f"blk.{i}.{name}.weight"), requires_grad=False)
        else:
            layer.post_attention_layernorm.weight = nn.Parameter(tensors.vector(f"blk.{i}.ffn_norm.weight"),
                                                                 requires_grad=False)
        if getattr(attn, "has_qk_norm", False):
            attn.q_norm.weight = nn.Parameter(tensors.vector(f"blk.{i}.attn_q_norm.weight"), requires_grad=False)
            attn.k_norm.weight = nn.Parameter(tensors.vector(f"blk.{i}.attn_k_norm.weight"), requires_grad=False)
        for name in [n for n in tensors.tensors if n.startswith(f"blk.{i}.")]:
            tensors.release(name)
    model.model.norm.weight = nn.Parameter(tensors.vector("output_norm.weight"), requires_grad=False)
    embd = tensors.get("token_embd.weight")
    raw, kind, hidden = tensors.rows(embd)
    head = Linear(hidden, [config.vocab_size])
    head_name = tensors.get("output.weight", required=False) or embd
    total += _set_linear(head, [tensors.rows(head_name)], dense_dtype, tensors, (head_name,))
    model.lm_head_linear = head
    shared = head.native if head_name == embd and kind in EXACT_LAYOUTS and head.native is not None else None
    model.embed_lookup = GgufEmbedding(raw, kind, hidden, shared)
    total += 0 if shared is not None else model.embed_lookup.nbytes
    model.model.embed_tokens.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    freqs = tensors.get("rope_freqs.weight", required=False)
    if freqs is not None:
        model.model.rotary_emb.params["freq_factors"] = tensors.vector(freqs).tolist()
    model.model.rebuild_rotary(torch.float32, device)
    if gemma:   # the file's norm weights already hold 1 + weight (llama.cpp's converter)
        from server.engine.models.llama import GemmaRMSNorm

        for module in model.modules():
            if isinstance(module, GemmaRMSNorm):
                module.unit_offset = False
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise GgufError(f"GGUF left {len(left)} parameters unloaded: {left[:4]}")
    tensors.release_all()
    model.gguf_index = tensors   # the file stays mapped for the embedding rows; converted tensors were released
    model = model.to(device)
    return model.eval(), total
