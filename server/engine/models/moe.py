"""Mixture-of-experts feed-forward blocks: Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek V2/V3, as transformers computes them.

    moe = SparseMoe(config, mlp_cls)        # where is_moe_layer(config, layer_idx)
    y = moe(x)                              # x (T, hidden) -> (T, hidden)

A router scores every expert per token and keeps the top k (weights, ids); the batch is then grouped by expert:
the (token, slot) pairs are sorted by expert id, and each expert some token chose runs once on all its tokens
(one gate_up and one down product per chosen expert, whatever the batch); experts no token chose are never
read. The experts are ordinary `MLP`s, so their `Linear` weights take every serving format (float, int8/int4,
a GGUF quant type on the native kernels). Routing per family (the `scoring` of moe_settings):
- "softmax" (Mixtral, Qwen2/3-MoE): softmax over the experts, top k, renormalised when norm_topk_prob (Mixtral
  always).
- "softmax_group" (DeepSeek V2): softmax; topk_method "group_limited_greedy" first keeps the topk_group groups
  whose best expert scores highest; weights times routed_scaling_factor, not renormalised.
- "sigmoid_group" (DeepSeek V3, "noaux_tc"): sigmoid scores; experts are chosen on score + e_score_correction_bias,
  groups ranked by the sum of their two best; weights are the plain scores of the chosen experts, renormalised
  when norm_topk_prob, times routed_scaling_factor.
Shared experts (Qwen2-MoE's one, gated by sigmoid(shared_expert_gate(x)); DeepSeek's n_shared_experts, ungated)
run on every token and add to the routed output.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def moe_settings(config) -> dict | None:
    """The MoE fields of a config, read the same way for every family; None for a dense model."""
    mt = getattr(config, "model_type", "")
    num_experts = next((getattr(config, k) for k in ("n_routed_experts", "num_local_experts", "num_experts")
                        if getattr(config, k, None)), 0)
    if mt not in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3") or not num_experts:
        return None
    deepseek = mt.startswith("deepseek")
    if mt == "deepseek_v3":
        scoring = "sigmoid_group"
    elif deepseek:
        scoring = "softmax_group" if getattr(config, "topk_method", "greedy") == "group_limited_greedy" else "softmax"
    else:
        scoring = "softmax"
    shared = 0
    if mt == "qwen2_moe":
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
    elif deepseek:
        shared = (getattr(config, "n_shared_experts", 0) or 0) * config.moe_intermediate_size
    return {
        "num_experts": int(num_experts), "top_k": int(config.num_experts_per_tok),
        "intermediate_size": getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
        "scoring": scoring,
        # Mixtral always renormalises; DeepSeek V2's transformers router never does (whatever norm_topk_prob says)
        "normalize": (mt == "mixtral" or (mt != "deepseek_v2" and bool(getattr(config, "norm_topk_prob", False)))),
        "scale": float(getattr(config, "routed_scaling_factor", 1.0) or 1.0) if deepseek else 1.0,
        "n_group": getattr(config, "n_group", None) or 1, "topk_group": getattr(config, "topk_group", None) or 1,
        "shared_intermediate_size": shared, "shared_gate": mt == "qwen2_moe" and shared > 0,
        "score_bias": mt == "deepseek_v3",
    }


def is_moe_layer(config, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has experts: Mixtral every layer; Qwen-MoE unless in mlp_only_layers, every
    decoder_sparse_step-th layer; DeepSeek from first_k_dense_replace on."""
    settings = moe_settings(config)
    if settings is None:
        return False
    mt = config.model_type
    if mt.startswith("deepseek"):
        return layer_idx >= (getattr(config, "first_k_dense_replace", 0) or 0)
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and (layer_idx + 1) % step == 0
    return True


