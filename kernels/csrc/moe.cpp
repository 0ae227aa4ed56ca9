// Mixture-of-experts feed-forward on the native int4 / int8 kernels (moe.h: the phases; server/engine/models/moe.py
// SparseMoe.routed_torch is the Python path and the oracle).
//
// Why: the Python loop issues ~10 ATen ops and two kernel calls per chosen expert; a decode step of a
// 128-expert model (8 per token) chooses ~50 experts per layer at 8 streams, and the glue then costs more
// than reading the experts' weights. Here the (token, slot) pairs are grouped by expert, each chosen expert's
// rows are gathered and rounded to int8 once, and every chosen expert's gate|up blocks run in one loop over
// their concatenated weight blocks (likewise the down blocks). NativeMoe runs the phases as parallel loops
// (one call per layer); the native model step runs them inside its OpenMP team (cpu_model.cpp).
#include "moe.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace berth {
namespace {

// a . b over n floats (the router's logits: E x hidden per token, ~10% of a 512-token prefill if scalar)
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  total = _mm_cvtss_f32(s);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

}  // namespace

void Product::run(const QuantizedRows& qx, int64_t rows, float* y, int64_t begin, int64_t end) const {
  if (q4) {
    kernels().q4_blocks(a.data_ptr<uint8_t>(), b.data_ptr<at::Half>(), qx, k(), rows, y, width(), begin, end);
  } else {
    kernels().q8_blocks(a.data_ptr<int8_t>(), b.data_ptr<at::Half>(), qx, k(), rows, y, width(), begin, end);
  }
}

Product make_product(pybind11::tuple t) {
  Product p;
  p.q4 = t[0].cast<bool>();
  p.a = t[1].cast<at::Tensor>();
  p.b = t[2].cast<at::Tensor>();
  p.n = t[3].cast<int64_t>();
  TORCH_CHECK(p.a.is_contiguous() && p.b.is_contiguous() && p.a.dim() == 4 &&
              p.a.scalar_type() == (p.q4 ? at::kByte : at::kChar) && p.b.scalar_type() == at::kHalf,
              "MoE: an expert weight is not in a native layout");
  return p;
}

MoeExperts::MoeExperts(pybind11::list experts, pybind11::object router_obj, int64_t k, bool norm,
                       pybind11::object routing)
    : top_k(k), normalize(norm) {
  for (auto item : experts) {
    pybind11::tuple pair = item.cast<pybind11::tuple>();
    gate_up.push_back(make_product(pair[0].cast<pybind11::tuple>()));
    down.push_back(make_product(pair[1].cast<pybind11::tuple>()));
  }
  TORCH_CHECK(!gate_up.empty(), "MoE: no experts");
  routed = num_experts();
  hidden = gate_up[0].k();
  inter = gate_up[0].n / 2;
  for (size_t e = 0; e < gate_up.size(); ++e) {
    TORCH_CHECK(gate_up[e].k() == hidden && gate_up[e].n == 2 * inter && down[e].k() == inter &&
                down[e].n == hidden, "MoE: experts of different shapes");
  }
  if (!routing.is_none()) {
    pybind11::tuple r = routing.cast<pybind11::tuple>();
    const int64_t s = r[0].cast<int64_t>();
    TORCH_CHECK(s >= 0 && s <= 2, "MoE: unknown scoring");
    scoring = static_cast<Scoring>(s);
    n_group = r[1].cast<int64_t>();
    topk_group = r[2].cast<int64_t>();
    scale = static_cast<float>(r[3].cast<double>());
    if (!r[4].is_none()) score_bias = r[4].cast<at::Tensor>();
    if (!r[5].is_none()) {
      pybind11::tuple pair = r[5].cast<pybind11::tuple>();
      gate_up.push_back(make_product(pair[0].cast<pybind11::tuple>()));
      down.push_back(make_product(pair[1].cast<pybind11::tuple>()));
      const Product &gu = gate_up.back(), &dn = down.back();
      TORCH_CHECK(gu.k() == hidden && gu.n % 2 == 0 && dn.k() == gu.n / 2 && dn.n == hidden,
                  "MoE: the shared expert's shapes do not match");
    }
    if (!r[6].is_none()) shared_gate = r[6].cast<at::Tensor>();
    TORCH_CHECK(n_group > 0 && routed % n_group == 0 && topk_group > 0 && topk_group <= n_group,
                "MoE: expert groups do not divide the experts");
    TORCH_CHECK(!score_bias.defined() || (score_bias.scalar_type() == at::kFloat && score_bias.is_contiguous() &&
                score_bias.numel() == routed), "MoE: score bias must be (E,) fp32");
    TORCH_CHECK(!shared_gate.defined() || (has_shared() && shared_gate.scalar_type() == at::kFloat &&
                shared_gate.is_contiguous() && shared_gate.numel() == hidden), "MoE: shared gate must be (hidden,) fp32");
  }
  if (!router_obj.is_none()) {
    router = router_obj.cast<at::Tensor>();
    TORCH_CHECK(router.scalar_type() == at::kFloat && router.is_contiguous() && router.dim() == 2 &&
                router.size(0) == routed && router.size(1) == hidden, "MoE: router must be (E, hidden) fp32");
  }
  TORCH_CHECK(top_k > 0 && top_k <= (scoring == Scoring::kSoftmax ? routed : routed / n_group * topk_group),
              "MoE: top_k out of range");
}

