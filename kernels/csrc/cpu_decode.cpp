// One decode step of a Llama-family model on the CPU, every layer in one call.
//
// Why: at batch 1 the eager PyTorch forward issues ~45 ops per layer and spends about as long in
// per-op dispatch (~14 ms per step for SmolLM2-135M) as in the matmuls. Here the small work
// (RMSNorm, residual adds, RoPE, the KV store, decode attention over the paged cache, SiLU*up) is
// plain loops over fp32 rows, and only the linear layers go through ATen (fp32 GEMM or torch's int8
// and int4 weight-only kernels), so a step costs the matmuls plus a few microseconds per layer.
//
// Scope: pure decode batches (one new token per sequence), fp32 activations and KV cache in the
// (num_blocks, block_size, num_kv_heads, head_dim) layout of kernels/reference.py. Everything else
// (prefill, mixed batches, other dtypes) stays on the Python path, which is also the oracle the
// tests compare this against (kernels/native.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// A linear layer: the float weight (may be empty when quantized without keeping it) and, when
// quantized, its int8 (qweight, scales) or int4 (packed, scales_zeros, group) form.
struct Linear {
  at::Tensor weight;          // (N, K) fp32, or empty
  int64_t quant = 0;          // 0 none, 1 int8, 2 int4
  at::Tensor q0, q1;          // int8: qweight, scales; int4: packed, scales_zeros
  int64_t group = 0;
  at::Tensor bias;            // (N,) or undefined

  at::Tensor operator()(const at::Tensor& x, int64_t quantized_max_rows) const {
    at::Tensor y;
    bool use_quant = quant != 0 && (x.size(0) <= quantized_max_rows || weight.numel() == 0);
    if (use_quant && quant == 2) {
      y = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), q0, group, q1).to(at::kFloat);
    } else if (use_quant && quant == 1) {
      y = at::_weight_int8pack_mm(x.to(at::kBFloat16), q0, q1).to(at::kFloat);
    } else {
      return at::linear(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
    }
    if (bias.defined()) y.add_(bias);
    return y;
  }
};

Linear make_linear(py::tuple t) {
  // (weight, quant, q0, q1, group, bias): None where absent
  Linear lin;
  lin.weight = t[0].cast<at::Tensor>();
  lin.quant = t[1].cast<int64_t>();
  if (lin.quant != 0) {
    lin.q0 = t[2].cast<at::Tensor>();
    lin.q1 = t[3].cast<at::Tensor>();
    lin.group = t[4].cast<int64_t>();
  }
  if (!t[5].is_none()) lin.bias = t[5].cast<at::Tensor>();
  return lin;
}

struct Layer {
  at::Tensor input_norm, post_norm;   // (H,)
  at::Tensor q_norm, k_norm;          // (D,) for Qwen3, else undefined
  Linear qkv, o, gate_up, down;
};

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, rows of length n (same formula as HF LlamaRMSNorm)
inline void rms_norm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

