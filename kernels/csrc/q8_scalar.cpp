// q8 block kernels in plain C++: the reference the vector kernels are tested against, and the path
// of a CPU without AVX2.
#include "quant.h"

namespace berth {
namespace {

// Columns 8b..8b+7 of y for T activation rows, int8 weights: the signs move onto the activations so
// that maddubs multiplies |w| (unsigned) by sign(w) * q; each product pair needs int32 (|sum| < 2^15 + 1).
template <int T>
void q8_block_scalar(const int8_t* w, const at::Half* scales, const QuantizedRows& qx, int64_t k, int64_t row0,
              float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  for (int t = 0; t < T; ++t) {
    for (int64_t i = 0; i < kBlockRows; ++i) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int dot = 0;
        for (int64_t v = 0; v < 8; ++v) {
          for (int64_t e = 0; e < 4; ++e) dot += w[g * 256 + v * 32 + 4 * i + e] * q[t][g * kGroup + 4 * v + e];
        }
        total += static_cast<float>(scales[g * 8 + i]) * dx[t][g] * static_cast<float>(dot);
      }
      y[(row0 + t) * n + col0 + i] = total;
    }
  }
}

}  // namespace

// ... or int8 weights (q8_linear's layout)
void q8_blocks_scalar(const int8_t* qweight, const at::Half* scales, const QuantizedRows& qx, int64_t k, int64_t rows,
               float* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  for_block_tiles(rows, begin, end, [&](auto t, int64_t b, int64_t r) {
    q8_block_scalar<decltype(t)::value>(qweight + b * groups * 256, scales + b * groups * 8, qx, k, r, y, n, b * kBlockRows);
  });
}

}  // namespace berth
