// q8 block kernels for AVX2 (+FMA, F16C): maddubs/madd integer dot products over 256-bit vectors.
#include "quant.h"

#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace berth {
namespace {

// Columns 8b..8b+7 of y for T activation rows, int8 weights: the signs move onto the activations so
// that maddubs multiplies |w| (unsigned) by sign(w) * q; each product pair needs int32 (|sum| < 2^15 + 1).
template <int T>
void q8_block_avx2(const int8_t* w, const at::Half* scales, const QuantizedRows& qx, int64_t k, int64_t row0,
              float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * 256;
    _mm_prefetch(reinterpret_cast<const char*>(wg) + 2 * kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wg) + 2 * kPrefetchBytes + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wg) + 2 * kPrefetchBytes + 128, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wg) + 2 * kPrefetchBytes + 192, _MM_HINT_T0);
    __m256i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
    for (int v = 0; v < 8; ++v) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + v * 32));
      const __m256i wabs = _mm256_sign_epi8(wv, wv);
      for (int t = 0; t < T; ++t) {
        int32_t a;
        std::memcpy(&a, q[t] + g * kGroup + 4 * v, 4);
        const __m256i prod = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(_mm256_set1_epi32(a), wv));
        dot[t] = _mm256_add_epi32(dot[t], _mm256_madd_epi16(prod, ones));
      }
    }
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * 8)));
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_mul_ps(scale, _mm256_broadcast_ss(dx[t] + g)), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(y + (row0 + t) * n + col0, acc[t]);
}

// ... or int8 weights (q8_linear's layout)
void q8_blocks_avx2_impl(const int8_t* qweight, const at::Half* scales, const QuantizedRows& qx, int64_t k, int64_t rows,
               float* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  for_block_tiles(rows, begin, end, [&](auto t, int64_t b, int64_t r) {
    q8_block_avx2<decltype(t)::value>(qweight + b * groups * 256, scales + b * groups * 8, qx, k, r, y, n, b * kBlockRows);
  });
}

}  // namespace

const Q8Blocks q8_blocks_avx2 = q8_blocks_avx2_impl;

}  // namespace berth
#else
namespace berth {
const Q8Blocks q8_blocks_avx2 = nullptr;
}  // namespace berth
#endif
