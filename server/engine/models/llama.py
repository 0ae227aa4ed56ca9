"""Llama-family decoder (Llama, SmolLM, Mistral, Qwen2, Qwen3, Phi-3) over berth's paged KV cache.

Parameter names follow the HF checkpoints except the fused projections (`qkv_proj` = q, k, v
rows concatenated; `gate_up_proj` = gate, up), which weights.py fills shard by shard
(nano-vllm's packed_modules_mapping), or whole where the checkpoint already stores them fused (Phi-3).
NOTE: sliding-window attention is applied for Phi-3 only (transformers' Phi3 masks it); for Mistral and
Qwen2/3 configs it is ignored: every layer attends to the full context, so outputs match HF exactly while
sequences stay within the window.

Phi-3 (Phi3ForCausalLM): the Llama layer with partial rotary embeddings (partial_rotary_factor: RoPE on the
first rotary_dim dimensions of each head, Phi-4-mini) and LongRoPE scaling. transformers picks LongRoPE's
long or short factors per forward pass (long once the sequence exceeds original_max_position_embeddings,
recomputing the whole cache at the switch); a paged cache shared by a batch cannot re-rotate its keys, so
berth picks once per model, as vLLM and llama.cpp do: long factors when max_model_len (max_positions)
exceeds original_max_position_embeddings, else short. Outputs equal transformers' for every sequence when
max_model_len <= original_max_position_embeddings, and for sequences longer than it otherwise; a shorter
sequence under a longer max_model_len gets the long factors where transformers would use the short ones.
Mixture-of-experts layers (moe.py) and DeepSeek's latent attention (mla.py) run on the C++ step too when their
products are GGUF / int4 weights: every router and shared experts in kernels/csrc/moe.cpp, the latent attention in
kernels/csrc/mla.cpp (the team step only). The C++ step (kernels/cpu_model.cpp) runs Phi-3 too: RoPE on the first rotary_dim dimensions of each head and
attention over the last sliding_window keys of each query.

Gemma 2 (Gemma2ForCausalLM) and Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): the same paged
layer with transformers' Gemma differences: embeddings scaled by sqrt(hidden_size) (rounded to the embedding's
dtype), RMSNorm computing x * (1 + weight) (GemmaRMSNorm; a GGUF stores 1 + weight already: unit_offset off),
a GELU-tanh gated MLP, four norms per layer (input, post-attention, pre- and post-feedforward), attention
scale query_pre_attn_scalar ** -0.5, attention logit soft-capping (Gemma 2: tanh(s / cap) * cap before the
mask and softmax, in kernels.paged_attention), final logit soft-capping (compute_logits), sliding-window
layers alternating with global ones per config.layer_types (Gemma 2: every other layer; Gemma 3: five local
to one global), Gemma 3's q/k norms on each head before RoPE and its two RoPE tables (local layers:
rope_local_base_freq, unscaled; global layers: rope_theta and their rope scaling, e.g. linear). The C++ step
computes all of it but the embedding scale and the final soft-capping, which stay here (_native_layer passes the
(1 + w) norm weights, the output norms, each layer's window, soft-cap, scale and RoPE table, and GELU-tanh).
Gemma's local and global layers are separate KV groups (arch.kv_groups): forward() then gets one
AttentionMetadata per layer, the local layers' block tables holding only their window's blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels import native
from kernels.gguf_repack import NativeQ4, q4_to_float, q8_to_float
from kernels.quant import (NATIVE_MAX_K, Int4Weight, Int8Weight, Q8Weight, int4_linear, int4_supported, int8_linear,
                           quantize_int4, quantize_int8, quantize_q8)
from kernels.metadata import AttentionMetadata

from server.engine.models.arch import (  # noqa: F401 (the names other modules import from here)
    GEMMA_ACTIVATIONS, GEMMA_MODEL_TYPES, LAYER_TYPES, SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES, head_dim_of, is_gemma, is_supported, layer_types_of, layer_windows, rope_parameters,
    rotary_dim_of, sliding_window_of)
from server.engine.models.mla import MLAttention, is_mla
from server.engine.models.moe import SparseMoe, is_moe_layer, moe_settings


# A quantized layer multiplies at most this many rows with its int8/int4 weight and larger inputs
# (prefill chunks, big decode batches) with the float weight it keeps. NOTE: on this CPU torch's
# int8/int4 kernels top out at ~55 GFLOP/s while fp32 GEMM reaches ~100, so quantized weights only
# pay while a product is bound by reading the weights (bench/README.md, "Session 3: the native C++ decode step").
# The native int4 kernel (~165 GFLOP/s at 128 rows) is faster than fp32 GEMM at every size, so int4
# weights with the extension built ignore this limit (bench/README.md, "Session 4").
QUANTIZED_MAX_ROWS = 40


class Linear(nn.Module):
    """y = x W^T + b with uninitialised storage (weights are always loaded). `shard_sizes`
    lists the row counts of packed sub-matrices in order (e.g. q, k, v) for the loader. `keep_float`: never
    quantized (MLA's kv_b_proj, absorbed into per-head matrices)."""
    keep_float = False

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool = False):
        super().__init__()
        self.shard_sizes = shard_sizes
        self.weight = nn.Parameter(torch.empty(sum(shard_sizes), in_features), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(sum(shard_sizes)), requires_grad=False)
                     if bias else None)
        self.int8: Int8Weight | None = None
        self.int4: Int4Weight | None = None
        # a weight that only exists in a native kernel's layout (a GGUF tensor kept in its own precision)
        self.native: NativeQ4 | Q8Weight | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.native is not None:
            return self._native_forward(x)
        if self.int4 is not None and self.int4.q4_packed is not None and x.dtype == torch.float32 \
                and x.device.type == "cpu":
            ext = native.load()  # the native int4 kernel (int8 activations, AVX2), at every size
            if ext is not None:
                y = ext.q4_linear(x, self.int4.q4_packed, self.int4.q4_scale_min)
                return y if self.bias is None else y + self.bias
        if x.shape[0] <= QUANTIZED_MAX_ROWS or self.weight.numel() == 0:
            if self.int4 is not None:
                return int4_linear(x, self.int4, self.bias)
            if self.int8 is not None:
                return int8_linear(x, self.int8, self.bias)
        if self.weight.dtype != x.dtype:  # bf16 / fp16 weights as a checkpoint stores them
            y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def _native_forward(self, x: Tensor) -> Tensor:
        w = self.native
        ext = native.load() if x.dtype == torch.float32 and x.device.type == "cpu" else None
        if ext is not None:
            if isinstance(w, NativeQ4):
                y = ext.q4_linear(x, w.q4_packed, w.q4_scale_min)
            else:
                y = ext.q8_linear(x, w.qweight, w.scales)
                if y.shape[1] != w.out_features:
                    y = y[:, :w.out_features].contiguous()
        else:  # no extension: dequantise per call (correct, slow; never kept as a float copy)
            dense = q4_to_float(w) if isinstance(w, NativeQ4) else q8_to_float(w)
            y = F.linear(x.float(), dense.to(x.device)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def quantize(self, method: str, keep_float: bool = True) -> None:
        """Add the int8 or int4 form of the weight (a shape int4 cannot pack falls back to int8).
        keep_float=False frees the float weight: less memory, slower prefill."""
        if self.keep_float:
            return
        if method == "int4" and int4_supported(self.weight):
            self.int4 = quantize_int4(self.weight)
        else:
            self.int8 = quantize_int8(self.weight)
        if not keep_float:
            self.weight = nn.Parameter(torch.empty(0), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Fused residual: residual += x (in place), returns (norm(residual), residual)."""
        residual.add_(x)
        return self.forward(residual), residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x * (1 + weight), computed in fp32 and cast back as transformers does. unit_offset
    False: the weight already holds 1 + weight (a GGUF: llama.cpp's converter adds the 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.unit_offset = True

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() + 1.0 if self.unit_offset else self.weight.float()
        return F.rms_norm(x.float(), self.weight.shape, weight, self.eps).to(x.dtype)


def norm_class(config) -> type[RMSNorm]:
    return GemmaRMSNorm if is_gemma(config) else RMSNorm


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (HF layout) with a cos|sin cache (max_positions, head_dim) built once.
    `head_dim` is the rotated width (Phi-3's rotary_dim where only part of each head rotates).
    LongRoPE: the factors set chosen by `long_factors` (see the module docstring), and cos and sin
    both scaled by its attention_factor, as transformers scales them."""

    def __init__(self, head_dim: int, max_positions: int, params: dict, long_factors: bool = False):
        super().__init__()
        self.head_dim, self.max_positions, self.params = head_dim, max_positions, params
        self.long_factors = long_factors
        self.register_buffer("cos_sin_cache", self._compute_cache(), persistent=False)

    def rebuild(self, dtype: torch.dtype, device) -> None:
        """Recompute the cache after the module was materialised from the meta device."""
        self.cos_sin_cache = self._compute_cache(device).to(dtype)

    def _compute_cache(self, device=None) -> Tensor:
        inv_freq = rope_inv_freq(self.head_dim, self.params, device, self.long_factors)  # (D/2,)
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (P, D/2)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # (P, D)
        if self.params["rope_type"] in ("longrope", "yarn") and self.params["attention_factor"] != 1.0:
            cache = cache * self.params["attention_factor"]
        return cache

    def lookup(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # (T, D/2) each
        return cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, D/2)


def rope_inv_freq(head_dim: int, params: dict, device=None, long_factors: bool = False) -> Tensor:
    """Inverse frequencies for rope_type default / linear / llama3 / longrope (transformers' formulas)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponent)  # (D/2,)
    if params.get("freq_factors") is not None:  # a GGUF's rope_freqs tensor (Llama 3.1's scaling, precomputed)
        return inv_freq / torch.as_tensor(params["freq_factors"], dtype=torch.float32, device=device)
    rope_type = params["rope_type"]
    if rope_type == "longrope":
        ext = torch.tensor(params["long_factor" if long_factors else "short_factor"], dtype=torch.float32,
                           device=device)
        return 1.0 / (ext * params["rope_theta"] ** exponent)
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "yarn":
        return yarn_inv_freq(head_dim, params, device)
    if rope_type != "llama3":
        assert rope_type == "default", f"unsupported rope_type {rope_type}"
        return inv_freq
    factor, old_len = params["factor"], params["original_max_position_embeddings"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def yarn_inv_freq(head_dim: int, params: dict, device=None) -> Tensor:
    """YaRN's blend (transformers' _compute_yarn_parameters): interpolated frequencies (/ factor) for the
    dimensions whose wavelength exceeds the original context, the original ones for the fastest, and a
    linear ramp between the correction range given by beta_fast / beta_slow rotations."""
    base, factor, original = params["rope_theta"], params["factor"], params["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params["beta_fast"]), correction_dim(params["beta_slow"])
    if params["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp                                               # 1: keep the original frequency
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (T, H, D), cos/sin (T, 1, D/2) -> rotated (T, H, D), rotate-half convention. With cos/sin
    narrower than D/2 (partial rotary), only the first 2 * cos.shape[-1] dimensions rotate."""
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim != x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        gemma = is_gemma(config)
        self.scale = (config.query_pre_attn_scalar if gemma else self.head_dim) ** -0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention_bias = getattr(config, "attention_bias", False)
        qkv_bias = attention_bias or config.model_type == "qwen2" or (
            config.model_type == "qwen2_moe" and getattr(config, "qkv_bias", True))
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias)
        self.o_proj = Linear(q_size, [config.hidden_size], bias=attention_bias)
        self.layer_type = layer_types_of(config)[layer_idx]
        self.sliding_window = layer_windows(config)[layer_idx]
        # transformers applies attn_logit_softcapping in Gemma 2 only (Gemma 3's attention never passes it)
        self.softcap = (getattr(config, "attn_logit_softcapping", None) or None) if config.model_type == "gemma2" \
            else None
        self.has_qk_norm = config.model_type in ("qwen3", "qwen3_moe", "gemma3_text")
        if self.has_qk_norm:
            self.q_norm = norm_class(config)(self.head_dim, config.rms_norm_eps)
            self.k_norm = norm_class(config)(self.head_dim, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: tuple[Tensor, Tensor],
                meta: AttentionMetadata) -> Tensor:
        num_tokens = x.shape[0]
        num_qk_heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, num_qk_heads + self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            q = apply_rope(self.q_norm(qkv[:, :self.num_heads]), cos, sin)  # (T, Hq, D)
            k = apply_rope(self.k_norm(qkv[:, self.num_heads:num_qk_heads]), cos, sin)  # (T, Hkv, D)
        else:
            qk = apply_rope(qkv[:, :num_qk_heads], cos, sin)  # (T, Hq + Hkv, D), one op for both
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, num_qk_heads:]  # (T, Hkv, D)
        k_cache, v_cache = kv_cache
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, meta, self.scale, k, v,
                                      window=self.sliding_window, softcap=self.softcap)  # (T, Hq, D)
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = Linear(size, [config.hidden_size], bias=bias)
        # Gemma: GELU (tanh approximation for gelu_pytorch_tanh); SiLU otherwise
        self.gelu = GEMMA_ACTIVATIONS[config.hidden_activation] if is_gemma(config) else None

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (T, I) each
        act = F.silu(gate) if self.gelu is None else F.gelu(gate, approximate=self.gelu)
        return self.down_proj(act.mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx) if is_mla(config) else Attention(config, layer_idx)
        self.mlp = SparseMoe(config, MLP) if is_moe_layer(config, layer_idx) else MLP(config)
        self.input_layernorm = norm_class(config)(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm_class(config)(config.hidden_size, config.rms_norm_eps)

    def normed_input(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """The layer's input norm, fused with the residual add the previous layer left pending."""
        if residual is None:
            return self.input_layernorm(x), x
        return self.input_layernorm.add_forward(x, residual)

    def forward(self, x: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor,
                kv_cache: tuple[Tensor, Tensor], meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        x, residual = self.normed_input(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class GemmaDecoderLayer(DecoderLayer):
    """Gemma 2/3: the attention and MLP outputs are normed before their residual adds (post_attention_layernorm,
    post_feedforward_layernorm) and the MLP input by pre_feedforward_layernorm."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor,
                kv_cache: tuple[Tensor, Tensor], meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        x, residual = self.normed_input(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, meta))
        x, residual = self.pre_feedforward_layernorm.add_forward(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size),
                                                requires_grad=False)
        layer_cls = GemmaDecoderLayer if is_gemma(config) else DecoderLayer
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config)(config.hidden_size, config.rms_norm_eps)
        params = rope_parameters(config)
        # LongRoPE's factors, once per model (module docstring): long when a sequence may outgrow the original length
        long_factors = (params["rope_type"] == "longrope" and
                        min(max_positions, config.max_position_embeddings) > params["original_max_position_embeddings"])
        self.rotary_emb = RotaryEmbedding(rotary_dim_of(config), max_positions, params, long_factors)
        # Gemma 3: the local (sliding) layers' own RoPE table (rope_local_base_freq, no scaling)
        self.rotary_emb_local = None
        if config.model_type == "gemma3_text" and "sliding_attention" in layer_types_of(config):
            local = rope_parameters(config, "sliding_attention")
            if local != params:
                self.rotary_emb_local = RotaryEmbedding(rotary_dim_of(config), max_positions, local)

    def rebuild_rotary(self, dtype: torch.dtype, device) -> None:
        """Recompute every RoPE table after the model was materialised from the meta device."""
        self.rotary_emb.rebuild(dtype, device)
        if self.rotary_emb_local is not None:
            self.rotary_emb_local.rebuild(dtype, device)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (T,), positions (T,), kv_caches [(k_cache, v_cache)] per layer, meta)
    -> hidden (T, hidden_size); compute_logits(hidden (B, hidden)) -> (B, vocab) float32.
    meta: one AttentionMetadata for every layer, or a list of one per layer (KV groups: ModelRunner).
    The KV caches are written in place (each layer stores its new K/V at its meta.slot_mapping)."""
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, max_positions: int | None = None):
        super().__init__()
        self.config = config
        if is_mla(config):   # MLA's q_proj (no LoRA query) is its own projection, not a q|k|v shard
            self.packed_modules_mapping = {k: v for k, v in self.packed_modules_mapping.items()
                                           if v[0] != "qkv_proj"}
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Module()
        self.lm_head.weight = (self.model.embed_tokens.weight if self.tie_word_embeddings else
                               nn.Parameter(torch.empty(config.vocab_size, config.hidden_size),
                                            requires_grad=False))
        # what the C++ step computes exactly: the Llama layer with partial rotary and one window for every layer
        # (Phi-3), Gemma's differences, experts (every router, shared experts) and DeepSeek's latent attention; the
        # experts and MLA need their products in native kernels' layouts (checked when the step is built:
        # _native_model)
        gemma = is_gemma(config)
        # Gemma: with the GELU-tanh MLP (every released Gemma 2/3); the exact-GELU variant stays on PyTorch
        self.native_capable = not gemma or GEMMA_ACTIVATIONS[config.hidden_activation] == "tanh"
        self.native_reason = "Gemma's exact-GELU MLP"
        self.sliding_window = sliding_window_of(config)
        # Gemma: embeddings times sqrt(hidden_size); logits soft-capped (tanh(logits / cap) * cap)
        self.embed_scale = config.hidden_size ** 0.5 if gemma else None
        self.final_logit_softcapping = (getattr(config, "final_logit_softcapping", None) or None) if gemma else None

    # CPU fp32 steps (decode, prefill or mixed) run every layer in one C++ call (kernels/native.py)
    # unless this is False (or the model is not native_capable).
    native_step = True

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]],
                meta: AttentionMetadata | list[AttentionMetadata]) -> Tensor:
        metas = meta if isinstance(meta, list) else [meta] * len(kv_caches)
        embed = getattr(self, "embed_lookup", None)  # GGUF: rows dequantised from the file's own type
        x = embed(input_ids) if embed is not None else F.embedding(input_ids, self.model.embed_tokens.weight)
        if getattr(self, "embed_scale", None) is not None:   # Gemma: sqrt(hidden) rounded to the embedding's dtype
            x = x * torch.tensor(self.embed_scale).to(x.dtype)
        if x.dtype != self.model.norm.weight.dtype:   # bf16 weights as stored, fp32 compute
            x = x.to(self.model.norm.weight.dtype)
        native_model = self._native_model(x, kv_caches, metas[0])
        if native_model is not None:
            local = getattr(self.model, "rotary_emb_local", None)   # Gemma 3's local layers
            cos_sin = self.model.rotary_emb.cos_sin_cache
            # one block table for every layer (S, W), or one per layer (L, S, W)
            tables = meta.block_tables if not isinstance(meta, list) else torch.stack([m.block_tables for m in metas])
            return native_model.forward(x, positions, cos_sin, cos_sin if local is None else local.cos_sin_cache,
                                        kv_caches,  # final norm included
                                        tables, metas[0].token_rows, QUANTIZED_MAX_ROWS)  # (T, hidden)
        cos, sin = self.model.rotary_emb.lookup(positions)  # (T, 1, D/2), shared by every layer
        local = getattr(self.model, "rotary_emb_local", None)
        cos_sin_local = local.lookup(positions) if local is not None else (cos, sin)   # Gemma 3's local layers
        residual = None
        for layer, kv_cache, layer_meta in zip(self.model.layers, kv_caches, metas, strict=True):
            if local is not None and layer.self_attn.layer_type == "sliding_attention":
                x, residual = layer(x, residual, *cos_sin_local, kv_cache, layer_meta)
            else:
                x, residual = layer(x, residual, cos, sin, kv_cache, layer_meta)
        x, _ = self.model.norm.add_forward(x, residual)
        return x

    def quantize(self, method: str = "int8", keep_float: bool = True) -> None:
        """Weight-only int8 or int4 for every linear layer. The output layer is int8 either way (as
        llama.cpp keeps it at higher precision than the Q4 layers): per row for torch's kernel, and per
        group of 32 (Q8_0, what the default GGUF stores) for the native kernel; the embedding table used
        for lookups stays in float. keep_float: see Linear.quantize."""
        assert method in ("int8", "int4"), method
        self._native = None  # rebuilt with the quantized weights
        for module in self.modules():
            if isinstance(module, Linear):
                module.quantize(method, keep_float)
        self.quantize_head()

    def quantize_head(self) -> None:
        """The output layer's int8 forms (see quantize); the float weight stays (the tied embedding)."""
        self._native = None
        self._lm_head_int8 = quantize_int8(self.lm_head.weight)
        hidden = self.lm_head.weight.shape[1]
        self._lm_head_q8 = quantize_q8(self.lm_head.weight) if hidden % 32 == 0 and hidden <= NATIVE_MAX_K else None

    def _native_model(self, x: Tensor, kv_caches: list[tuple[Tensor, Tensor]], meta: AttentionMetadata):
        """The C++ model when this step can use it: fp32 on the CPU, extension built, and a model whose math the
        C++ step computes exactly (native_capable: partial rotary and Phi-3's sliding window included)."""
        if not (self.native_step and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] > 0
                and kv_caches[0][0].dtype == torch.float32):
            return None
        if not getattr(self, "native_capable", True):
            return None
        if getattr(self, "_native", None) is None:
            ext = native.load()
            if ext is None:
                self.native_step = False
                return None
            attn = self.model.layers[0].self_attn
            local_rope = getattr(self.model, "rotary_emb_local", None) is not None
            layers = [_native_layer(layer, local_rope) for layer in self.model.layers]
            if any(layer is None for layer in layers):   # experts not in a native layout (e.g. fp32 weights)
                self.native_capable = False
                self.native_reason = "mixture-of-experts layers whose experts are not GGUF / int4 weights"
                return None
            if isinstance(attn, MLAttention):   # one KV head of latent rows; RoPE on the rope dims
                heads, kv_heads, head_dim, rotary = attn.num_heads, 1, attn.rank + attn.rope, attn.rope
            else:
                heads, kv_heads, head_dim, rotary = (attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                                     rotary_dim_of(self.config))
            step = ext.NativeModel(layers, _norm_weight(self.model.norm), heads, kv_heads, head_dim,
                                   float(self.config.rms_norm_eps), rotary, getattr(self, "sliding_window", None) or 0)
            if isinstance(attn, MLAttention) and not step.team:   # latent attention: the team step only
                self.native_capable = False
                self.native_reason = "latent attention (MLA) whose projections are not all GGUF / int4 weights"
                return None
            self._native = step
        return self._native

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = self._logits(hidden)
        cap = getattr(self, "final_logit_softcapping", None)
        if cap is not None:   # Gemma: as transformers' ForCausalLM does after lm_head
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _logits(self, hidden: Tensor) -> Tensor:
        head = getattr(self, "lm_head_linear", None)  # GGUF: the output layer in a native layout
        if head is not None:
            return head(hidden).float()
        if getattr(self, "_lm_head_q8", None) is not None:  # native Q8_0: ~2x fp32 GEMM at any batch
            ext = native.load() if self.native_step and hidden.dtype == torch.float32 else None
            if ext is not None and hidden.device.type == "cpu":
                q8 = self._lm_head_q8
                logits = ext.q8_linear(hidden, q8.qweight, q8.scales)  # (B, vocab rounded up to 8)
                return logits if logits.shape[1] == q8.out_features else logits[:, :q8.out_features].contiguous()
        if getattr(self, "_lm_head_int8", None) is not None and hidden.shape[0] <= QUANTIZED_MAX_ROWS:
            return int8_linear(hidden, self._lm_head_int8).float()  # (B, vocab)
        if self.lm_head.weight.dtype != hidden.dtype:   # bf16 as stored (oneDNN; AMX where the CPU has it)
            return F.linear(hidden.to(self.lm_head.weight.dtype), self.lm_head.weight).float()
        if hidden.shape[0] <= 4 and hidden.device.type == "cpu":
            return torch.mm(hidden, self._lm_head_t()).float()  # (B, vocab)
        return F.linear(hidden, self.lm_head.weight).float()  # (B, vocab)

    def _lm_head_t(self) -> Tensor:
        """(hidden, vocab) contiguous copy of the output layer. NOTE: on CPU a 1-4 row product with
        the 49152x576 output layer runs ~2x faster this way than F.linear's transposed GEMM
        (measured 6.4 vs 12.2 ms at batch 1); larger batches are faster with F.linear."""
        if getattr(self, "_lm_head_t_cache", None) is None:
            self._lm_head_t_cache = self.lm_head.weight.t().contiguous()
        return self._lm_head_t_cache


