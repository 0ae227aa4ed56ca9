// One forward step of a Llama-family model on the CPU, every layer in one call: decode rows, prefill
// chunks (over a cached prefix or not) and mixed batches of both.
//
// Why: at batch 1 the eager PyTorch forward issues ~45 ops per layer and spends about as long in
// per-op dispatch (~14 ms per step for SmolLM2-135M) as in the matmuls; a 128-token prefill spent ~70
// of its ~240 ms outside the matmuls. Here the small work (RMSNorm, residual adds, RoPE, the KV store,
// causal attention over the paged cache, SiLU*up) is plain loops over fp32 rows, and only the linear
// layers go through ATen (fp32 GEMM or torch's int8 and int4 weight-only kernels) or our int4 kernel,
// so a step costs the matmuls plus a few microseconds per layer. When every product is our int4 kernel
// the whole step runs as one OpenMP team (NativeModel::forward_team): the server's passive OpenMP
// threads are then woken once per step, not once per parallel op.
//
// Scope: fp32 activations and KV cache in the (num_blocks, block_size, num_kv_heads, head_dim) layout
// of kernels/reference.py. Each token attends to its own sequence's keys 0..position (the new keys of
// the step are stored first). Other dtypes and devices stay on the Python path, which is also the
// oracle the tests compare this against (kernels/native.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BERTH_AVX2 1
#endif

#include "mla.h"
#include "moe.h"
#include "quant.h"
#include "rows.h"

namespace {

using berth::kBlockRows;
using berth::kGroup;
using berth::kMaxGroups;
using berth::QuantizedRows;
using berth::quantize_range;
using berth::quantize_rows;
using berth::rms_norm_row;
using berth::rope_row;

// the block kernels this CPU runs (quant.h, dispatch.cpp)
inline void q4_blocks(const uint8_t* packed, const at::Half* scale_min, const QuantizedRows& qx, int64_t k,
                      int64_t rows, float* y, int64_t n, int64_t begin, int64_t end) {
  berth::kernels().q4_blocks(packed, scale_min, qx, k, rows, y, n, begin, end);
}
inline void q8_blocks(const int8_t* qweight, const at::Half* scales, const QuantizedRows& qx, int64_t k,
                      int64_t rows, float* y, int64_t n, int64_t begin, int64_t end) {
  berth::kernels().q8_blocks(qweight, scales, qx, k, rows, y, n, begin, end);
}

#ifdef BERTH_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#ifdef BERTH_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  total = hsum(acc);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef BERTH_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}



// x (M, K) fp32, qweight (N / 8, K / 32, 8, 32) int8, scales (N / 8, K / 32, 8) fp16 -> (M, N) fp32
at::Tensor q8_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "q8_linear: x must be (M, K) fp32");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.dim() == 4 &&
              scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3, "q8_linear: bad weight");
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(1), blocks = qweight.size(0), groups = k / kGroup, rows = x.size(0);
  TORCH_CHECK(k % kGroup == 0 && groups <= kMaxGroups && qweight.size(1) == groups && qweight.size(2) == 8 &&
              qweight.size(3) == 32 && scales.size(0) == blocks && scales.size(1) == groups &&
              scales.size(2) == kBlockRows, "q8_linear: shapes do not match");
  const QuantizedRows qx = quantize_rows(x.data_ptr<float>(), rows, k);
  at::Tensor y = at::empty({rows, blocks * kBlockRows}, x.options());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    q8_blocks(qweight.data_ptr<int8_t>(), scales.data_ptr<at::Half>(), qx, k, rows, y.data_ptr<float>(),
              blocks * kBlockRows, begin, end);
  });
  return y;
}

// x (M, K) fp32, packed (N / 8, K / 32, 4, 32) uint8, scale_min (N / 8, K / 32, 2, 8) fp16 -> (M, N) fp32
at::Tensor q4_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale_min) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "q4_linear: x must be (M, K) fp32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 4 &&
              scale_min.scalar_type() == at::kHalf && scale_min.is_contiguous() && scale_min.dim() == 4,
              "q4_linear: bad weight");
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(1), blocks = packed.size(0), groups = k / kGroup, rows = x.size(0);
  TORCH_CHECK(k % kGroup == 0 && groups <= kMaxGroups && packed.size(1) == groups && packed.size(2) == 4 &&
              packed.size(3) == 32 && scale_min.size(0) == blocks && scale_min.size(1) == groups &&
              scale_min.size(2) == 2 && scale_min.size(3) == kBlockRows, "q4_linear: shapes do not match");
  const QuantizedRows qx = quantize_rows(x.data_ptr<float>(), rows, k);
  at::Tensor y = at::empty({rows, blocks * kBlockRows}, x.options());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    q4_blocks(packed.data_ptr<uint8_t>(), scale_min.data_ptr<at::Half>(), qx, k, rows, y.data_ptr<float>(),
              blocks * kBlockRows, begin, end);
  });
  return y;
}

// Row-wise argmax of x (B, V) fp32 -> (B,) int64, as torch.argmax: the first index of the maximum,
// and the first NaN when a row has one. torch's CPU argmax is scalar (~58 us per 49152-entry row here,
// ~0.5 ms at batch 16); this keeps 8 running maxima and their first indices.
int64_t first_nan(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) if (std::isnan(x[j])) return j;
  return -1;
}

int64_t argmax_row(const float* x, int64_t n) {
  int64_t i = 0, best = 0;
  float best_v = n > 0 ? x[0] : 0.f;
#ifdef BERTH_AVX2
  if (n >= 8) {
    __m256 vmax = _mm256_loadu_ps(x), nan = _mm256_cmp_ps(vmax, vmax, _CMP_UNORD_Q);
    __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = vidx;
    const __m256i step = _mm256_set1_epi32(8);
    for (i = 8; i + 8 <= n; i += 8) {
      cur = _mm256_add_epi32(cur, step);
      const __m256 v = _mm256_loadu_ps(x + i);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);  // strictly greater: earlier indices win ties
      vmax = _mm256_blendv_ps(vmax, v, gt);
      vidx = _mm256_blendv_epi8(vidx, cur, _mm256_castps_si256(gt));
    }
    if (_mm256_movemask_ps(nan) != 0) return first_nan(x, n);  // torch returns the first NaN
    alignas(32) float vals[8];
    alignas(32) int32_t idx[8];
    _mm256_store_ps(vals, vmax);
    _mm256_store_si256(reinterpret_cast<__m256i*>(idx), vidx);
    best_v = vals[0];
    best = idx[0];
    for (int l = 1; l < 8; ++l) {
      if (vals[l] > best_v || (vals[l] == best_v && idx[l] < best)) {
        best_v = vals[l];
        best = idx[l];
      }
    }
  }
