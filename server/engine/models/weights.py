"""Load HF safetensors checkpoints (single file or sharded) into LlamaForCausalLM."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig

from server.engine.models.llama import LlamaForCausalLM, is_supported

SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# constructors whose tensors are weights (empty until loaded): on the meta device while a model is built
WEIGHT_CONSTRUCTORS = (torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn)


class WeightsOnMeta(TorchFunctionMode):
    """`torch.device("meta")` for the weights alone: the constructors above, given no device, make meta tensors;
    tensors computed from values (arange, tensor: the RoPE tables) stay on the CPU, as does their arithmetic.
    NOTE: arithmetic on meta tensors runs torch's Python decompositions (torch 2.13), whose first call imports
    torch._dynamo, and with it triton, inductor and sympy: ~90 MB resident for the life of a CPU server."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in WEIGHT_CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def build_model(folder: str, dtype: torch.dtype, device, max_positions: int | None = None,
                quantization: str = "none", keep_stored_dtype: bool = False) -> LlamaForCausalLM:
    """Config (AutoConfig, local folder only) -> model with its weights on the meta device (WeightsOnMeta) -> each
    parameter materialised as its tensors are read (safetensors, memory-mapped), in `dtype` or, with keep_stored_dtype, the
    linear, embedding and output weights in the checkpoint's own dtype (bf16 stays bf16; norms and biases
    in `dtype`). quantization int8/int4: each linear layer is quantized (its float weight dropped) as soon
    as all its shards are read, so the peak during load stays near the final size. Raises ValueError for
    unsupported architectures. A GGUF sidecar folder (model.gguf link) loads natively (gguf_loader.py)."""
    from server.engine.models.gguf_loader import build_gguf_model, gguf_of

    if gguf_of(folder) is not None:
        return build_gguf_model(folder, device, max_positions)[0]
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not is_supported(config):
        raise ValueError(f"unsupported model: architectures={getattr(config, 'architectures', None)} "
                         f"model_type={config.model_type}")
    with WeightsOnMeta():
        model = LlamaForCausalLM(config, max_positions)
    model.model.rebuild_rotary(dtype, device)
    load_weights(model, folder, dtype, device, quantization, keep_stored_dtype)
    if quantization in ("int8", "int4"):
        model.quantize_head()
    return model.eval()