def _native_linear(linear: Linear) -> tuple:
    """(weight, quant 0|1|2|3, q0, q1, group, bias, q4_packed, q4_scale_min) as kernels/csrc/cpu_model.cpp
    reads a Linear."""
    if isinstance(linear.native, NativeQ4):
        return linear.weight, 2, None, None, 32, linear.bias, linear.native.q4_packed, linear.native.q4_scale_min
    if linear.native is not None:
        q8 = linear.native
        return linear.weight, 3, q8.qweight, q8.scales, q8.out_features, linear.bias, None, None
    if linear.int4 is not None:
        q = linear.int4
        return linear.weight, 2, q.packed, q.scales_zeros, q.group_size, linear.bias, q.q4_packed, q.q4_scale_min
    if linear.int8 is not None:
        return linear.weight, 1, linear.int8.qweight, linear.int8.scales, 0, linear.bias, None, None
    return linear.weight, 0, None, None, 0, linear.bias, None, None


def _norm_weight(norm: RMSNorm) -> Tensor:
    """The weight an RMSNorm multiplies by: Gemma's 1 + weight (unless the file stores it so), fp32."""
    if isinstance(norm, GemmaRMSNorm) and norm.unit_offset:
        return (norm.weight.float() + 1.0).contiguous()
    return norm.weight.float().contiguous() if norm.weight.dtype != torch.float32 else norm.weight