// Rotate-half RoPE in place on one head: x1 = x[:D/2], x2 = x[D/2:]
inline void rope_row(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

class DecodeModel {
 public:
  DecodeModel(py::list layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)) {
    for (auto item : layers) {
      py::tuple t = item.cast<py::tuple>();  // (input_norm, post_norm, q_norm, k_norm, qkv, o, gate_up, down)
      Layer layer;
      layer.input_norm = t[0].cast<at::Tensor>();
      layer.post_norm = t[1].cast<at::Tensor>();
      if (!t[2].is_none()) {
        layer.q_norm = t[2].cast<at::Tensor>();
        layer.k_norm = t[3].cast<at::Tensor>();
      }
      layer.qkv = make_linear(t[4].cast<py::tuple>());
      layer.o = make_linear(t[5].cast<py::tuple>());
      layer.gate_up = make_linear(t[6].cast<py::tuple>());
      layer.down = make_linear(t[7].cast<py::tuple>());
      layers_.push_back(std::move(layer));
    }
  }

  // x (B, H) fp32 embeddings; positions (B,) int64; cos_sin (P, D) fp32; kv_caches: [(k, v)] per
  // layer; block_tables (B, max_blocks) int32; context_lens (B,) int32 (including the new token);
  // quantized_max_rows as models/llama.py's QUANTIZED_MAX_ROWS. Writes each layer's new K/V into the caches and returns the last residual sum (B, H), to which
  // the caller applies the final norm.
  at::Tensor forward(at::Tensor x, at::Tensor positions, at::Tensor cos_sin, py::list kv_caches,
                     at::Tensor block_tables, at::Tensor context_lens, int64_t quantized_max_rows) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (B, H) fp32");
    TORCH_CHECK(static_cast<size_t>(kv_caches.size()) == layers_.size(), "one (k, v) cache per layer");
    TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
                "block_tables and context_lens must be int32");
    TORCH_CHECK(positions.scalar_type() == at::kLong && cos_sin.scalar_type() == at::kFloat &&
                cos_sin.is_contiguous(), "positions int64, cos_sin contiguous fp32");
    at::NoGradGuard no_grad;
    quantized_max_rows_ = quantized_max_rows;
    const int64_t batch = x.size(0), hidden = x.size(1);
    const int64_t D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_, half = D / 2;
    const int64_t qkv_width = (Hq + 2 * Hkv) * D;
    auto bt = block_tables.contiguous();
    auto cl = context_lens.contiguous();
    auto pos = positions.contiguous();
    const int32_t* bt_p = bt.data_ptr<int32_t>();
    const int32_t* cl_p = cl.data_ptr<int32_t>();
    const int64_t* pos_p = pos.data_ptr<int64_t>();
    const int64_t max_blocks = bt.size(1);
    const float* cs_p = cos_sin.data_ptr<float>();
    const float scale = 1.f / std::sqrt(static_cast<float>(D));

    at::Tensor residual = x.clone();
    at::Tensor normed = at::empty_like(x);
    at::Tensor attn = at::empty({batch, Hq * D}, x.options());
    float* res_p = residual.data_ptr<float>();
    float* nrm_p = normed.data_ptr<float>();

    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      py::tuple kv = kv_caches[li].cast<py::tuple>();
      at::Tensor k_cache = kv[0].cast<at::Tensor>(), v_cache = kv[1].cast<at::Tensor>();
      TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous(), "fp32 contiguous KV cache");
      const int64_t block_size = k_cache.size(1);
      float* kc = k_cache.data_ptr<float>();
      float* vc = v_cache.data_ptr<float>();

      const float* w_in = L.input_norm.data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b)
        rms_norm_row(res_p + b * hidden, w_in, nrm_p + b * hidden, hidden, eps_);

      at::Tensor qkv = L.qkv(normed, quantized_max_rows_).contiguous();  // (B, (Hq + 2Hkv) D)
      float* qkv_p = qkv.data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b) {
        float* row = qkv_p + b * qkv_width;
        const float* cos = cs_p + pos_p[b] * D;
        const float* sin = cos + half;
        if (L.q_norm.defined()) {
          const float* qn = L.q_norm.data_ptr<float>();
          const float* kn = L.k_norm.data_ptr<float>();
          for (int64_t h = 0; h < Hq; ++h) rms_norm_row(row + h * D, qn, row + h * D, D, eps_);
          for (int64_t h = Hq; h < Hq + Hkv; ++h) rms_norm_row(row + h * D, kn, row + h * D, D, eps_);
        }
        for (int64_t h = 0; h < Hq + Hkv; ++h) rope_row(row + h * D, cos, sin, half);
        // store this token's K and V at its slot
        const int64_t p = cl_p[b] - 1;
        const int64_t slot = static_cast<int64_t>(bt_p[b * max_blocks + p / block_size]) * block_size + p % block_size;
        std::copy(row + Hq * D, row + (Hq + Hkv) * D, kc + slot * Hkv * D);
        std::copy(row + (Hq + Hkv) * D, row + (Hq + 2 * Hkv) * D, vc + slot * Hkv * D);
      }

      decode_attention(qkv_p, qkv_width, kc, vc, bt_p, max_blocks, cl_p, block_size, batch, scale,
                       attn.data_ptr<float>());

      at::Tensor o = L.o(attn, quantized_max_rows_).contiguous();  // (B, H)
      residual.add_(o);
      const float* w_post = L.post_norm.data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b)
        rms_norm_row(res_p + b * hidden, w_post, nrm_p + b * hidden, hidden, eps_);

      at::Tensor gu = L.gate_up(normed, quantized_max_rows_).contiguous();  // (B, 2I)
      const int64_t inter = gu.size(1) / 2;
      at::Tensor act = at::empty({batch, inter}, x.options());
      const float* gu_p = gu.data_ptr<float>();
      float* act_p = act.data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b) {
        const float* g = gu_p + b * 2 * inter;
        const float* u = g + inter;
        float* a = act_p + b * inter;
        for (int64_t i = 0; i < inter; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
      }
      residual.add_(L.down(act, quantized_max_rows_));
    }
    return residual;
  }

 private:
  // Each (sequence, kv head) pair attends with its `group` query heads over the context in the paged
  // cache: scores, a max-subtracted softmax, then the weighted sum of values.
  void decode_attention(const float* qkv, int64_t qkv_width, const float* kc, const float* vc,
                        const int32_t* bt, int64_t max_blocks, const int32_t* cl, int64_t block_size,
                        int64_t batch, float scale, float* out) const {
    const int64_t D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_, group = Hq / Hkv;
    at::parallel_for(0, batch * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      std::vector<float> acc(group * D);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / Hkv, h = idx % Hkv, len = cl[b];
        const float* q = qkv + b * qkv_width + h * group * D;  // this kv head's `group` query heads
        scores.assign(group * len, 0.f);
        for (int64_t j = 0; j < len; ++j) {
          const int64_t slot = static_cast<int64_t>(bt[b * max_blocks + j / block_size]) * block_size + j % block_size;
          const float* k = kc + (slot * Hkv + h) * D;
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = q + g * D;
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
            scores[g * len + j] = dot * scale;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          float* s = scores.data() + g * len;
          const float mx = *std::max_element(s, s + len);
          float total = 0.f;
          for (int64_t j = 0; j < len; ++j) { s[j] = std::exp(s[j] - mx); total += s[j]; }
          const float inv = 1.f / total;
          for (int64_t j = 0; j < len; ++j) s[j] *= inv;
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < len; ++j) {
          const int64_t slot = static_cast<int64_t>(bt[b * max_blocks + j / block_size]) * block_size + j % block_size;
          const float* v = vc + (slot * Hkv + h) * D;
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + j];
            float* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
          }
        }
        std::copy(acc.begin(), acc.end(), out + (b * Hq + h * group) * D);
      }
    });
  }

  std::vector<Layer> layers_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  float eps_;
  int64_t quantized_max_rows_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<py::list, int64_t, int64_t, int64_t, double>())
      .def("forward", &DecodeModel::forward);
}
