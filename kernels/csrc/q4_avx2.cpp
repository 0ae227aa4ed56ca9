// q4 block kernels for AVX2 (+FMA, F16C): maddubs/madd integer dot products over 256-bit vectors.
#include "quant.h"

#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace berth {
namespace {

// Columns 8b..8b+7 of y for T activation rows from row0: y[row0 + t, 8b + i] = w_{8b+i} . x[row0 + t].
template <int T>
void q4_block_avx2(const uint8_t* w, const at::Half* scale_min, const QuantizedRows& qx, int64_t k, int64_t row0,
              float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  const float* const* sx = rows.s;
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * 128;
    _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes + 64, _MM_HINT_T0);
    // the group's 8 weight vectors (4 loads, two nibbles each), then each activation row against them
    __m256i wv[8];
    for (int v = 0; v < 4; ++v) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + v * 32));
      wv[v] = _mm256_and_si256(bytes, mask);
      wv[v + 4] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    }
    // int16 sums of 16 products each: |code * q| <= 15 * 127, 16 * 1905 < 32768, no saturation
    __m256i dot16[T];
    for (int t = 0; t < T; ++t) {
      const int8_t* qg = q[t] + g * kGroup;  // wv[v] holds inputs 4v..4v+3 of the group
      __m256i sum = _mm256_setzero_si256();
      for (int v = 0; v < 8; ++v) {
        int32_t a;
        std::memcpy(&a, qg + 4 * v, 4);
        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(wv[v], _mm256_set1_epi32(a)));
      }
      dot16[t] = sum;
    }
    const __m128i* sm = reinterpret_cast<const __m128i*>(scale_min + g * 16);
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(sm)), mins = _mm256_cvtph_ps(_mm_loadu_si128(sm + 1));
    for (int t = 0; t < T; ++t) {
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16[t], ones));
      acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_broadcast_ss(dx[t] + g)), acc[t]);
      acc[t] = _mm256_fmadd_ps(mins, _mm256_broadcast_ss(sx[t] + g), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(y + (row0 + t) * n + col0, acc[t]);
}

// Columns 8b..8b+7 of y (rows, n) for weight blocks b in [begin, end), every activation row, from
// the int8-rounded activations qx (width k): int4 weights (q4_linear's layout) ...
void q4_blocks_avx2_impl(const uint8_t* packed, const at::Half* scale_min, const QuantizedRows& qx, int64_t k, int64_t rows,
               float* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  for_block_tiles(rows, begin, end, [&](auto t, int64_t b, int64_t r) {
    q4_block_avx2<decltype(t)::value>(packed + b * groups * 128, scale_min + b * groups * 16, qx, k, r, y, n, b * kBlockRows);
  });
}

}  // namespace

const Q4Blocks q4_blocks_avx2 = q4_blocks_avx2_impl;

}  // namespace berth
#else
namespace berth {
const Q4Blocks q4_blocks_avx2 = nullptr;
}  // namespace berth
#endif