def _native_layer(layer: DecoderLayer, local_rope: bool = False) -> tuple | None:
    """The layer as kernels/csrc/cpu_model.cpp's NativeModel reads it; None for experts it cannot run. Gemma:
    the MLP's input norm is pre_feedforward_layernorm, and post_attention / post_feedforward norm the outputs.
    MLA: the query product in qkv's place and the latent attention's own tuple last (kernels/csrc/mla.h)."""
    attn = layer.self_attn
    gemma = isinstance(layer, GemmaDecoderLayer)
    mlp_norm = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    if isinstance(attn, MLAttention):
        head = (_norm_weight(layer.input_layernorm), _norm_weight(mlp_norm), None, None,
                _native_linear(attn.q_b_proj if attn.q_lora_rank else attn.q_proj), _native_linear(attn.o_proj))
        mla = _native_mla(attn)
        if not isinstance(layer.mlp, SparseMoe):
            return head + (_native_linear(layer.mlp.gate_up_proj), _native_linear(layer.mlp.down_proj), None, None, mla)
        moe = _native_moe(layer.mlp)
        return None if moe is None else head + (None, None, moe, None, mla)
    q_norm, k_norm = (_norm_weight(attn.q_norm), _norm_weight(attn.k_norm)) if attn.has_qk_norm else (None, None)
    head = (_norm_weight(layer.input_layernorm), _norm_weight(mlp_norm), q_norm, k_norm,
            _native_linear(attn.qkv_proj), _native_linear(attn.o_proj))
    if gemma:
        extras = (_norm_weight(layer.post_attention_layernorm), _norm_weight(layer.post_feedforward_layernorm),
                  attn.sliding_window or 0, float(attn.softcap or 0.0), float(attn.scale),
                  local_rope and attn.layer_type == "sliding_attention", True)
        return head + (_native_linear(layer.mlp.gate_up_proj), _native_linear(layer.mlp.down_proj), None, extras)
    if not isinstance(layer.mlp, SparseMoe):
        return head + (_native_linear(layer.mlp.gate_up_proj), _native_linear(layer.mlp.down_proj))
    moe = _native_moe(layer.mlp)
    return None if moe is None else head + (None, None, moe)


