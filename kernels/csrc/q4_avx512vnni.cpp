// q4 block kernels for AVX-512 VNNI: vpdpbusd multiplies the unsigned 4-bit codes by the int8 activations
// and adds groups of 4 products straight into int32 lanes, one instruction where AVX2 needs maddubs + an
// int16 add per vector and a madd per group (and has no int16 saturation limit). Batches of kWideMinRows
// rows or more (prefill) take two weight blocks per 512-bit vector: 16 output columns per instruction,
// each broadcast activation and each per-group scale step serving twice the columns of the 256-bit form
// (which small batches keep: they are bound by reading the weights).
#include "quant.h"

#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>

namespace berth {
namespace {

// Columns 8b..8b+7 of y for T activation rows from row0 (layout: quant.h)
template <int T>
void q4_block_vnni(const uint8_t* w, const at::Half* scale_min, const QuantizedRows& qx, int64_t k, int64_t row0,
                   float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  const float* const* sx = rows.s;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * 128;
    _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetchBytes + 64, _MM_HINT_T0);
    __m256i wv[8];
    for (int v = 0; v < 4; ++v) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + v * 32));
      wv[v] = _mm256_and_si256(bytes, mask);
      wv[v + 4] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    }
    const __m128i* sm = reinterpret_cast<const __m128i*>(scale_min + g * 16);
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(sm)), mins = _mm256_cvtph_ps(_mm_loadu_si128(sm + 1));
    for (int t = 0; t < T; ++t) {
      const int8_t* qg = q[t] + g * kGroup;  // wv[v] holds inputs 4v..4v+3 of the group
      __m256i dot = _mm256_setzero_si256();
      for (int v = 0; v < 8; ++v) {
        int32_t a;
        std::memcpy(&a, qg + 4 * v, 4);
        dot = _mm256_dpbusd_epi32(dot, wv[v], _mm256_set1_epi32(a));
      }
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, _mm256_broadcast_ss(dx[t] + g)), acc[t]);
      acc[t] = _mm256_fmadd_ps(mins, _mm256_broadcast_ss(sx[t] + g), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(y + (row0 + t) * n + col0, acc[t]);
}

// Columns 8b..8b+15 of y (weight blocks b and b + 1: w, sm point at block b) for T activation rows from row0
template <int T>
void q4_pair_vnni(const uint8_t* w, const at::Half* scale_min, const QuantizedRows& qx, int64_t k, int64_t row0,
                  float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const uint8_t* w1 = w + groups * 128;
  const at::Half* sm1 = scale_min + groups * 16;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  const float* const* sx = rows.s;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t *wa = w + g * 128, *wb = w1 + g * 128;
    __m512i wv[8];   // columns 0..7 from block b in the low half, 8..15 from block b + 1 in the high half
    for (int v = 0; v < 4; ++v) {
      const __m512i bytes = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wa + v * 32))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + v * 32)), 1);
      wv[v] = _mm512_and_si512(bytes, mask);
      wv[v + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
    }
    const __m128i *sa = reinterpret_cast<const __m128i*>(scale_min + g * 16),
                  *sb = reinterpret_cast<const __m128i*>(sm1 + g * 16);
    const __m512 scale = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(sa)),
                                                                 _mm_loadu_si128(sb), 1));
    const __m512 mins = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(sa + 1)),
                                                                _mm_loadu_si128(sb + 1), 1));
    for (int t = 0; t < T; ++t) {
      const int8_t* qg = q[t] + g * kGroup;
      __m512i dot = _mm512_setzero_si512();
      for (int v = 0; v < 8; ++v) {
        int32_t a;
        std::memcpy(&a, qg + 4 * v, 4);
        dot = _mm512_dpbusd_epi32(dot, wv[v], _mm512_set1_epi32(a));
      }
      // the 256-bit kernel's operations in its order: the same products bit for bit
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(dx[t][g])), acc[t]);
      acc[t] = _mm512_fmadd_ps(mins, _mm512_set1_ps(sx[t][g]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + (row0 + t) * n + col0, acc[t]);
}

void q4_blocks_vnni(const uint8_t* packed, const at::Half* scale_min, const QuantizedRows& qx, int64_t k, int64_t rows,
                    float* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  if (rows >= kWideMinRows) {   // pairs of blocks; an odd last block goes the 256-bit way below
    for (; begin + 1 < end; begin += 2) {
      for (int64_t r = 0; r < rows; r += kWideTile) {
        by_wide_tile(std::min(kWideTile, rows - r), [&](auto t) {
          q4_pair_vnni<decltype(t)::value>(packed + begin * groups * 128, scale_min + begin * groups * 16, qx, k,
                                           r, y, n, begin * kBlockRows);
        });
      }
    }
  }
  for_block_tiles(rows, begin, end, [&](auto t, int64_t b, int64_t r) {
    q4_block_vnni<decltype(t)::value>(packed + b * groups * 128, scale_min + b * groups * 16, qx, k, r, y, n,
                                          b * kBlockRows);
  });
}

}  // namespace

const Q4Blocks q4_blocks_avx512vnni = q4_blocks_vnni;

}  // namespace berth
#else
namespace berth {
const Q4Blocks q4_blocks_avx512vnni = nullptr;
}  // namespace berth
#endif
