"""Which architectures the paged engine runs, and the settings it reads from their configs (RoPE, rotary
width, per-layer sliding windows, Gemma's layer types). Config reading only: the layers are in llama.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                           "InternLM3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                           "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "internlm3",
                         "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "longrope", "yarn"}
GEMMA_MODEL_TYPES = {"gemma2", "gemma3_text"}
LAYER_TYPES = ("sliding_attention", "full_attention")
# MLP activations by config.hidden_activation (Gemma): transformers' ACT2FN names berth computes the same way
GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def is_gemma(config) -> bool:
    return getattr(config, "model_type", None) in GEMMA_MODEL_TYPES


def layer_types_of(config) -> list[str]:
    """Each layer's attention type ("sliding_attention" / "full_attention"): config.layer_types, else the
    default pattern of transformers' configs (Gemma 2: every other layer local; Gemma 3: sliding_window_pattern,
    6 by default, i.e. five local then one global); every layer "full_attention" for other models."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    if not is_gemma(config):
        return ["full_attention"] * n
    pattern = 2 if config.model_type == "gemma2" else (getattr(config, "sliding_window_pattern", None) or 6)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def layer_windows(config) -> list[int | None]:
    """Each layer's attention window (None: the whole context): Gemma's sliding layers get config.sliding_window,
    a Phi-3 model its window on every layer (sliding_window_of), other models none."""
    if not is_gemma(config):
        return [sliding_window_of(config)] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None
    return [window if t == "sliding_attention" else None for t in layer_types_of(config)]


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """RoPE settings as transformers 5 stores them (config.rope_parameters, with rope_theta
    inside), falling back to the 4.x fields (rope_scaling + rope_theta). LongRoPE gets its
    original_max_position_embeddings and attention_factor filled in as transformers computes them.
    Gemma 3 keeps one set per layer type (transformers 5: rope_parameters[layer_type]; 4.x: the local layers'
    rope_local_base_freq, unscaled): `layer_type` picks it (None: the global layers')."""
    raw = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if any(t in raw for t in LAYER_TYPES):
        raw = raw.get(layer_type or "full_attention") or {}
    elif getattr(config, "model_type", None) == "gemma3_text" and layer_type == "sliding_attention":
        raw = {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", None) or 10000.0}
    params = dict(raw)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if getattr(config, "model_type", None) == "phi3":
        if params["rope_type"] in ("su", "yarn"):   # Phi3Config's legacy names for LongRoPE
            params["rope_type"] = "longrope"
        if params.get("partial_rotary_factor") is None:
            params["partial_rotary_factor"] = getattr(config, "partial_rotary_factor", None) or 1.0
    if params["rope_type"] == "longrope":
        # the config's own field first, as transformers' standardize_rope_params (Phi-3 keeps it there)
        original = (getattr(config, "original_max_position_embeddings", None)
                    or params.get("original_max_position_embeddings") or config.max_position_embeddings)
        params["original_max_position_embeddings"] = original
        if params.get("attention_factor") is None:   # _compute_longrope_parameters' default
            factor = params.get("factor") or config.max_position_embeddings / original
            params["attention_factor"] = (1.0 if factor <= 1.0 else
                                          math.sqrt(1 + math.log(factor) / math.log(original)))
    if params["rope_type"] == "yarn":
        _yarn_defaults(params, config)
    return params


def _yarn_defaults(params: dict, config) -> None:
    """YaRN (Qwen2.5's long context, DeepSeek): the settings transformers' _compute_yarn_parameters reads,
    with its defaults; the attention factor scales cos and sin (static YaRN, as transformers and vLLM)."""
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = params["factor"]
    params["original_max_position_embeddings"] = (params.get("original_max_position_embeddings")
                                                  or config.max_position_embeddings)
    if params.get("attention_factor") is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            params["attention_factor"] = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            params["attention_factor"] = mscale(factor)
    params["beta_fast"] = params.get("beta_fast") or 32
    params["beta_slow"] = params.get("beta_slow") or 1
    params.setdefault("truncate", True)


def rotary_dim_of(config) -> int:
    """Dimensions of each head that RoPE rotates: all of them, except Phi-3's partial_rotary_factor."""
    head_dim = head_dim_of(config)
    if getattr(config, "model_type", None) != "phi3":
        return head_dim
    return int(head_dim * rope_parameters(config)["partial_rotary_factor"])


def sliding_window_of(config) -> int | None:
    """The attention window berth applies (Phi-3 only: see the module docstring), or None."""
    if getattr(config, "model_type", None) != "phi3":
        return None
    return getattr(config, "sliding_window", None) or None


def is_supported(config) -> bool:
    """True for a Llama-family or Gemma 2/3 architecture (by `architectures`, else by `model_type`) whose
    RoPE type we implement (LongRoPE: Phi-3 only, the one family it is checked against). Gemma also needs a
    known MLP activation, causal attention (not use_bidirectional_attention) and known layer types."""
    architectures = getattr(config, "architectures", None)
    known = (any(a in SUPPORTED_ARCHITECTURES for a in architectures) if architectures
             else getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES)
    if not known:
        return False
    if is_gemma(config):
        if (getattr(config, "hidden_activation", None) not in GEMMA_ACTIVATIONS
                or getattr(config, "use_bidirectional_attention", False)
                or len(layer_types_of(config)) != config.num_hidden_layers
                or not set(layer_types_of(config)) <= set(LAYER_TYPES)):
            return False
        rope_types = {rope_parameters(config, t)["rope_type"] for t in set(layer_types_of(config))}
    elif architectures and any(a.startswith("Gemma") for a in architectures):
        return False   # e.g. Gemma3ForCausalLM over a multimodal gemma3 config: not the text model berth runs
    else:
        rope_types = {rope_parameters(config)["rope_type"]}
    for rope_type in rope_types:
        if rope_type not in SUPPORTED_ROPE_TYPES or (
                rope_type == "longrope" and getattr(config, "model_type", None) != "phi3"):
            return False
    rotary_dim = rotary_dim_of(config)
    return 0 < rotary_dim <= head_dim_of(config) and rotary_dim % 2 == 0


def kv_layout(config) -> tuple[int, int, bool]:
    """(KV heads, head size, keys and values share one tensor) of each layer's paged cache: MLA models cache
    one row of kv_lora_rank + qk_rope_head_dim per token (models/mla.py), others K and V per KV head."""
    if getattr(config, "model_type", None) in ("deepseek_v2", "deepseek_v3") and getattr(config, "kv_lora_rank", None):
        return 1, config.kv_lora_rank + config.qk_rope_head_dim, True
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads, False


@dataclass(frozen=True, slots=True)
class KVGroup:
    """Layers whose KV caches share one block table: `layers` in slot order (a group may have fewer layers than
    there are slots), each attending to the last `window` keys (None: the whole context)."""
    layers: tuple[int, ...]
    window: int | None


def kv_groups(config, max_model_len: int | None = None) -> list[KVGroup]:
    """The model's layers in KV groups (vLLM's hybrid allocator): every group has its own block table per
    sequence, all draw their blocks from one pool, and slot i's tensors serve layer i of every group, so a block
    id costs one slot set (len of the largest group) of layers whatever group holds it. A model whose layers all
    attend alike has one group (windowed for Phi-3). Gemma's local and global layers form separate groups of one
    size, so a sequence's local groups hold only their window's blocks (BlockManager.release_out_of_window) while
    its global groups hold every block: the size is the larger layer count when it is under 1.5x the smaller,
    else the smaller (the last group of a kind padded), as vLLM chooses. Full-attention groups come first. A
    window of at least max_model_len is no window here (its layers are grouped with the global ones)."""
    windows = [None if (w and max_model_len and w >= max_model_len) else w for w in layer_windows(config)]
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(windows):
        by_window.setdefault(window, []).append(layer)
    if len(by_window) == 1:
        return [KVGroup(tuple(range(len(windows))), windows[0] if windows else None)]
    counts = [len(layers) for layers in by_window.values()]
    size = max(counts) if max(counts) < 1.5 * min(counts) else min(counts)
    groups = []
    for window in sorted(by_window, key=lambda w: (w is not None, w or 0)):
        layers = by_window[window]
        groups += [KVGroup(tuple(layers[i:i + size]), window) for i in range(0, len(layers), size)]
    return groups


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