SCORINGS = {"softmax": 0, "softmax_group": 1, "sigmoid_group": 2}   # kernels/csrc/moe.h's Scoring


def _native_moe(moe: SparseMoe) -> tuple | None:
    """(experts, router, top_k, normalize, routing) as kernels/csrc/moe.h's MoeExperts reads them (the shared
    expert and its gate inside routing), or None when some product is not in a native kernel's layout."""
    from server.engine.models.moe import _native_product

    experts, s = moe.native_experts(), moe.settings
    if experts is None:
        return None
    shared = gate = None
    if moe.shared_experts is not None:
        shared = (_native_product(moe.shared_experts.gate_up_proj), _native_product(moe.shared_experts.down_proj))
        if None in shared or getattr(moe.shared_experts, "gelu", None) is not None:
            return None
        if s["shared_gate"]:
            if not moe.shared_expert_gate.weight.numel():
                return None
            gate = moe.shared_expert_gate.weight.float().reshape(-1).contiguous()
    bias = moe.gate.e_score_correction_bias.float().contiguous() if s["score_bias"] else None
    routing = (SCORINGS[s["scoring"]], s["n_group"], s["topk_group"], s["scale"], bias, shared, gate)
    return experts, moe.gate.weight.float().contiguous(), s["top_k"], s["normalize"], routing


