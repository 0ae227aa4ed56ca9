// DeepSeek's multi-head latent attention pieces of the native step (mla.h).
#include "mla.h"

#include <algorithm>
#include <vector>

#include "rows.h"

namespace berth {
namespace {

// rope values of one head in place: interleaved pairs gathered into halves first (mla.py's _rope)
void rope_latent(const Mla& m, float* x, const float* cos_sin) {
  const int64_t half = m.rope / 2;
  if (m.interleaved) {
    float tmp[512];
    TORCH_CHECK(m.rope <= 512, "MLA: rope dims over 512");
    for (int64_t i = 0; i < half; ++i) {
      tmp[i] = x[2 * i];
      tmp[half + i] = x[2 * i + 1];
    }
    std::copy(tmp, tmp + m.rope, x);
  }
  rope_row(x, cos_sin, cos_sin + half, half);
}

at::Tensor fp32_tensor(pybind11::handle h, std::vector<int64_t> shape, const char* what) {
  at::Tensor t = h.cast<at::Tensor>();
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == at::IntArrayRef(shape),
              "MLA: ", what, " must be contiguous fp32 of the layer's shape");
  return t;
}

}  // namespace

Mla make_mla(pybind11::tuple t) {
  Mla m;
  m.heads = t[4].cast<int64_t>();
  m.nope = t[5].cast<int64_t>();
  m.rope = t[6].cast<int64_t>();
  m.rank = t[7].cast<int64_t>();
  m.v = t[8].cast<int64_t>();
  m.q_lora = t[9].cast<int64_t>();
  m.scale = static_cast<float>(t[10].cast<double>());
  m.eps = static_cast<float>(t[11].cast<double>());
  m.interleaved = t[12].cast<bool>();
  TORCH_CHECK(m.heads > 0 && m.nope > 0 && m.rope > 0 && m.rope % 2 == 0 && m.rank > 0 && m.v > 0 && m.q_lora >= 0,
              "MLA: bad dimensions");
  if (m.q_lora) m.q_a_norm = fp32_tensor(t[0], {m.q_lora}, "q_a_norm");
  m.kv_a_norm = fp32_tensor(t[1], {m.rank}, "kv_a_norm");
  m.w_uk = fp32_tensor(t[2], {m.heads, m.nope, m.rank}, "W_uk");
  m.w_uv_t = fp32_tensor(t[3], {m.heads, m.rank, m.v}, "W_uv transposed");
  return m;
}

void mla_store(const Mla& m, const float* kva, const float* cos_sin, float* cache_row) {
  rms_norm_row(kva, m.kv_a_norm.data_ptr<float>(), cache_row, m.rank, m.eps);
  std::copy(kva + m.rank, kva + m.rank + m.rope, cache_row + m.rank);
  rope_latent(m, cache_row + m.rank, cos_sin);
}

void mla_query(const Mla& m, int64_t h, const float* q, const float* cos_sin, float* out) {
  const float* w = m.w_uk.data_ptr<float>() + h * m.nope * m.rank;   // (nope, rank)
  std::fill(out, out + m.rank, 0.f);
  for (int64_t n = 0; n < m.nope; ++n) {   // out += q_nope[n] * W_uk[h][n, :]
    const float a = q[n];
    const float* row = w + n * m.rank;
    for (int64_t r = 0; r < m.rank; ++r) out[r] += a * row[r];
  }
  std::copy(q + m.nope, q + m.nope + m.rope, out + m.rank);
  rope_latent(m, out + m.rank, cos_sin);
}

void mla_value(const Mla& m, int64_t h, const float* latent, float* out) {
  const float* w = m.w_uv_t.data_ptr<float>() + h * m.rank * m.v;   // (rank, v)
  std::fill(out, out + m.v, 0.f);
  for (int64_t r = 0; r < m.rank; ++r) {   // out += latent[r] * W_uv[h][:, r]
    const float a = latent[r];
    const float* row = w + r * m.v;
    for (int64_t i = 0; i < m.v; ++i) out[i] += a * row[i];
  }
}

}  // namespace berth
