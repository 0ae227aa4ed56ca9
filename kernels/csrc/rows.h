// Per-row helpers the native step's files share (cpu_model.cpp, mla.cpp): RMSNorm and rotate-half RoPE.
#pragma once

#include <cmath>
#include <cstdint>

namespace berth {

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

}  // namespace berth