#endif
  for (; i < n; ++i) {  // the tail (or a row shorter than 8); only a strictly greater value wins
    if (std::isnan(x[i])) return first_nan(x, n);
    if (i == 0 || x[i] > best_v) {
      best_v = x[i];
      best = i;
    }
  }
  return best;
}

at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) > 0,
              "argmax_rows: x must be (B, V) fp32 with V > 0");
  TORCH_CHECK(x_in.size(1) < (int64_t{1} << 31), "argmax_rows: V must fit int32");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * n, n);
  });
  return out;
}

// A linear layer: the float weight (may be empty when quantized without keeping it; fp32, or bf16/fp16
// as a checkpoint stores it) and, when quantized, one of: torch's int8 (quant 1: qweight, scales) or int4
// (quant 2: packed, scales_zeros, group) kernels' forms, our int4 kernel's (quant 2 with q4_packed), or our
// int8 kernel's (quant 3: q0 = qweight, q1 = scales in q8_linear's layout, group = the real N).
struct Linear {
  at::Tensor weight;          // (N, K), or empty
  int64_t quant = 0;          // 0 none, 1 int8, 2 int4, 3 native int8 (Q8_0 layout)
  at::Tensor q0, q1;          // int8: qweight, scales; int4: packed, scales_zeros
  int64_t group = 0;
  at::Tensor bias;            // (N,) or undefined
  at::Tensor q4_packed, q4_scale_min;  // int4 in q4_linear's layout, or undefined

  bool native_q4() const { return q4_packed.defined(); }
  bool native_q8() const { return quant == 3; }
  // output columns of this layer's native kernel (padding included for q8)
  int64_t native_rows() const { return native_q4() ? q4_packed.size(0) * kBlockRows : q0.size(0) * kBlockRows; }

  at::Tensor operator()(const at::Tensor& x, int64_t quantized_max_rows) const {
    at::Tensor y;
    // our int4 kernel beats fp32 GEMM at every size; torch's int8/int4 kernels only up to quantized_max_rows
    bool use_quant = quant != 0 && (x.size(0) <= quantized_max_rows || weight.numel() == 0);
    const int64_t bf16_rows = berth::bf16_min_rows();
    if ((native_q4() || native_q8()) && bf16_rows > 0 && x.size(0) >= bf16_rows) {   // AMX: see dequant_bf16.cpp
      const int64_t n = native_q4() ? native_rows() : group;
      const at::Tensor w = native_q4() ? berth::q4_to_bf16(q4_packed, q4_scale_min, n) : berth::q8_to_bf16(q0, q1, n);
      y = at::linear(x.to(at::kBFloat16), w).to(at::kFloat);
    } else if (quant == 2 && q4_packed.defined()) {
      y = q4_linear(x, q4_packed, q4_scale_min);
    } else if (quant == 3) {
      y = q8_linear(x, q0, q1);
      if (y.size(1) != group) y = y.narrow(1, 0, group).contiguous();
    } else if (use_quant && quant == 2) {
      y = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), q0, group, q1).to(at::kFloat);
    } else if (use_quant && quant == 1) {
      y = at::_weight_int8pack_mm(x.to(at::kBFloat16), q0, q1).to(at::kFloat);
    } else if (weight.scalar_type() != at::kFloat) {  // bf16 / fp16 as stored: oneDNN (AMX where the CPU has it)
      y = at::linear(x.to(weight.scalar_type()), weight).to(at::kFloat);
    } else {
      return at::linear(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
    }
    if (bias.defined()) y.add_(bias);
    return y;
  }
};

Linear make_linear(py::tuple t) {
  // (weight, quant, q0, q1, group, bias, q4_packed, q4_scale_min): None where absent
  Linear lin;
  lin.weight = t[0].cast<at::Tensor>();
  lin.quant = t[1].cast<int64_t>();
  if (lin.quant != 0 && !t[2].is_none()) {
    lin.q0 = t[2].cast<at::Tensor>();
    lin.q1 = t[3].cast<at::Tensor>();
  }
  lin.group = t[4].cast<int64_t>();
  if (!t[5].is_none()) lin.bias = t[5].cast<at::Tensor>();
  if (!t[6].is_none()) {
    lin.q4_packed = t[6].cast<at::Tensor>();
    lin.q4_scale_min = t[7].cast<at::Tensor>();
  }
  TORCH_CHECK(lin.quant != 3 || (lin.q0.defined() && lin.q0.scalar_type() == at::kChar && lin.q0.dim() == 4),
              "native int8 linear needs its (N/8, K/32, 8, 32) qweight");
  return lin;
}

struct Layer {
  at::Tensor input_norm, post_norm;   // (H,)
  at::Tensor q_norm, k_norm;          // (D,) for Qwen3, else undefined
  Linear qkv, o, gate_up, down;       // gate_up / down unset in a mixture-of-experts layer
  std::shared_ptr<berth::MoeExperts> moe;   // the layer's experts and router (moe.h), or null
  // Gemma 2/3: norms of the attention and MLP outputs before their residual adds (undefined elsewhere), the
  // layer's own window, attention soft-capping, softmax scale, RoPE table (the local one for sliding layers)
  // and GELU-tanh gate
  at::Tensor attn_out_norm, ffn_out_norm;
  int64_t window = 0;                 // keys p - window + 1 .. p; 0: every key
  float softcap = 0.f;                // scores -> tanh(s / softcap) * softcap; 0: none
  float scale = 0.f;                  // softmax scale
  bool local_rope = false;
  bool gelu = false;
  // DeepSeek's latent attention (mla.h) in place of q|k|v: qkv then holds q_proj or q_b_proj, q_a the query
  // LoRA's first product (unset without it), kv_a kv_a_proj_with_mqa; runs in the team step only
  std::shared_ptr<berth::Mla> mla;
  Linear q_a, kv_a;
};