def load_weights(model: LlamaForCausalLM, folder: str, dtype: torch.dtype | None = None, device="cpu",
                 quantization: str = "none", keep_stored_dtype: bool = False) -> None:
    """Read every tensor of folder/*.safetensors into `model`. q/k/v and gate/up go into their shard of
    the fused parameter; a checkpoint's own fused qkv_proj / gate_up_proj (Phi-3) fills all its shards.
    Parameters still on the meta device are materialised on first write (dtype: see build_model). Unknown
    tensors, shape mismatches and parameters (or shards) left unloaded raise ValueError naming them."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int]] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for stored in f.keys():
                if stored.endswith(SKIPPED_SUFFIXES):
                    continue
                if model.tie_word_embeddings and stored == "lm_head.weight":
                    continue  # tied: the embedding holds these values
                for name, tensor in _split_experts(_berth_name(stored), f.get_tensor(stored)):
                    target, shards = _load_tensor(model, params, name, tensor, dtype, device, keep_stored_dtype)
                    loaded.update((target, shard) for shard in shards)
                    if quantization in ("int8", "int4"):
                        _quantize_when_complete(model, target, loaded, quantization)
    _check_complete(model, params, loaded)
    if model.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


# checkpoint name parts -> berth's: Mixtral's block_sparse_moe and w1/w3/w2 experts, Qwen2-MoE's one shared expert
RENAMES = ((".block_sparse_moe.", ".mlp."), (".shared_expert.", ".shared_experts."))
MIXTRAL_EXPERT_RENAMES = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def _berth_name(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    if ".experts." in name:
        for old, new in MIXTRAL_EXPERT_RENAMES.items():
            name = name.replace(old, new)
    return name


def _split_experts(name: str, tensor: torch.Tensor):
    """A checkpoint's experts stacked in one 3-D tensor (transformers 5's mlp.experts.gate_up_proj (E, 2I, H) and
    mlp.experts.down_proj (E, H, I)) as one tensor per expert; any other tensor as it is."""
    head, _, leaf = name.rpartition(".experts.")
    if head and leaf in ("gate_up_proj", "down_proj") and tensor.dim() == 3:
        for e in range(tensor.shape[0]):
            yield f"{head}.experts.{e}.{leaf}.weight", tensor[e]
    else:
        yield name, tensor


def _quantize_when_complete(model, target: str, loaded: set, method: str) -> None:
    from server.engine.models.llama import Linear

    module_name, attr = target.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if not isinstance(module, Linear) or attr != "weight":
        return
    if all((target, i) in loaded for i in range(len(module.shard_sizes))):
        module.quantize(method, keep_float=False)


def _load_tensor(model: LlamaForCausalLM, params: dict, name: str, tensor: torch.Tensor,
                 dtype: torch.dtype | None = None, device="cpu", keep_stored_dtype: bool = False
                 ) -> tuple[str, range]:
    """Copy one checkpoint tensor into its parameter; returns (parameter name, the shards it filled)."""
    target, shard_id = _target_of(model, name)
    param = params.get(target)
    if param is None:
        raise ValueError(f"checkpoint tensor {name!r} has no parameter in the model")
    module_name, attr = target.rsplit(".", 1)
    module = model.get_submodule(module_name)
    current = getattr(module, attr)
    if current.device.type == "meta":   # first shard read: materialise this parameter only
        big = attr == "weight" and current.dim() == 2
        want = tensor.dtype if keep_stored_dtype and big and tensor.dtype in (torch.bfloat16, torch.float16) \
            else (dtype or current.dtype)
        current = torch.nn.Parameter(torch.empty(current.shape, dtype=want, device=device), requires_grad=False)
        setattr(module, attr, current)
        params[target] = current
    shard_sizes = getattr(model.get_submodule(module_name), "shard_sizes", [None])
    fused = target == name and len(shard_sizes) > 1   # the checkpoint's own fused tensor: every shard at once
    rows = None if fused else _shard_rows(model, target, shard_id)
    dest = current.data if rows is None else current.data[rows[0]:rows[1]]
    if dest.shape != tensor.shape:
        raise ValueError(f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                         f"model {tuple(dest.shape)}")
    dest.copy_(tensor)
    return target, (range(len(shard_sizes)) if fused else range(shard_id, shard_id + 1))


def _target_of(model: LlamaForCausalLM, name: str) -> tuple[str, int]:
    """'...self_attn.k_proj.weight' -> ('...self_attn.qkv_proj.weight', 1); others (including an already
    fused '...qkv_proj.weight') -> (name, 0)."""
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


def weight_bytes(model) -> int:
    """Resident bytes of a model's weights: parameters, quantized forms and GGUF native layouts."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is not None and isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.data_ptr(), t.nbytes)
            if key not in seen and t.nbytes:
                seen.add(key)
                total += t.nbytes
    for p in model.parameters():
        add(p)
    for module in model.modules():
        for t in getattr(module, "_absorbed", None) or ():   # MLA's per-head matrices (models/mla.py)
            add(t)
        for attr in ("int8", "int4", "native"):
            value = getattr(module, attr, None)
            if value is not None:
                for field in getattr(type(value), "__slots__", ()) or getattr(type(value), "__dataclass_fields__", ()):
                    add(getattr(value, field, None))
    for attr in ("_lm_head_int8", "_lm_head_q8"):
        value = getattr(model, attr, None)
        if value is not None:
            for field in type(value).__dataclass_fields__:
                add(getattr(value, field, None))
    head = getattr(model, "lm_head_linear", None)
    if head is not None and head.native is not None:
        for field in type(head.native).__dataclass_fields__:
            add(getattr(head.native, field, None))
    embed = getattr(model, "embed_lookup", None)
    if embed is not None:
        add(embed.table)
    return total