MoeStep::MoeStep(const MoeExperts& m, int64_t tokens, int64_t top_k)
    : m_(m), tokens_(tokens), top_k_(top_k ? top_k : m.slots()), ids_(tokens * top_k_), weights_(tokens * top_k_),
      slots_(tokens) {}

// Per token, as transformers' routers compute it (server/engine/models/moe.py Router): softmax over the experts
// (DeepSeek V2's group_limited_greedy: only the topk_group groups whose best expert scores highest, the others 0),
// or DeepSeek V3's sigmoid scores chosen on score + bias within the topk_group groups whose two best sum highest;
// the top k (ties: the lower id first), renormalised when asked, times the routed scaling factor; then the shared
// expert's slot, weighing 1 or sigmoid(x . shared_gate).
void MoeStep::route(const float* x, int64_t r0, int64_t r1) {
  const int64_t E = m_.routed, H = m_.hidden, k = m_.top_k, slots = top_k_;
  const int64_t G = m_.n_group, per_group = E / G;
  const bool sigmoid = m_.scoring == Scoring::kSigmoidGroup, grouped = m_.scoring != Scoring::kSoftmax;
  const float* w = m_.router.data_ptr<float>();
  const float* bias = m_.score_bias.defined() ? m_.score_bias.data_ptr<float>() : nullptr;
  std::vector<float> p(E), choice(E), group_score(G);
  std::vector<int64_t> order(E), groups(G);
  for (int64_t t = r0; t < r1; ++t) {
    const float* row = x + t * H;
    float mx = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      const float s = dot(row, w + e * H, H);
      p[e] = s;
      mx = std::max(mx, s);
    }
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) {
        p[e] = 1.f / (1.f + std::exp(-p[e]));
        choice[e] = p[e] + (bias ? bias[e] : 0.f);
      }
    } else {
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - mx));
      for (int64_t e = 0; e < E; ++e) choice[e] = (p[e] /= sum);
    }
    if (grouped && m_.topk_group < G) {
      for (int64_t g = 0; g < G; ++g) {
        const float* c = choice.data() + g * per_group;
        if (sigmoid) {   // the sum of the group's two best
          float best = -INFINITY, second = -INFINITY;
          for (int64_t i = 0; i < per_group; ++i) {
            if (c[i] > best) { second = best; best = c[i]; } else if (c[i] > second) { second = c[i]; }
          }
          group_score[g] = per_group > 1 ? best + second : best;
        } else {
          group_score[g] = *std::max_element(c, c + per_group);
        }
      }
      std::iota(groups.begin(), groups.end(), 0);
      std::partial_sort(groups.begin(), groups.begin() + m_.topk_group, groups.end(), [&](int64_t a, int64_t b) {
        return group_score[a] > group_score[b] || (group_score[a] == group_score[b] && a < b);
      });
      std::vector<char> keep(G, 0);
      for (int64_t i = 0; i < m_.topk_group; ++i) keep[groups[i]] = 1;
      for (int64_t e = 0; e < E; ++e) {
        if (!keep[e / per_group]) choice[e] = sigmoid ? -INFINITY : 0.f;
      }
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
    });
    // the weights: the chosen experts' scores (V3: without the bias; V2: the group-masked softmax, equal)
    float kept = 0.f;
    for (int64_t s = 0; s < k; ++s) kept += sigmoid ? p[order[s]] : choice[order[s]];
    const float denom = sigmoid ? kept + 1e-20f : kept;
    for (int64_t s = 0; s < k; ++s) {
      const float v = sigmoid ? p[order[s]] : choice[order[s]];
      ids_[t * slots + s] = order[s];
      weights_[t * slots + s] = (m_.normalize ? v / denom : v) * m_.scale;
    }
    if (slots > k) {   // the shared expert
      ids_[t * slots + k] = E;
      weights_[t * slots + k] = m_.shared_gate.defined()
          ? 1.f / (1.f + std::exp(-dot(row, m_.shared_gate.data_ptr<float>(), H))) : 1.f;
    }
  }
}

