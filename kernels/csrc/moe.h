// Mixture-of-experts feed-forward on the native int4 / int8 kernels (moe.cpp), in phases that a caller runs
// either as parallel loops (NativeMoe: one call per layer) or split across the threads of the native step's
// team (cpu_model.cpp NativeModel::forward_team, separated by its barriers). Every phase takes a range of
// its items, so each item is computed by exactly one thread in the same order whatever the split.
//
//   MoeStep s(experts, tokens);
//   s.route(x, r0, r1)      rows: router scores (softmax, or DeepSeek's group-limited softmax / sigmoid), top-k,
//                           renormalised and scaled per the family, plus the shared expert's slot (or
//                           s.set_routes(ids, weights))
//   s.group()               serial: (token, slot) pairs grouped by expert, in expert id order
//   s.gather(x, c0, c1)     chosen experts: their rows, rounded to int8 per group of 32
//   s.gate_up(b0, b1)       weight blocks of every chosen expert's gate|up, concatenated
//   s.activate(c0, c1)      chosen experts: silu(gate) * up, rounded to int8
//   s.down(b0, b1)          weight blocks of every chosen expert's down product
//   s.combine(y, r0, r1)    rows: y[t] = sum over t's slots of weight * down row, experts in id order
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "quant.h"

namespace berth {

struct Product {           // one weight in a native layout
  bool q4 = true;          // int4 (a = packed, b = scale_min) or int8 (a = qweight, b = scales)
  at::Tensor a, b;
  int64_t n = 0;           // real output rows (int8 pads to a multiple of 8)

  int64_t blocks() const { return a.size(0); }
  int64_t width() const { return blocks() * kBlockRows; }   // output columns written, padding included
  int64_t k() const { return a.size(1) * kGroup; }
  void run(const QuantizedRows& qx, int64_t rows, float* y, int64_t begin, int64_t end) const;
};

Product make_product(pybind11::tuple t);   // (is_q4, a, b, n)

// How route() scores and picks experts (server/engine/models/moe.py's moe_settings, as transformers routes)
enum class Scoring { kSoftmax = 0, kSoftmaxGroup = 1, kSigmoidGroup = 2 };

struct MoeExperts {
  // per expert: gate rows then up rows (2 x its inter), and down (hidden); the shared expert, when the model
  // has one (Qwen2-MoE's, DeepSeek's n_shared_experts as one MLP), is the last entry, past the routed ones
  std::vector<Product> gate_up, down;
  at::Tensor router;                    // (E, hidden) fp32 for route(), or undefined
  int64_t hidden = 0, inter = 0, top_k = 0, routed = 0;
  bool normalize = false;               // renormalise the top-k weights to sum to 1
  Scoring scoring = Scoring::kSoftmax;
  int64_t n_group = 1, topk_group = 1;  // DeepSeek: experts only from each token's topk_group best groups
  float scale = 1.f;                    // routed_scaling_factor
  at::Tensor score_bias;                // (E,) fp32, DeepSeek V3's e_score_correction_bias (choice only)
  at::Tensor shared_gate;               // (hidden,) fp32: the shared expert weighs sigmoid(x . gate) (Qwen2-MoE)

  // experts: [(gate_up, down)] products; router may be None (the caller routes); routing: None (softmax top-k)
  // or (scoring, n_group, topk_group, scale, score_bias | None, shared (gate_up, down) | None, shared_gate | None)
  MoeExperts(pybind11::list experts, pybind11::object router, int64_t top_k, bool normalize,
             pybind11::object routing = pybind11::none());
  int64_t num_experts() const { return static_cast<int64_t>(gate_up.size()); }
  bool has_shared() const { return num_experts() > routed; }
  int64_t slots() const { return top_k + (has_shared() ? 1 : 0); }   // per token, the shared expert's included
};

class MoeStep {
 public:
  // top_k: slots per token (0: the experts' own slots(), which route() fills)
  MoeStep(const MoeExperts& m, int64_t tokens, int64_t top_k = 0);
  void route(const float* x, int64_t r0, int64_t r1);
  void set_routes(const int64_t* ids, const float* weights);
  void group();
  int64_t num_chosen() const { return static_cast<int64_t>(chosen_.size()); }
  void gather(const float* x, int64_t c0, int64_t c1);
  int64_t gate_up_blocks() const { return gu_first_.back(); }
  void gate_up(int64_t b0, int64_t b1);
  void activate(int64_t c0, int64_t c1);
  int64_t down_blocks() const { return dn_first_.back(); }
  void down(int64_t b0, int64_t b1);
  void combine(float* y, int64_t r0, int64_t r1) const;

 private:
  void blocks(const std::vector<Product>& products, const std::vector<int64_t>& first,
              const std::vector<QuantizedRows>& q, std::vector<std::vector<float>>& y, int64_t b0, int64_t b1);

  const MoeExperts& m_;
  int64_t tokens_, top_k_;
  std::vector<int64_t> ids_;                  // (T, k) expert per slot
  std::vector<float> weights_;                // (T, k)
  std::vector<int64_t> chosen_;               // expert ids with tokens, ascending
  std::vector<std::vector<int64_t>> rows_;    // per chosen expert: its tokens, ascending
  std::vector<std::vector<float>> row_weights_;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> slots_;   // per token: (chosen index, row) ascending
  std::vector<int64_t> gu_first_, dn_first_;  // prefix sums of the chosen experts' weight blocks
  std::vector<QuantizedRows> qx_, qh_;
  std::vector<std::vector<float>> gu_, dn_;
};

// Every phase as a parallel loop over x (T, hidden) fp32 (rows already routed unless `route`) -> (T, hidden)
at::Tensor moe_parallel(MoeStep& s, const at::Tensor& x, bool route);

}  // namespace berth