class Router(nn.Module):
    """gate.weight (E, hidden) -> per token the top-k expert ids and their weights (moe_settings' scoring)."""

    def __init__(self, config, settings: dict):
        super().__init__()
        self.settings = settings
        self.weight = nn.Parameter(torch.empty(settings["num_experts"], config.hidden_size), requires_grad=False)
        if settings["score_bias"]:
            self.e_score_correction_bias = nn.Parameter(torch.empty(settings["num_experts"]), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (T, hidden) -> (weights (T, k) float32, ids (T, k) int64)."""
        s = self.settings
        if s["scoring"] == "softmax" and self.weight.dtype == x.dtype:
            logits = torch.nn.functional.linear(x, self.weight).float()   # as transformers: in the model's dtype
        else:
            logits = torch.nn.functional.linear(x.float(), self.weight.float())   # DeepSeek: float32 routers
        k = s["top_k"]
        if s["scoring"] == "sigmoid_group":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            ids = _group_limited(choice, s, lambda g: g.topk(2, dim=-1)[0].sum(dim=-1), float("-inf")).topk(k, dim=-1)[1]
            weights = scores.gather(1, ids)
            if s["normalize"]:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1)
            if s["scoring"] == "softmax_group":
                scores = _group_limited(scores, s, lambda g: g.max(dim=-1).values, 0.0)
            weights, ids = scores.topk(k, dim=-1)
            if s["normalize"]:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * s["scale"], ids


def _group_limited(scores: Tensor, s: dict, group_score, fill: float) -> Tensor:
    """scores (T, E) with the experts outside each token's topk_group best groups set to `fill`."""
    t, e = scores.shape
    groups = scores.view(t, s["n_group"], e // s["n_group"])
    best = group_score(groups).topk(s["topk_group"], dim=-1)[1]            # (T, topk_group)
    keep = torch.zeros(t, s["n_group"], dtype=torch.bool, device=scores.device).scatter_(1, best, True)
    return scores.masked_fill(~keep[:, :, None].expand_as(groups).reshape(t, e), fill)


class SparseMoe(nn.Module):
    """The routed experts (and shared experts) of one layer; `mlp_cls(config, intermediate_size)` builds each."""

    def __init__(self, config, mlp_cls):
        super().__init__()
        s = self.settings = moe_settings(config)
        self.gate = Router(config, s)
        self.experts = nn.ModuleList(mlp_cls(config, s["intermediate_size"]) for _ in range(s["num_experts"]))
        self.shared_experts = mlp_cls(config, s["shared_intermediate_size"]) if s["shared_intermediate_size"] else None
        if s["shared_gate"]:
            from server.engine.models.llama import Linear

            self.shared_expert_gate = Linear(config.hidden_size, [1])

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.gate(x)
        out = self.routed(x, weights, ids)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.settings["shared_gate"]:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def routed(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Sum over each token's chosen experts of weight * expert(x), one product per chosen expert: in one
        native call (kernels/csrc/moe.cpp) when every expert is in a native kernel's layout, else below."""
        native_moe = self._native_moe(x)
        if native_moe is not None:
            return native_moe.forward(x, ids, weights)
        return self.routed_torch(x, weights, ids)

    use_native = True   # False: always the PyTorch loop (the oracle the native call is tested against)

    def _native_moe(self, x: Tensor):
        """The native MoE for fp32 CPU activations when every expert's products are native int4/int8 (GGUF types,
        or --quantization int4's native layout), SiLU-gated and bias-free; else None (decided once)."""
        if not (self.use_native and x.dtype == torch.float32 and x.device.type == "cpu"):
            return None
        cached = getattr(self, "_native", False)
        if cached is False:
            cached = self._native = _build_native(self)
        return cached

    def native_experts(self) -> list | None:
        """[(gate_up, down)] of every expert in a native kernel's layout (_native_product), or None."""
        pairs = [(_native_product(e.gate_up_proj), _native_product(e.down_proj)) for e in self.experts]
        if any(a is None or b is None for a, b in pairs) or any(getattr(e, "gelu", None) is not None
                                                                for e in self.experts):
            return None
        return pairs

    def routed_torch(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)                                     # (T*k,) slots grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        slot_weights = weights.reshape(-1).to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if not n:
                continue
            slots = order[start:start + n]
            start += n
            tokens = slots // k
            y = self.experts[expert](x.index_select(0, tokens))
            out.index_add_(0, tokens, y * slot_weights.index_select(0, slots)[:, None])
        return out


def _native_product(linear) -> tuple | None:
    """(is_q4, a, b, n) of a Linear held in a native kernel's layout, else None."""
    from kernels.gguf_repack import NativeQ4

    if linear.bias is not None:
        return None
    w = linear.native
    if isinstance(w, NativeQ4):
        return True, w.q4_packed, w.q4_scale_min, w.out_features
    if w is not None:
        return False, w.qweight, w.scales, w.out_features
    q = linear.int4
    if q is not None and q.q4_packed is not None:
        return True, q.q4_packed, q.q4_scale_min, q.q4_packed.shape[0] * 8   # int4 needs N % 16 == 0: no padding
    return None


def _build_native(moe: SparseMoe):
    from kernels import native

    ext = native.load()
    pairs = moe.native_experts() if ext is not None else None
    return None if pairs is None else ext.NativeMoe(pairs)
