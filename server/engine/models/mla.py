"""Multi-head latent attention (DeepSeek V2 / V3) over berth's paged cache, keeping only the compressed KV.

Per token the cache holds one row of kv_lora_rank + qk_rope_head_dim values: the normed latent c (kv_a_layernorm
of the first kv_lora_rank outputs of kv_a_proj_with_mqa) and the rotated shared key k_pe. That row is a single
KV "head" (kv_layout: 1 head of kv_lora_rank + rope dims; the layer's key and value caches are the same tensor).
Attention runs in the latent space (the "absorbed" form, as vLLM and llama.cpp run MLA): kv_b_proj splits per
head into W_uk (nope dims x rank) and W_uv (v dims x rank); each head's query becomes [q_nope W_uk, q_pe], so its
score against a cached row [c, k_pe] is q_nope . (W_uk c) + q_pe . k_pe, exactly transformers' score against the
expanded keys; the attention output over the rows, cut to its first kv_lora_rank values, is sum(p c), and W_uv
turns it into the head's value output. So kernels.paged_attention (decode, prefill, chunked prefill over a cached
prefix) serves MLA unchanged, as multi-query attention with head size kv_lora_rank + rope dims.

RoPE on the rope dims is DeepSeek's interleaved layout (pairs (x0, x1), (x2, x3)...; V3 with rope_interleave
False: rotate-half): the pairs are gathered into halves first, the same for queries and keys, so scores are
unchanged. The softmax scale is qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import kernels
from kernels.metadata import AttentionMetadata


def is_mla(config) -> bool:
    return getattr(config, "model_type", None) in ("deepseek_v2", "deepseek_v3") and bool(
        getattr(config, "kv_lora_rank", None))


def mla_scale(config) -> float:
    from server.engine.models.arch import rope_parameters

    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        m = 0.1 * params["mscale_all_dim"] * math.log(params["factor"]) + 1.0 if params["factor"] > 1 else 1.0
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        from server.engine.models.llama import Linear, RMSNorm

        self.num_heads = config.num_attention_heads
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        self.interleaved = config.model_type == "deepseek_v2" or getattr(config, "rope_interleave", True)
        self.scale = mla_scale(config)
        bias = bool(getattr(config, "attention_bias", False))
        q_out = self.num_heads * (self.nope + self.rope)
        if self.q_lora_rank:
            self.q_a_proj = Linear(config.hidden_size, [self.q_lora_rank], bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)   # transformers' DeepseekV2RMSNorm default eps
            self.q_b_proj = Linear(self.q_lora_rank, [q_out])
        else:
            self.q_proj = Linear(config.hidden_size, [q_out])
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, [self.rank + self.rope], bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = Linear(self.rank, [self.num_heads * (self.nope + self.v_dim)])
        self.kv_b_proj.keep_float = True   # absorbed into per-head matrices, never quantized
        self.o_proj = Linear(self.num_heads * self.v_dim, [config.hidden_size], bias=bias)
        self.sliding_window, self.softcap, self.layer_type = None, None, "full_attention"
        self._absorbed: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: tuple[Tensor, Tensor],
                meta: AttentionMetadata) -> Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(t, self.num_heads, self.nope + self.rope)
        kv = self.kv_a_proj_with_mqa(x)                                           # (T, rank + rope)
        latent = torch.cat((self.kv_a_layernorm(kv[:, :self.rank]),
                            self._rope(kv[:, None, self.rank:], cos, sin)[:, 0]), dim=-1)[:, None]  # (T, 1, R + r)
        w_uk, w_uv = self.absorbed()
        q_latent = torch.einsum("thn,hnr->thr", q[..., :self.nope], w_uk.to(q.dtype))       # (T, H, rank)
        q_full = torch.cat((q_latent, self._rope(q[..., self.nope:], cos, sin)), dim=-1)   # (T, H, rank + rope)
        cache = kv_cache[0]
        cache.view(-1, 1, cache.shape[-1]).index_copy_(0, meta.slot_mapping, latent.to(cache.dtype))
        out = kernels.paged_attention(q_full, cache, cache, meta, self.scale, latent, latent)  # (T, H, rank + rope)
        heads = torch.einsum("thr,hvr->thv", out[..., :self.rank], w_uv.to(out.dtype))     # (T, H, v)
        return self.o_proj(heads.reshape(t, -1))

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (T, heads, rope) rotated; interleaved pairs are gathered into halves first (module docstring)."""
        if self.interleaved:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def absorbed(self) -> tuple[Tensor, Tensor]:
        """(W_uk (H, nope, rank), W_uv (H, v, rank)) from kv_b_proj, dense, built once (kv_b_proj's own weight,
        dequantised when it is kept in a quantized or native layout, is then dropped)."""
        if self._absorbed is None:
            w = dense_weight(self.kv_b_proj).view(self.num_heads, self.nope + self.v_dim, self.rank)
            self._absorbed = (w[:, :self.nope].contiguous(), w[:, self.nope:].contiguous())
            self.kv_b_proj.weight = nn.Parameter(torch.empty(0, device=w.device), requires_grad=False)
            self.kv_b_proj.native = None
        return self._absorbed


def dense_weight(linear) -> Tensor:
    """A Linear's weight as a float tensor, from whichever form it holds."""
    from kernels.gguf_repack import NativeQ4, q4_to_float, q8_to_float

    if linear.weight.numel():
        return linear.weight.float()
    if linear.native is not None:
        return q4_to_float(linear.native) if isinstance(linear.native, NativeQ4) else q8_to_float(linear.native)
    raise ValueError("kv_b_proj has no float or GGUF weight (it is never quantized: Linear.keep_float)")