def _native_mla(attn: MLAttention) -> tuple:
    """(q_a | None, kv_a, (q_a_norm | None, kv_a_norm, W_uk, W_uv transposed, heads, nope, rope, rank, v, q_lora,
    scale, eps, interleaved)) as kernels/csrc/cpu_model.cpp reads a latent attention."""
    w_uk, w_uv = attn.absorbed()
    if not w_uv.transpose(1, 2).is_contiguous():   # W_uv kept transposed (rank, v) per head; the PyTorch path
        w_uv_t = w_uv.float().transpose(1, 2).contiguous()   # reads the same memory through a view
        attn._absorbed = w_uk, w_uv = w_uk, w_uv_t.transpose(1, 2)
    q_lora = attn.q_lora_rank or 0
    dims = (_norm_weight(attn.q_a_layernorm) if q_lora else None, _norm_weight(attn.kv_a_layernorm),
            w_uk.float().contiguous(), w_uv.transpose(1, 2), attn.num_heads, attn.nope, attn.rope, attn.rank,
            attn.v_dim, q_lora, float(attn.scale), float(attn.kv_a_layernorm.eps), bool(attn.interleaved))
    return (_native_linear(attn.q_a_proj) if q_lora else None, _native_linear(attn.kv_a_proj_with_mqa), dims)
