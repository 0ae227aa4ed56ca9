// q8 block kernels for AVX-512 VNNI. vpdpbusd takes unsigned x signed bytes. Small batches (256-bit forms):
// the weights' signs move onto the activations (|w| x sign(w) q, as the AVX2 kernel does) and each group
// of 4 products lands in an int32 lane in one instruction (AVX2: maddubs + madd + add). Batches of
// kWideMinRows rows or more: two weight blocks per 512-bit vector (16 columns), and the weights made
// unsigned once per vector rather than the activations' signs flipped per row: w + 128 (w xor 0x80), whose
// extra 128 sum(q) per group is taken back with the activations' d sum(q) (QuantizedRows::s), as q4's min.
#include "quant.h"

#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>

namespace berth {
namespace {

template <int T>
void q8_block_vnni(const int8_t* w, const at::Half* scales, const QuantizedRows& qx, int64_t k, int64_t row0,
                   float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * 256;
    for (int p = 0; p < 4; ++p) {
      _mm_prefetch(reinterpret_cast<const char*>(wg) + 2 * kPrefetchBytes + 64 * p, _MM_HINT_T0);
    }
    __m256i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
    for (int v = 0; v < 8; ++v) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + v * 32));
      const __m256i wabs = _mm256_abs_epi8(wv);
      for (int t = 0; t < T; ++t) {
        int32_t a;
        std::memcpy(&a, q[t] + g * kGroup + 4 * v, 4);
        dot[t] = _mm256_dpbusd_epi32(dot[t], wabs, _mm256_sign_epi8(_mm256_set1_epi32(a), wv));
      }
    }
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * 8)));
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_mul_ps(scale, _mm256_broadcast_ss(dx[t] + g)), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(y + (row0 + t) * n + col0, acc[t]);
}

// Columns 8b..8b+15 of y (weight blocks b and b + 1: w, scales point at block b) for T activation rows from row0
template <int T>
void q8_pair_vnni(const int8_t* w, const at::Half* scales, const QuantizedRows& qx, int64_t k, int64_t row0,
                  float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const int8_t* w1 = w + groups * 256;
  const at::Half* s1 = scales + groups * 8;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  const float* const* sx = rows.s;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t *wa = w + g * 256, *wb = w1 + g * 256;
    const __m512 scale = _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * 8))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(s1 + g * 8)), 1));
    const __m512 back = _mm512_mul_ps(scale, _mm512_set1_ps(-128.f));
    __m512i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm512_setzero_si512();
    for (int v = 0; v < 8; ++v) {   // w + 128 as unsigned bytes, columns 0..7 low half, 8..15 high half
      const __m512i wu = _mm512_xor_si512(_mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wa + v * 32))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + v * 32)), 1), flip);
      for (int t = 0; t < T; ++t) {
        int32_t a;
        std::memcpy(&a, q[t] + g * kGroup + 4 * v, 4);
        dot[t] = _mm512_dpbusd_epi32(dot[t], wu, _mm512_set1_epi32(a));
      }
    }
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[t]), _mm512_mul_ps(scale, _mm512_set1_ps(dx[t][g])), acc[t]);
      acc[t] = _mm512_fmadd_ps(back, _mm512_set1_ps(sx[t][g]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + (row0 + t) * n + col0, acc[t]);
}

void q8_blocks_vnni(const int8_t* qweight, const at::Half* scales, const QuantizedRows& qx, int64_t k, int64_t rows,
                    float* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  if (rows >= kWideMinRows) {   // pairs of blocks; an odd last block goes the 256-bit way below
    for (; begin + 1 < end; begin += 2) {
      for (int64_t r = 0; r < rows; r += kWideTile) {
        by_wide_tile(std::min(kWideTile, rows - r), [&](auto t) {
          q8_pair_vnni<decltype(t)::value>(qweight + begin * groups * 256, scales + begin * groups * 8, qx, k, r, y,
                                           n, begin * kBlockRows);
        });
      }
    }
  }
  for_block_tiles(rows, begin, end, [&](auto t, int64_t b, int64_t r) {
    q8_block_vnni<decltype(t)::value>(qweight + b * groups * 256, scales + b * groups * 8, qx, k, r, y, n,
                                          b * kBlockRows);
  });
}

}  // namespace

const Q8Blocks q8_blocks_avx512vnni = q8_blocks_vnni;

}  // namespace berth
#else
namespace berth {
const Q8Blocks q8_blocks_avx512vnni = nullptr;
}  // namespace berth
#endif