void MoeStep::set_routes(const int64_t* ids, const float* weights) {
  std::copy(ids, ids + ids_.size(), ids_.begin());
  std::copy(weights, weights + weights_.size(), weights_.begin());
}

void MoeStep::group() {
  const int64_t E = m_.num_experts(), k = top_k_;
  std::vector<int64_t> index(E, -1);
  std::vector<int64_t> count(E, 0);
  for (int64_t i = 0; i < tokens_ * k; ++i) {
    TORCH_CHECK(ids_[i] >= 0 && ids_[i] < E, "MoE: expert id out of range");
    ++count[ids_[i]];
  }
  chosen_.clear();
  for (int64_t e = 0; e < E; ++e) {
    if (count[e]) {
      index[e] = static_cast<int64_t>(chosen_.size());
      chosen_.push_back(e);
    }
  }
  const int64_t m = num_chosen();
  rows_.assign(m, {});
  row_weights_.assign(m, {});
  for (int64_t t = 0; t < tokens_; ++t) {
    slots_[t].clear();
    for (int64_t s = 0; s < k; ++s) {
      const int64_t c = index[ids_[t * k + s]];
      slots_[t].emplace_back(c, static_cast<int64_t>(rows_[c].size()));
      rows_[c].push_back(t);
      row_weights_[c].push_back(weights_[t * k + s]);
    }
    std::sort(slots_[t].begin(), slots_[t].end());   // experts in id order, as the Python path adds them
  }
  gu_first_.assign(m + 1, 0);
  dn_first_.assign(m + 1, 0);
  gu_.assign(m, {});
  dn_.assign(m, {});
  for (int64_t c = 0; c < m; ++c) {
    const int64_t e = chosen_[c], rows = static_cast<int64_t>(rows_[c].size());
    gu_first_[c + 1] = gu_first_[c] + m_.gate_up[e].blocks();
    dn_first_[c + 1] = dn_first_[c] + m_.down[e].blocks();
    gu_[c].resize(rows * m_.gate_up[e].width());
    dn_[c].resize(rows * m_.down[e].width());
  }
  qx_.assign(m, {});
  qh_.assign(m, {});
}

void MoeStep::gather(const float* x, int64_t c0, int64_t c1) {
  const int64_t H = m_.hidden;
  std::vector<float> rows;
  for (int64_t c = c0; c < c1; ++c) {
    rows.resize(rows_[c].size() * H);
    for (size_t r = 0; r < rows_[c].size(); ++r) {
      std::copy(x + rows_[c][r] * H, x + (rows_[c][r] + 1) * H, rows.begin() + r * H);
    }
    qx_[c] = quantize_rows(rows.data(), rows_[c].size(), H);
  }
}

void MoeStep::blocks(const std::vector<Product>& products, const std::vector<int64_t>& first,
                     const std::vector<QuantizedRows>& q, std::vector<std::vector<float>>& y, int64_t b0, int64_t b1) {
  int64_t c = std::upper_bound(first.begin(), first.end(), b0) - first.begin() - 1;
  for (int64_t b = b0; b < b1;) {
    while (b >= first[c + 1]) ++c;
    const int64_t stop = std::min(b1, first[c + 1]);
    products[chosen_[c]].run(q[c], rows_[c].size(), y[c].data(), b - first[c], stop - first[c]);
    b = stop;
  }
}

void MoeStep::gate_up(int64_t b0, int64_t b1) { blocks(m_.gate_up, gu_first_, qx_, gu_, b0, b1); }
void MoeStep::down(int64_t b0, int64_t b1) { blocks(m_.down, dn_first_, qh_, dn_, b0, b1); }