// ---- attention helpers: one query head against `len` cached keys at `offsets` --------------------
#ifdef BERTH_AVX2
// e^x for 8 floats (Cephes' polynomial, relative error ~2e-7 over the softmax range)
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                             _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// the 8 horizontal sums of a[0..7], in order
inline __m256 reduce8(const __m256* a) {
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}
#endif

// a = gelu_tanh(g) * u (Gemma's gelu_pytorch_tanh)
inline void gelu_mul(const float* g, const float* u, float* a, int64_t n) {
  constexpr float kAlpha = 0.7978845608028654f;   // sqrt(2 / pi)
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    a[i] = 0.5f * x * (1.f + std::tanh(kAlpha * (x + 0.044715f * x * x * x))) * u[i];
  }
}

// a = silu(g) * u = g / (1 + e^-g) * u
inline void silu_mul(const float* g, const float* u, float* a, int64_t n) {
  int64_t i = 0;
#ifdef BERTH_AVX2
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gv))));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// s[j] = scale * q . k_j
inline void attention_scores(const float* q, const float* kc, const int64_t* offsets, int64_t len, int64_t D,
                             float scale, float* s) {
  int64_t j = 0;
#ifdef BERTH_AVX2
  if (D % 8 == 0) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (; j + 8 <= len; j += 8) {
      // d outer, keys inner: 8 independent multiply-add chains instead of one chain per key
      const float* k[8];
      __m256 acc[8];
      for (int t = 0; t < 8; ++t) {
        k[t] = kc + offsets[j + t];
        acc[t] = _mm256_setzero_ps();
      }
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k[t] + d), acc[t]);
      }
      _mm256_storeu_ps(s + j, _mm256_mul_ps(reduce8(acc), sc));
    }
  }
#endif
  for (; j < len; ++j) s[j] = dot(q, kc + offsets[j], D) * scale;
}

// s = softmax(s) in place (max-subtracted)
inline void softmax(float* s, int64_t n) {
  const float mx = *std::max_element(s, s + n);
  float total = 0.f;
  int64_t j = 0;
#ifdef BERTH_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  total = hsum(sum);
#endif
  for (; j < n; ++j) { s[j] = std::exp(s[j] - mx); total += s[j]; }
  const float inv = 1.f / total;
  for (j = 0; j < n; ++j) s[j] *= inv;
}

// out = sum_j p[j] * v_j
inline void weighted_values(const float* p, const float* vc, const int64_t* offsets, int64_t len, int64_t D,
                            float* out) {
#ifdef BERTH_AVX2
  if (D % 64 == 0) {  // 64 outputs at a time in 8 registers (the cache is read once, out written once)
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t j = 0; j < len; ++j) {
        const __m256 pj = _mm256_broadcast_ss(p + j);
        const float* v = vc + offsets[j] + d0;
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * i), acc[i]);
      }
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
    }
    return;
  }
#endif
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < len; ++j) axpy(p[j], vc + offsets[j], out, D);
}

// fn(begin, end) over rows [0, n), split across threads for large n (inline for a decode batch)
template <typename Fn>
inline void for_rows(int64_t n, Fn fn) {
  at::parallel_for(0, n, 16, fn);
}

// A barrier for the threads of one OpenMP team that spins instead of sleeping: the phases of a step
// are microseconds apart, and waking a sleeping thread (OMP_WAIT_POLICY=PASSIVE, which the server
// needs between steps) costs more than that on a VM. After kSpinMicros it yields on every check, so a
// thread whose partner was preempted gives its core away instead of burning it.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}

  void wait() {
    const int sense = sense_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      sense_.store(sense ^ 1, std::memory_order_release);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    bool yield = false;
    for (int spins = 1; sense_.load(std::memory_order_acquire) == sense; ++spins) {
      if (yield) {
        std::this_thread::yield();
      } else if (spins % 64 == 0) {
        yield = std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicros);
      } else {
#ifdef BERTH_AVX2
        _mm_pause();
#endif
      }
    }
  }

 private:
  static constexpr int kSpinMicros = 50;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> sense_{0};
  const int n_;
};

// [begin, end) of n items for thread tid of nth (the static split at::parallel_for makes)
inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int nth) {
  return {n * tid / nth, n * (tid + 1) / nth};
}

