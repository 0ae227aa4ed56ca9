"""Load HF safetensors checkpoints (single file or sharded) into LlamaForCausalLM."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from transformers import AutoConfig

from server.engine.models.llama import LlamaForCausalLM, is_supported

SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def build_model(folder: str, dtype: torch.dtype, device, max_positions: int | None = None
                ) -> LlamaForCausalLM:
    """Config (AutoConfig, local folder only) -> model materialised on `device` in `dtype`
    without a random init -> weights loaded. Raises ValueError for unsupported architectures."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not is_supported(config):
        raise ValueError(f"unsupported model: architectures={getattr(config, 'architectures', None)} "
                         f"model_type={config.model_type}")
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    model = model.to(dtype=dtype).to_empty(device=device)
    if model.tie_word_embeddings:  # to_empty() re-creates parameters and breaks the tie
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.rebuild(dtype, device)
    load_weights(model, folder)
    return model.eval()


def load_weights(model: LlamaForCausalLM, folder: str) -> None:
    """Copy every tensor of folder/*.safetensors into `model`. q/k/v and gate/up go into their
    shard of the fused parameter. Unknown tensors, shape mismatches and parameters (or shards)
    left unloaded raise ValueError naming them."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int]] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name.endswith(SKIPPED_SUFFIXES):
                    continue
                if model.tie_word_embeddings and name == "lm_head.weight":
                    continue  # tied: the embedding holds these values
                loaded.add(_load_tensor(model, params, name, f.get_tensor(name)))
    _check_complete(model, params, loaded)


def _load_tensor(model: LlamaForCausalLM, params: dict, name: str, tensor: torch.Tensor
                 ) -> tuple[str, int]:
    target, shard_id = _target_of(model, name)
    param = params.get(target)
    if param is None:
        raise ValueError(f"checkpoint tensor {name!r} has no parameter in the model")
    rows = _shard_rows(model, target, shard_id)
    dest = param.data if rows is None else param.data[rows[0]:rows[1]]
    if dest.shape != tensor.shape:
        raise ValueError(f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                         f"model {tuple(dest.shape)}")
    dest.copy_(tensor)
    return target, shard_id


def _target_of(model: LlamaForCausalLM, name: str) -> tuple[str, int]:
    """'...self_attn.k_proj.weight' -> ('...self_attn.qkv_proj.weight', 1); others -> (name, 0)."""
    for part, (packed, shard_id) in model.packed_modules_mapping.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{packed}."), shard_id
    return name, 0


def _shard_rows(model: LlamaForCausalLM, target: str, shard_id: int) -> tuple[int, int] | None:
    module = model.get_submodule(target.rsplit(".", 1)[0])
    sizes = getattr(module, "shard_sizes", None)
    if sizes is None or len(sizes) == 1:
        return None
    start = sum(sizes[:shard_id])
    return start, start + sizes[shard_id]


def _check_complete(model: LlamaForCausalLM, params: dict, loaded: set[tuple[str, int]]) -> None:
    missing = []
    for name in params:
        sizes = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "shard_sizes", [None])
        missing += [f"{name}[shard {i}]" if len(sizes) > 1 else name
                    for i in range(len(sizes)) if (name, i) not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors: {missing[:8]}")