void MoeStep::activate(int64_t c0, int64_t c1) {
  std::vector<float> h;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t rows = rows_[c].size(), ld = m_.gate_up[chosen_[c]].width(), I = m_.gate_up[chosen_[c]].n / 2;
    h.resize(rows * I);
    for (int64_t r = 0; r < rows; ++r) {
      const float* g = gu_[c].data() + r * ld;
      for (int64_t i = 0; i < I; ++i) h[r * I + i] = g[i] / (1.f + std::exp(-g[i])) * g[I + i];
    }
    qh_[c] = quantize_rows(h.data(), rows, I);
  }
}

void MoeStep::combine(float* y, int64_t r0, int64_t r1) const {
  const int64_t H = m_.hidden;
  for (int64_t t = r0; t < r1; ++t) {
    float* out = y + t * H;
    std::fill(out, out + H, 0.f);
    for (const auto& [c, r] : slots_[t]) {
      const float w = row_weights_[c][r];
      const float* d = dn_[c].data() + r * m_.down[chosen_[c]].width();
      for (int64_t i = 0; i < H; ++i) out[i] += w * d[i];
    }
  }
}

at::Tensor moe_parallel(MoeStep& s, const at::Tensor& x, bool route) {
  const int64_t T = x.size(0);
  const float* xp = x.data_ptr<float>();
  if (route) at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) { s.route(xp, b, e); });
  s.group();
  at::parallel_for(0, s.num_chosen(), 1, [&](int64_t b, int64_t e) { s.gather(xp, b, e); });
  at::parallel_for(0, s.gate_up_blocks(), 1, [&](int64_t b, int64_t e) { s.gate_up(b, e); });
  at::parallel_for(0, s.num_chosen(), 1, [&](int64_t b, int64_t e) { s.activate(b, e); });
  at::parallel_for(0, s.down_blocks(), 1, [&](int64_t b, int64_t e) { s.down(b, e); });
  at::Tensor out = at::empty({T, x.size(1)}, x.options());
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) { s.combine(out.data_ptr<float>(), b, e); });
  return out;
}

}  // namespace berth

namespace {

// the phases as parallel loops: one call per layer from Python (SparseMoe.routed)
class NativeMoe {
 public:
  explicit NativeMoe(pybind11::list experts) : m_(experts, pybind11::none(), 1, false) {}
  NativeMoe(pybind11::list experts, pybind11::object router, int64_t top_k, bool normalize, pybind11::object routing)
      : m_(experts, router, top_k, normalize, routing) {}

  // x (T, H) fp32, ids (T, k) int64, weights (T, k) fp32 -> (T, H)
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) == m_.hidden,
                "NativeMoe: x must be (T, hidden) fp32");
    const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous(), weights = weights_in.to(at::kFloat).contiguous();
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == x.size(0) &&
                weights.sizes() == ids.sizes(), "NativeMoe: ids / weights must be (T, k)");
    berth::MoeStep s(m_, x.size(0), ids.size(1));
    s.set_routes(ids.data_ptr<int64_t>(), weights.data_ptr<float>());
    return berth::moe_parallel(s, x, false);
  }

  // x (T, H) fp32 -> (T, H): routed here (route(): the router given at construction), shared expert included
  at::Tensor forward_routed(const at::Tensor& x_in) const {
    TORCH_CHECK(m_.router.defined(), "NativeMoe: built without a router");
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) == m_.hidden,
                "NativeMoe: x must be (T, hidden) fp32");
    const at::Tensor x = x_in.contiguous();
    berth::MoeStep s(m_, x.size(0));
    return berth::moe_parallel(s, x, true);
  }

  int64_t num_experts() const { return m_.num_experts(); }

 private:
  berth::MoeExperts m_;
};

}  // namespace

void register_moe(pybind11::module& m) {
  pybind11::class_<NativeMoe>(m, "NativeMoe")
      .def(pybind11::init<pybind11::list>(), "[(gate_up, down)] per expert, each (is_q4, a, b, n) in a native layout")
      .def(pybind11::init<pybind11::list, pybind11::object, int64_t, bool, pybind11::object>(),
           "experts, router (E, H) fp32, top_k, normalize, routing (moe.h MoeExperts): routes by itself")
      .def("forward_routed", &NativeMoe::forward_routed, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "x (T, H) fp32 -> (T, H), routed by the router given at construction")
      .def("forward", &NativeMoe::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "x (T, H) fp32, ids (T, k) int64, weights (T, k) -> (T, H)")
      .def_property_readonly("num_experts", &NativeMoe::num_experts);
}