class NativeModel {
 public:
  // rotary_dim: the leading dimensions of each head that RoPE rotates (the cos|sin rows' width; Phi-3's partial
  // rotary); window: keys p - window + 1 .. p for the query at p (Phi-3's sliding window), 0: the whole context
  NativeModel(py::list layers, at::Tensor final_norm, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              double eps, int64_t rotary_dim, int64_t window)
      : final_norm_(final_norm), num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
        eps_(static_cast<float>(eps)), rotary_dim_(rotary_dim), window_(window) {
    TORCH_CHECK(rotary_dim > 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0 && window >= 0,
                "rotary_dim must be even and at most head_dim; window >= 0");
    for (auto item : layers) {
      // (input_norm, post_norm, q_norm, k_norm, qkv, o, gate_up, down[, moe[, gemma[, mla]]]); moe = (experts,
      // router, top_k, normalize[, routing]) with gate_up and down None: a mixture of experts (moe.h); gemma =
      // (attn_out_norm, ffn_out_norm, window, softcap, scale, local_rope, gelu); mla = (q_a | None, kv_a,
      // make_mla's tuple): latent attention, qkv the query product
      py::tuple t = item.cast<py::tuple>();
      Layer layer;
      layer.input_norm = t[0].cast<at::Tensor>();
      layer.post_norm = t[1].cast<at::Tensor>();
      if (!t[2].is_none()) {
        layer.q_norm = t[2].cast<at::Tensor>();
        layer.k_norm = t[3].cast<at::Tensor>();
      }
      for (const at::Tensor* w : {&layer.input_norm, &layer.post_norm, &layer.q_norm, &layer.k_norm}) {
        TORCH_CHECK(!w->defined() || (w->scalar_type() == at::kFloat && w->is_contiguous()),
                    "norm weights must be contiguous fp32");
      }
      layer.qkv = make_linear(t[4].cast<py::tuple>());
      layer.o = make_linear(t[5].cast<py::tuple>());
      if (t.size() > 8 && !t[8].is_none()) {
        py::tuple moe = t[8].cast<py::tuple>();
        layer.moe = std::make_shared<berth::MoeExperts>(moe[0].cast<py::list>(), moe[1], moe[2].cast<int64_t>(),
                                                        moe[3].cast<bool>(),
                                                        moe.size() > 4 ? py::object(moe[4]) : py::object(py::none()));
        TORCH_CHECK(layer.moe->router.defined(), "a native MoE layer needs its router");
      } else {
        layer.gate_up = make_linear(t[6].cast<py::tuple>());
        layer.down = make_linear(t[7].cast<py::tuple>());
      }
      layer.window = window;
      layer.scale = 1.f / std::sqrt(static_cast<float>(head_dim));
      if (t.size() > 9 && !t[9].is_none()) {
        py::tuple g = t[9].cast<py::tuple>();
        layer.attn_out_norm = g[0].cast<at::Tensor>();
        layer.ffn_out_norm = g[1].cast<at::Tensor>();
        layer.window = g[2].cast<int64_t>();
        layer.softcap = static_cast<float>(g[3].cast<double>());
        layer.scale = static_cast<float>(g[4].cast<double>());
        layer.local_rope = g[5].cast<bool>();
        layer.gelu = g[6].cast<bool>();
        for (const at::Tensor* w : {&layer.attn_out_norm, &layer.ffn_out_norm}) {
          TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous(), "norm weights must be contiguous fp32");
        }
      }
      if (t.size() > 10 && !t[10].is_none()) {
        py::tuple m = t[10].cast<py::tuple>();
        if (!m[0].is_none()) layer.q_a = make_linear(m[0].cast<py::tuple>());
        layer.kv_a = make_linear(m[1].cast<py::tuple>());
        layer.mla = std::make_shared<berth::Mla>(berth::make_mla(m[2].cast<py::tuple>()));
        TORCH_CHECK((layer.mla->q_lora > 0) == !m[0].is_none(), "MLA: a q_a product exactly when the query has a LoRA");
        has_mla_ = true;
      }
      layers_.push_back(std::move(layer));
    }
    TORCH_CHECK(final_norm_.scalar_type() == at::kFloat && final_norm_.is_contiguous(), "norm weights must be contiguous fp32");
    // every product an int4 kernel of ours, no bias but q/k/v's (Qwen2): then a step runs as one
    // OpenMP team (forward_team) instead of one parallel region per op
    team_ = !layers_.empty();
    for (const Layer& L : layers_) {
      for (const Linear* lin : {&L.qkv, &L.o, &L.gate_up, &L.down, &L.q_a, &L.kv_a}) {
        if (L.moe && (lin == &L.gate_up || lin == &L.down)) continue;   // experts: native by construction
        if (lin == &L.kv_a && !L.mla) continue;
        if (lin == &L.q_a && !(L.mla && L.mla->q_lora)) continue;
        if (L.mla && lin->bias.defined()) team_ = false;
        // q8 only without padding rows: the team writes straight into rows of width N
        const bool native = lin->native_q4() || (lin->native_q8() && lin->native_rows() == lin->group);
        team_ = team_ && native && (lin == &L.qkv || !lin->bias.defined());
      }
    }
  }

  // x (T, H) fp32 embeddings of the step's tokens; positions (T,) int64; cos_sin (P, D) fp32;
  // kv_caches: [(k, v)] per layer; block_tables (S, max_blocks) int32, one row per sequence, or (L, S, max_blocks):
  // one table per layer (KV groups: Gemma's local layers hold only their window's blocks);
  // token_rows (T,) int32: each token's row in block_tables. A token at position p is stored at
  // its slot and attends to keys 0..p of its sequence. quantized_max_rows as models/llama.py's
  // QUANTIZED_MAX_ROWS. Writes each layer's new K/V into the caches and returns the model's output:
  // the final norm of the last residual sum (T, H).
  bool team() const { return team_; }

  at::Tensor forward(at::Tensor x, at::Tensor positions, at::Tensor cos_sin, at::Tensor cos_sin_local,
                     py::list kv_caches, at::Tensor block_tables, at::Tensor token_rows, int64_t quantized_max_rows) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (T, H) fp32");
    TORCH_CHECK(static_cast<size_t>(kv_caches.size()) == layers_.size(), "one (k, v) cache per layer");
    TORCH_CHECK(block_tables.scalar_type() == at::kInt && token_rows.scalar_type() == at::kInt,
                "block_tables and token_rows must be int32");
    TORCH_CHECK(block_tables.dim() == 2 || (block_tables.dim() == 3 &&
                static_cast<size_t>(block_tables.size(0)) == layers_.size()),
                "block_tables must be (S, max_blocks) or (layers, S, max_blocks)");
    TORCH_CHECK(positions.scalar_type() == at::kLong && cos_sin.scalar_type() == at::kFloat &&
                cos_sin.is_contiguous(), "positions int64, cos_sin contiguous fp32");
    TORCH_CHECK(cos_sin_local.sizes() == cos_sin.sizes() && cos_sin_local.scalar_type() == at::kFloat &&
                cos_sin_local.is_contiguous(), "cos_sin_local must be shaped as cos_sin");
    const int64_t tokens = x.size(0), hidden = x.size(1);
    TORCH_CHECK(positions.numel() == tokens && token_rows.numel() == tokens, "one position and row per token");
    std::vector<std::pair<at::Tensor, at::Tensor>> caches;
    for (auto item : kv_caches) {
      py::tuple kv = item.cast<py::tuple>();
      caches.emplace_back(kv[0].cast<at::Tensor>(), kv[1].cast<at::Tensor>());
    }
    const int64_t D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_;
    for (size_t li = 0; li < caches.size(); ++li) {
      const auto& kv = caches[li];
      const berth::Mla* mla = layers_[li].mla.get();   // one latent row per token, keys and values alike
      TORCH_CHECK(kv.first.scalar_type() == at::kFloat && kv.first.is_contiguous() && kv.first.dim() == 4 &&
                  kv.second.sizes() == kv.first.sizes() && kv.second.scalar_type() == at::kFloat &&
                  kv.second.is_contiguous() && kv.first.size(2) == (mla ? 1 : Hkv) &&
                  kv.first.size(3) == (mla ? mla->row() : D) && kv.first.sizes() == caches[0].first.sizes(),
                  "KV caches must be contiguous fp32 (blocks, block_size, kv_heads, head_dim)");
    }
    auto bt = block_tables.dim() == 2 ? block_tables.unsqueeze(0).contiguous() : block_tables.contiguous();
    auto rows = token_rows.contiguous();
    auto pos = positions.contiguous();
    const int32_t* bt_p = bt.data_ptr<int32_t>();
    const int32_t* row_p = rows.data_ptr<int32_t>();
    const int64_t* pos_p = pos.data_ptr<int64_t>();
    const int64_t num_seqs = bt.size(1), max_blocks = bt.size(2), num_tables = bt.size(0);
    const int64_t layer_stride = num_tables == 1 ? 0 : num_seqs * max_blocks;   // one table per layer, or one for all
    const int64_t num_blocks = caches.empty() ? 0 : caches[0].first.size(0);
    const int64_t block_size = caches.empty() ? 1 : caches[0].first.size(1);
    std::vector<int64_t> row_end(num_seqs, 0);  // every index used below is in range
    for (int64_t t = 0; t < tokens; ++t) {
      TORCH_CHECK(row_p[t] >= 0 && row_p[t] < num_seqs, "token_rows out of range");
      TORCH_CHECK(cos_sin.size(1) == rotary_dim_, "cos_sin rows must be rotary_dim wide");
      TORCH_CHECK(pos_p[t] >= 0 && pos_p[t] < cos_sin.size(0) && pos_p[t] < max_blocks * block_size,
                  "position ", pos_p[t], " outside the block table or the RoPE cache");
      row_end[row_p[t]] = std::max(row_end[row_p[t]], pos_p[t] + 1);
    }
    for (int64_t l = 0; l < num_tables; ++l) {
      for (int64_t r = 0; r < num_seqs; ++r) {
        for (int64_t j = 0; j * block_size < row_end[r]; ++j) {
          const int32_t block = bt_p[l * num_seqs * max_blocks + r * max_blocks + j];
          TORCH_CHECK(block >= 0 && block < num_blocks, "block id ", block, " outside the KV cache");
        }
      }
    }
    // Python objects are not touched below: let the server's event loop run while the step computes
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    quantized_max_rows_ = quantized_max_rows;
    const int64_t qkv_width = (Hq + 2 * Hkv) * D;
    const float* cs_p = cos_sin.data_ptr<float>();
    const float* csl_p = cos_sin_local.data_ptr<float>();

    // the team runs our kernels; a batch large enough for the bf16 (AMX) products takes the per-op path
    const int64_t bf16_rows = berth::bf16_min_rows();
    TORCH_CHECK(team_ || !has_mla_, "latent attention runs only when every product is a native int4/int8 kernel");
    if (team_ && (has_mla_ || bf16_rows <= 0 || tokens < bf16_rows)) return forward_team(x, pos_p, row_p, bt_p, layer_stride, max_blocks, block_size, cs_p, csl_p, caches);

    at::Tensor residual = x.clone();
    at::Tensor normed = at::empty_like(x);
    at::Tensor attn = at::empty({tokens, Hq * D}, x.options());
    float* res_p = residual.data_ptr<float>();
    float* nrm_p = normed.data_ptr<float>();
    auto norm_rows = [&](const at::Tensor& weight, const float* in, float* out) {
      const float* w = weight.data_ptr<float>();
      for_rows(tokens, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) rms_norm_row(in + t * hidden, w, out + t * hidden, hidden, eps_);
      });
    };

    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      float* kc = caches[li].first.data_ptr<float>();
      float* vc = caches[li].second.data_ptr<float>();
      const int32_t* lbt = bt_p + li * layer_stride;

      norm_rows(L.input_norm, res_p, nrm_p);
      at::Tensor qkv = L.qkv(normed, quantized_max_rows_).contiguous();  // (T, (Hq + 2Hkv) D)
      float* qkv_p = qkv.data_ptr<float>();
      for_rows(tokens, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t p = pos_p[t];
          rope_and_store(L, qkv_p + t * qkv_width, (L.local_rope ? csl_p : cs_p) + p * rotary_dim_,
                         lbt[row_p[t] * max_blocks + p / block_size], p % block_size, block_size, kc, vc);
        }
      });

      paged_attention(L, qkv_p, qkv_width, kc, vc, lbt, max_blocks, row_p, pos_p, block_size, tokens,
                      attn.data_ptr<float>());

      at::Tensor o = L.o(attn, quantized_max_rows_).contiguous();  // (T, H)
      if (L.attn_out_norm.defined()) norm_rows(L.attn_out_norm, o.data_ptr<float>(), o.data_ptr<float>());
      residual.add_(o);
      norm_rows(L.post_norm, res_p, nrm_p);

      if (L.moe) {   // experts: one parallel loop per phase (moe.h)
        berth::MoeStep step(*L.moe, tokens);
        residual.add_(berth::moe_parallel(step, normed, true));
        continue;
      }
      at::Tensor gu = L.gate_up(normed, quantized_max_rows_).contiguous();  // (T, 2I)
      const int64_t inter = gu.size(1) / 2;
      at::Tensor act = at::empty({tokens, inter}, x.options());
      const float* gu_p = gu.data_ptr<float>();
      float* act_p = act.data_ptr<float>();
      for_rows(tokens, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          (L.gelu ? gelu_mul : silu_mul)(gu_p + t * 2 * inter, gu_p + t * 2 * inter + inter, act_p + t * inter, inter);
        }
      });
      at::Tensor down = L.down(act, quantized_max_rows_).contiguous();
      if (L.ffn_out_norm.defined()) norm_rows(L.ffn_out_norm, down.data_ptr<float>(), down.data_ptr<float>());
      residual.add_(down);
    }
    at::Tensor out = at::empty_like(residual);
    norm_rows(final_norm_, res_p, out.data_ptr<float>());
    return out;
  }

 private:
  // Each (token, query head) attends over keys 0..position of its sequence's kv head in the paged
  // cache: scores, a max-subtracted softmax, then the weighted sum of values.
  // The int4 step as one OpenMP team: every phase (norms, products, RoPE and KV store, attention,
  // SiLU) is split across the team's threads and separated by spin barriers, so the threads are woken
  // once per step instead of ~5 times per layer.
  at::Tensor forward_team(const at::Tensor& x, const int64_t* pos_p, const int32_t* row_p, const int32_t* bt_p,
                          int64_t layer_stride, int64_t max_blocks, int64_t block_size, const float* cs_p, const float* csl_p,
                          const std::vector<std::pair<at::Tensor, at::Tensor>>& caches) const {
    const int64_t T = x.size(0), H = x.size(1);
    const int64_t D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_, W = (Hq + 2 * Hkv) * D;
    int64_t inter = 0;   // the dense layers' MLP width (mixture-of-experts layers keep their own buffers)
    for (const Layer& L : layers_) if (!L.moe) inter = std::max(inter, L.gate_up.native_rows() / 2);
    int64_t max_k = std::max({H, Hq * D, inter});
    // latent attention (mla.h): q_a outputs, kv_a rows, queries, absorbed queries, latent outputs, value heads
    const berth::Mla* mla = nullptr;
    for (const Layer& L : layers_) if (L.mla) mla = L.mla.get();
    std::vector<float> m_qa, m_kva, m_q, m_qf, m_lat, m_heads;
    if (mla) {
      max_k = std::max({max_k, mla->q_lora, mla->heads * mla->v});
      m_qa.resize(T * mla->q_lora);
      m_kva.resize(T * mla->row());
      m_q.resize(T * mla->q_width());
      m_qf.resize(T * Hq * mla->row());
      m_lat.resize(T * Hq * mla->rank);
      m_heads.resize(T * Hq * mla->v);
    }
    at::Tensor residual = x.clone(), out = at::empty_like(x);
    std::vector<float> normed(T * H), qkv(T * W), attn(T * Hq * D), gu(T * 2 * inter), act(T * inter), y(T * H);
    QuantizedRows qx{std::vector<int8_t>(T * max_k), std::vector<float>(T * max_k / kGroup),
                     std::vector<float>(T * max_k / kGroup)};
    float* res = residual.data_ptr<float>();
    const int nth = std::max(1, at::get_num_threads());
    std::atomic<int> team_size{0};
    SpinBarrier* barrier = nullptr;
    std::unique_ptr<SpinBarrier> barrier_holder;
    std::unique_ptr<berth::MoeStep> moe_step;   // the current MoE layer's work, shared by the team
#pragma omp parallel num_threads(nth)
    {
#pragma omp single
      {
        team_size = omp_get_num_threads();
        barrier_holder = std::make_unique<SpinBarrier>(team_size);
        barrier = barrier_holder.get();
      }  // implicit barrier: every thread sees the team size and the barrier
      const int tid = omp_get_thread_num(), n = team_size;
      int64_t r0, r1;  // this thread's rows in the per-row phases
      std::tie(r0, r1) = share(T, tid, n);
      // each row: (residual += y, y first normed by y_norm when defined: Gemma's output norms), rms_norm ->
      // normed, rounded to int8 per group for the next product
      auto add_norm_quantize = [&](const at::Tensor& w, bool add, const at::Tensor& y_norm) {
        for (int64_t t = r0; t < r1; ++t) {
          float* row = res + t * H;
          if (add && y_norm.defined()) rms_norm_row(y.data() + t * H, y_norm.data_ptr<float>(), y.data() + t * H, H, eps_);
          if (add) for (int64_t i = 0; i < H; ++i) row[i] += y[t * H + i];
          rms_norm_row(row, w.data_ptr<float>(), normed.data() + t * H, H, eps_);
        }
        quantize_range(normed.data(), r0 * H / kGroup, r1 * H / kGroup, qx);
      };
      auto product = [&](const Linear& lin, int64_t k, float* dst) {
        const int64_t blocks = lin.native_rows() / kBlockRows;
        int64_t b0, b1;
        std::tie(b0, b1) = share(blocks, tid, n);
        if (lin.native_q4()) {
          q4_blocks(lin.q4_packed.data_ptr<uint8_t>(), lin.q4_scale_min.data_ptr<at::Half>(), qx, k, T, dst,
                    blocks * kBlockRows, b0, b1);
        } else {
          q8_blocks(lin.q0.data_ptr<int8_t>(), lin.q1.data_ptr<at::Half>(), qx, k, T, dst, blocks * kBlockRows, b0, b1);
        }
      };
      for (size_t li = 0; li < layers_.size(); ++li) {
        const Layer& L = layers_[li];
        float* kc = caches[li].first.data_ptr<float>();
        float* vc = caches[li].second.data_ptr<float>();
        const int32_t* lbt = bt_p + li * layer_stride;
        add_norm_quantize(L.input_norm, li > 0, li > 0 ? layers_[li - 1].ffn_out_norm : at::Tensor());
        barrier->wait();
        if (L.mla) {   // q (through the LoRA), the latent rows stored, absorbed queries, attention, value heads, o
          const berth::Mla& M = *L.mla;
          const int64_t qw = M.q_width(), row = M.row(), hd = M.nope + M.rope;
          if (M.q_lora) product(L.q_a, H, m_qa.data());
          product(L.kv_a, H, m_kva.data());
          barrier->wait();
          for (int64_t t = r0; t < r1; ++t) {
            const int64_t p = pos_p[t];
            const int64_t slot = static_cast<int64_t>(lbt[row_p[t] * max_blocks + p / block_size]) * block_size +
                                 p % block_size;
            berth::mla_store(M, m_kva.data() + t * row, cs_p + p * rotary_dim_, kc + slot * row);
            if (M.q_lora) rms_norm_row(m_qa.data() + t * M.q_lora, M.q_a_norm.data_ptr<float>(),
                                       m_qa.data() + t * M.q_lora, M.q_lora, M.eps);
          }
          if (M.q_lora) {
            quantize_range(m_qa.data(), r0 * M.q_lora / kGroup, r1 * M.q_lora / kGroup, qx);
            barrier->wait();
          }
          product(L.qkv, M.q_lora ? M.q_lora : H, m_q.data());
          barrier->wait();
          int64_t h0, h1;
          std::tie(h0, h1) = share(T * Hq, tid, n);
          for (int64_t i = h0; i < h1; ++i) {
            const int64_t t = i / Hq, h = i % Hq;
            berth::mla_query(M, h, m_q.data() + t * qw + h * hd, cs_p + pos_p[t] * rotary_dim_, m_qf.data() + i * row);
          }
          barrier->wait();
          int64_t u0, u1;
          std::tie(u0, u1) = share(attention_units(T), tid, n);
          attention_range(L, u0, u1, m_qf.data(), Hq * row, kc, kc, lbt, max_blocks, row_p, pos_p, block_size, T,
                          m_lat.data());
          barrier->wait();
          for (int64_t i = h0; i < h1; ++i) berth::mla_value(M, i % Hq, m_lat.data() + i * M.rank, m_heads.data() + i * M.v);
          barrier->wait();
          quantize_range(m_heads.data(), r0 * Hq * M.v / kGroup, r1 * Hq * M.v / kGroup, qx);
          barrier->wait();
          product(L.o, Hq * M.v, y.data());
          barrier->wait();
        } else {
          product(L.qkv, H, qkv.data());
          barrier->wait();
          for (int64_t t = r0; t < r1; ++t) {
            float* row = qkv.data() + t * W;
            if (L.qkv.bias.defined()) {
              const float* bias = L.qkv.bias.data_ptr<float>();
              for (int64_t i = 0; i < W; ++i) row[i] += bias[i];
            }
            const int64_t p = pos_p[t];
            rope_and_store(L, row, (L.local_rope ? csl_p : cs_p) + p * rotary_dim_,
                           lbt[row_p[t] * max_blocks + p / block_size], p % block_size, block_size, kc, vc);
          }
          barrier->wait();
          int64_t u0, u1;
          std::tie(u0, u1) = share(attention_units(T), tid, n);
          attention_range(L, u0, u1, qkv.data(), W, kc, vc, lbt, max_blocks, row_p, pos_p, block_size, T,
                          attn.data());
          barrier->wait();
          quantize_range(attn.data(), r0 * Hq * D / kGroup, r1 * Hq * D / kGroup, qx);
          barrier->wait();
          product(L.o, Hq * D, y.data());
          barrier->wait();
        }
        add_norm_quantize(L.post_norm, true, L.attn_out_norm);
        barrier->wait();
        if (L.moe) {   // route, group (thread 0), gather, gate|up, activate, down, combine: moe.h's phases
          if (tid == 0) moe_step = std::make_unique<berth::MoeStep>(*L.moe, T);
          barrier->wait();
          berth::MoeStep& step = *moe_step;
          step.route(normed.data(), r0, r1);
          barrier->wait();
          if (tid == 0) step.group();
          barrier->wait();
          int64_t c0, c1, b0, b1;
          std::tie(c0, c1) = share(step.num_chosen(), tid, n);
          step.gather(normed.data(), c0, c1);
          barrier->wait();
          std::tie(b0, b1) = share(step.gate_up_blocks(), tid, n);
          step.gate_up(b0, b1);
          barrier->wait();
          step.activate(c0, c1);
          barrier->wait();
          std::tie(b0, b1) = share(step.down_blocks(), tid, n);
          step.down(b0, b1);
          barrier->wait();
          step.combine(y.data(), r0, r1);
          barrier->wait();
          continue;
        }
        product(L.gate_up, H, gu.data());
        barrier->wait();
        for (int64_t t = r0; t < r1; ++t) {
          (L.gelu ? gelu_mul : silu_mul)(gu.data() + t * 2 * inter, gu.data() + t * 2 * inter + inter,
                                         act.data() + t * inter, inter);
        }
        quantize_range(act.data(), r0 * inter / kGroup, r1 * inter / kGroup, qx);
        barrier->wait();
        product(L.down, inter, y.data());
        barrier->wait();
      }
      float* o = out.data_ptr<float>();
      const at::Tensor& last_norm = layers_.back().ffn_out_norm;
      for (int64_t t = r0; t < r1; ++t) {
        float* row = res + t * H;
        if (last_norm.defined()) rms_norm_row(y.data() + t * H, last_norm.data_ptr<float>(), y.data() + t * H, H, eps_);
        for (int64_t i = 0; i < H; ++i) row[i] += y[t * H + i];
        rms_norm_row(row, final_norm_.data_ptr<float>(), o + t * H, H, eps_);
      }
    }
    return out;
  }

  // One token's fused q|k|v row: q/k norms (Qwen3), RoPE on q and k (cos_sin: its position's row),
  // then its K and V stored at offset `offset` of cache block `block` (before any token of the step
  // attends).
  void rope_and_store(const Layer& L, float* row, const float* cos_sin, int64_t block, int64_t offset,
                      int64_t block_size, float* kc, float* vc) const {
    const int64_t D = head_dim_, Hq = num_heads_, Hkv = num_kv_heads_, half = rotary_dim_ / 2;
    if (L.q_norm.defined()) {
      const float* qn = L.q_norm.data_ptr<float>();
      const float* kn = L.k_norm.data_ptr<float>();
      for (int64_t h = 0; h < Hq; ++h) rms_norm_row(row + h * D, qn, row + h * D, D, eps_);
      for (int64_t h = Hq; h < Hq + Hkv; ++h) rms_norm_row(row + h * D, kn, row + h * D, D, eps_);
    }
    for (int64_t h = 0; h < Hq + Hkv; ++h) rope_row(row + h * D, cos_sin, cos_sin + half, half);
    const int64_t slot = block * block_size + offset;
    std::copy(row + Hq * D, row + (Hq + Hkv) * D, kc + slot * Hkv * D);
    std::copy(row + (Hq + Hkv) * D, row + (Hq + 2 * Hkv) * D, vc + slot * Hkv * D);
  }

  void paged_attention(const Layer& L, const float* qkv, int64_t qkv_width, const float* kc, const float* vc,
                       const int32_t* bt, int64_t max_blocks, const int32_t* rows, const int64_t* pos,
                       int64_t block_size, int64_t tokens, float* out) const {
    at::parallel_for(0, attention_units(tokens), 1, [&](int64_t begin, int64_t end) {
      attention_range(L, begin, end, qkv, qkv_width, kc, vc, bt, max_blocks, rows, pos, block_size, tokens, out);
    });
  }

  // One work item per query head: at batch 1 the 3 kv heads of a small model would leave one of two
  // threads idle for a third of the time. A prefill's later tokens see more keys, so a long batch is
  // split in units of two items (k, items - 1 - k) that even out each thread's share of a causal triangle.
  int64_t attention_units(int64_t tokens) const {
    const int64_t items = tokens * num_heads_;
    return items >= 64 ? (items + 1) / 2 : items;
  }

  // with the layer's softmax scale, window (keys p - window + 1 .. p) and score soft-capping
  // MLA layers: one KV head of the latent rows (keys: whole rows, values: their first rank values), each query
  // head rank + rope wide at its (token, head) place in qkv
  void attention_range(const Layer& L, int64_t begin, int64_t end, const float* qkv, int64_t qkv_width,
                       const float* kc, const float* vc, const int32_t* bt, int64_t max_blocks, const int32_t* rows,
                       const int64_t* pos, int64_t block_size, int64_t tokens, float* out) const {
    const float scale = L.mla ? L.mla->scale : L.scale;
    const int64_t D = L.mla ? L.mla->row() : head_dim_, Dv = L.mla ? L.mla->rank : head_dim_;
    const int64_t Hq = num_heads_, Hkv = L.mla ? 1 : num_kv_heads_, group = Hq / Hkv;
    const int64_t items = tokens * Hq;
    const bool pairs = items >= 64;
    std::vector<float> scores;
    // each key's (and value's) offset in the cache, per kv head and for each of a pair's two items:
    // the offsets of the last sequence seen there, which its next heads and tokens extend
    std::vector<std::vector<int64_t>> offsets(2 * Hkv);
    std::vector<int64_t> offsets_for(2 * Hkv, -1);  // the row whose offsets are held
    auto attend = [&](int64_t idx, int which) {
      const int64_t t = idx / Hq, head = idx % Hq, h = head / group, len = pos[t] + 1, row = rows[t];
      std::vector<int64_t>& off = offsets[which * Hkv + h];
      if (offsets_for[which * Hkv + h] != row) {
        off.clear();
        offsets_for[which * Hkv + h] = row;
      }
      for (int64_t j = static_cast<int64_t>(off.size()); j < len; ++j) {
        const int64_t slot = static_cast<int64_t>(bt[row * max_blocks + j / block_size]) * block_size + j % block_size;
        off.push_back((slot * Hkv + h) * D);
      }
      const int64_t first = L.window > 0 ? std::max<int64_t>(0, len - L.window) : 0, n = len - first;
      scores.resize(n);
      attention_scores(qkv + t * qkv_width + head * D, kc, off.data() + first, n, D, scale, scores.data());
      if (L.softcap > 0.f) {
        for (int64_t j = 0; j < n; ++j) scores[j] = std::tanh(scores[j] / L.softcap) * L.softcap;
      }
      softmax(scores.data(), n);
      weighted_values(scores.data(), vc, off.data() + first, n, Dv, out + (t * Hq + head) * Dv);
    };
    for (int64_t k = begin; k < end; ++k) {
      attend(k, 0);
      if (pairs && items - 1 - k != k) attend(items - 1 - k, 1);
    }
  }

  std::vector<Layer> layers_;
  at::Tensor final_norm_;  // (H,)
  int64_t num_heads_, num_kv_heads_, head_dim_;
  float eps_;
  int64_t rotary_dim_, window_;
  int64_t quantized_max_rows_ = 0;
  bool team_ = false;  // every product our int4 or int8 kernel (see forward_team)
  bool has_mla_ = false;  // a latent-attention layer: team step only
};

}  // namespace

