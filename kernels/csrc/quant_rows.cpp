// Activation rows -> int8 per group of 32 with a scale (llama.cpp's Q8 activations for Q4/Q8 weights).
#include "quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BERTH_AVX2 1
#endif

namespace berth {

#ifdef BERTH_AVX2
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// one group of 32: q = round(x / d) (ties to even, as std::nearbyint), returns sum(q)
inline int quantize_group(const float* x, float inv, int8_t* q) {
  const __m256 iv = _mm256_set1_ps(inv);
  __m256i c[4];
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), iv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
  __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
  sum4 = _mm_hadd_epi32(sum4, sum4);
  sum4 = _mm_hadd_epi32(sum4, sum4);
  // the packs interleave 128-bit lanes; the permutation restores the order of the 32 codes
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return _mm_cvtsi128_si32(sum4);
}
#endif

// Groups [begin, end) of the flattened (rows * K / 32) sequence: group i is row i / groups, group
// i % groups. out holds at least that many rows of width k.
void quantize_range(const float* x, int64_t begin, int64_t end, QuantizedRows& out) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xg = x + i * kGroup;
    int8_t* qg = out.q.data() + i * kGroup;
    float amax = 0.f;
#ifdef BERTH_AVX2
    __m256 m = _mm256_setzero_ps();
    for (int c = 0; c < 4; ++c) m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_loadu_ps(xg + 8 * c)));
    amax = hmax(m);
#else
    for (int64_t j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(xg[j]));
#endif
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
#ifdef BERTH_AVX2
    const int sum = quantize_group(xg, inv, qg);
#else
    int sum = 0;
    for (int64_t j = 0; j < kGroup; ++j) {
      qg[j] = static_cast<int8_t>(std::nearbyint(xg[j] * inv));
      sum += qg[j];
    }
#endif
    out.d[i] = d;
    out.s[i] = d * static_cast<float>(sum);
  }
}

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup;
  QuantizedRows out{std::vector<int8_t>(rows * k), std::vector<float>(rows * groups),
                    std::vector<float>(rows * groups)};
  at::parallel_for(0, rows * groups, 512, [&](int64_t begin, int64_t end) { quantize_range(x, begin, end, out); });
  return out;
}

}  // namespace berth
