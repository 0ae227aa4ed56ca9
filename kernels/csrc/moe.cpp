// One mixture-of-experts feed-forward on the native int4 / int8 kernels, one call per layer
// (server/engine/models/moe.py SparseMoe.routed is the Python path and the oracle).
//
// Why: the Python loop issues ~10 ATen ops and two kernel calls per chosen expert; a decode step of a
// 128-expert model (8 per token) chooses ~50 experts per layer at 8 streams, and the glue then costs more
// than reading the experts' weights. Here the (token, slot) pairs are grouped by expert, each chosen expert's
// rows are gathered and rounded to int8 once, and every chosen expert's gate|up blocks run in one parallel
// loop (likewise the down blocks), so a layer costs two parallel regions whatever the number of experts.
//
// Weights: per expert gate_up (gate rows then up rows: 2 x I outputs) and down (H outputs), each either
// q4_linear's layout (packed, scale_min) or q8_linear's (qweight, scales), as kernels/quant.h describes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "quant.h"

namespace {

struct Product {           // one weight in a native layout
  bool q4 = true;          // int4 (a = packed, b = scale_min) or int8 (a = qweight, b = scales)
  at::Tensor a, b;
  int64_t n = 0;           // real output rows (int8 pads to a multiple of 8)

  int64_t blocks() const { return a.size(0); }
  int64_t k() const { return a.size(1) * berth::kGroup; }
  void run(const berth::QuantizedRows& qx, int64_t rows, float* y, int64_t begin, int64_t end) const {
    const int64_t ld = blocks() * berth::kBlockRows;
    if (q4) {
      berth::kernels().q4_blocks(a.data_ptr<uint8_t>(), b.data_ptr<at::Half>(), qx, k(), rows, y, ld, begin, end);
    } else {
      berth::kernels().q8_blocks(a.data_ptr<int8_t>(), b.data_ptr<at::Half>(), qx, k(), rows, y, ld, begin, end);
    }
  }
};

Product make_product(py::tuple t) {   // (is_q4, a, b, n)
  Product p;
  p.q4 = t[0].cast<bool>();
  p.a = t[1].cast<at::Tensor>();
  p.b = t[2].cast<at::Tensor>();
  p.n = t[3].cast<int64_t>();
  TORCH_CHECK(p.a.is_contiguous() && p.b.is_contiguous() && p.a.dim() == 4 &&
              p.a.scalar_type() == (p.q4 ? at::kByte : at::kChar) && p.b.scalar_type() == at::kHalf,
              "NativeMoe: a weight is not in a native layout");
  return p;
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

class NativeMoe {
 public:
  // experts: [(gate_up product, down product)] with the same shapes for every expert
  explicit NativeMoe(py::list experts) {
    for (auto item : experts) {
      py::tuple pair = item.cast<py::tuple>();
      gate_up_.push_back(make_product(pair[0].cast<py::tuple>()));
      down_.push_back(make_product(pair[1].cast<py::tuple>()));
    }
    TORCH_CHECK(!gate_up_.empty(), "NativeMoe: no experts");
    hidden_ = gate_up_[0].k();
    inter_ = gate_up_[0].n / 2;
    for (size_t e = 0; e < gate_up_.size(); ++e) {
      TORCH_CHECK(gate_up_[e].k() == hidden_ && gate_up_[e].n == 2 * inter_ && down_[e].k() == inter_ &&
                  down_[e].n == hidden_, "NativeMoe: experts of different shapes");
    }
  }

  // x (T, H) fp32, ids (T, k) int64, weights (T, k) fp32 -> (T, H): sum over each token's slots of
  // weight * down(silu(gate(x)) * up(x))
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in) const {
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) == hidden_,
                "NativeMoe: x must be (T, hidden) fp32");
    const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous(), weights = weights_in.to(at::kFloat).contiguous();
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == x.size(0) &&
                weights.sizes() == ids.sizes(), "NativeMoe: ids / weights must be (T, k)");
    const int64_t tokens = x.size(0), top_k = ids.size(1), num_experts = gate_up_.size();
    const int64_t* idp = ids.data_ptr<int64_t>();
    const float* wp = weights.data_ptr<float>();
    // (token, weight) lists per chosen expert, in token order
    std::vector<std::vector<int64_t>> rows_of(num_experts);
    std::vector<std::vector<float>> weight_of(num_experts);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t s = 0; s < top_k; ++s) {
        const int64_t e = idp[t * top_k + s];
        TORCH_CHECK(e >= 0 && e < num_experts, "NativeMoe: expert id out of range");
        rows_of[e].push_back(t);
        weight_of[e].push_back(wp[t * top_k + s]);
      }
    }
    std::vector<int64_t> chosen;
    for (int64_t e = 0; e < num_experts; ++e) if (!rows_of[e].empty()) chosen.push_back(e);
    const int64_t m = chosen.size();
    // each chosen expert's rows, rounded to int8 per group of 32
    std::vector<berth::QuantizedRows> qx(m);
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> gathered;
      for (int64_t c = begin; c < end; ++c) {
        const auto& rows = rows_of[chosen[c]];
        gathered.resize(rows.size() * hidden_);
        for (size_t r = 0; r < rows.size(); ++r) {
          std::copy(xp + rows[r] * hidden_, xp + (rows[r] + 1) * hidden_, gathered.begin() + r * hidden_);
        }
        qx[c] = berth::quantize_rows(gathered.data(), rows.size(), hidden_);
      }
    });
    // gate|up of every chosen expert: one loop over all their weight blocks
    std::vector<std::vector<float>> gu(m);
    std::vector<int64_t> first(m + 1, 0);
    for (int64_t c = 0; c < m; ++c) {
      const Product& p = gate_up_[chosen[c]];
      gu[c].resize(rows_of[chosen[c]].size() * p.blocks() * berth::kBlockRows);
      first[c + 1] = first[c] + p.blocks();
    }
    run_all(gate_up_, chosen, first, qx, rows_of, gu);
    // silu(gate) * up, rounded to int8 for the down products
    std::vector<berth::QuantizedRows> qh(m);
    at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> h;
      for (int64_t c = begin; c < end; ++c) {
        const int64_t rows = rows_of[chosen[c]].size(), ld = gate_up_[chosen[c]].blocks() * berth::kBlockRows;
        h.resize(rows * inter_);
        for (int64_t r = 0; r < rows; ++r) {
          const float* g = gu[c].data() + r * ld;
          for (int64_t i = 0; i < inter_; ++i) h[r * inter_ + i] = silu(g[i]) * g[inter_ + i];
        }
        qh[c] = berth::quantize_rows(h.data(), rows, inter_);
      }
    });
    std::vector<std::vector<float>> dn(m);
    for (int64_t c = 0; c < m; ++c) {
      const Product& p = down_[chosen[c]];
      dn[c].resize(rows_of[chosen[c]].size() * p.blocks() * berth::kBlockRows);
      first[c + 1] = first[c] + p.blocks();
    }
    run_all(down_, chosen, first, qh, rows_of, dn);
    // out[token] += weight * down row, experts in id order (as the Python path adds them)
    at::Tensor out = at::zeros({tokens, hidden_}, x.options());
    float* op = out.data_ptr<float>();
    at::parallel_for(0, hidden_, 256, [&](int64_t begin, int64_t end) {
      for (int64_t c = 0; c < m; ++c) {
        const int64_t e = chosen[c], ld = down_[e].blocks() * berth::kBlockRows;
        for (size_t r = 0; r < rows_of[e].size(); ++r) {
          const float w = weight_of[e][r];
          const float* d = dn[c].data() + r * ld;
          float* o = op + rows_of[e][r] * hidden_;
          for (int64_t j = begin; j < end; ++j) o[j] += w * d[j];
        }
      }
    });
    return out;
  }

  int64_t num_experts() const { return gate_up_.size(); }

 private:
  // products[chosen[c]] for every c, over the concatenated range of their weight blocks
  static void run_all(const std::vector<Product>& products, const std::vector<int64_t>& chosen,
                      const std::vector<int64_t>& first, const std::vector<berth::QuantizedRows>& q,
                      const std::vector<std::vector<int64_t>>& rows_of, std::vector<std::vector<float>>& y) {
    const int64_t m = chosen.size();
    at::parallel_for(0, first[m], 1, [&](int64_t begin, int64_t end) {
      int64_t c = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
      for (int64_t b = begin; b < end;) {
        while (b >= first[c + 1]) ++c;
        const int64_t stop = std::min(end, first[c + 1]);
        const int64_t e = chosen[c];
        products[e].run(q[c], rows_of[e].size(), y[c].data(), b - first[c], stop - first[c]);
        b = stop;
      }
    });
  }

  std::vector<Product> gate_up_, down_;
  int64_t hidden_ = 0, inter_ = 0;
};

}  // namespace

void register_moe(pybind11::module& m) {
  pybind11::class_<NativeMoe>(m, "NativeMoe")
      .def(pybind11::init<pybind11::list>(), "[(gate_up, down)] per expert, each (is_q4, a, b, n) in a native layout")
      .def("forward", &NativeMoe::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "x (T, H) fp32, ids (T, k) int64, weights (T, k) -> (T, H)")
      .def_property_readonly("num_experts", &NativeMoe::num_experts);
}