void register_gguf_repack(pybind11::module& m);  // gguf_repack.cpp
void register_token_mask(pybind11::module& m);   // token_mask.cpp
void register_moe(pybind11::module& m);          // moe.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_gguf_repack(m);
  register_token_mask(m);
  register_moe(m);
  m.def("bf16_min_rows", &berth::bf16_min_rows,
        "products of at least this many rows run in bf16 through oneDNN (AMX); 0: never on this CPU");
  m.def("isa", []() { return std::string(berth::kernels().isa); },
        "the instruction set of the quantized block kernels chosen for this CPU (cpuid; BERTH_ISA forces a lesser one)");
  py::class_<NativeModel>(m, "NativeModel")
      .def(py::init<py::list, at::Tensor, int64_t, int64_t, int64_t, double, int64_t, int64_t>())
      .def("forward", &NativeModel::forward)
      .def_property_readonly("team", &NativeModel::team, "True when a step runs as one OpenMP team (native int4/int8 products)");
  m.def("q8_linear", &q8_linear, py::call_guard<py::gil_scoped_release>(), "x (M, K) fp32 @ int8 weight ((N/8, K/32, 8, 32), (N/8, K/32, 8) fp16 scales) -> (M, N)");
  m.def("argmax_rows", &argmax_rows, py::call_guard<py::gil_scoped_release>(),
        "x (B, V) fp32 -> (B,) int64: torch.argmax(x, dim=1), vectorized");
  m.def("q4_linear", &q4_linear, py::call_guard<py::gil_scoped_release>(),
        "x (M, K) fp32 @ int4 weight ((N/8, K/32, 4, 32) packed, (N/8, K/32, 2, 8) fp16) -> (M, N)");
}
