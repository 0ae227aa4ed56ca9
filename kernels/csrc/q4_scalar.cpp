// q4 block kernels in plain C++: the reference the vector kernels are tested against, and the path
// of a CPU without AVX2.
#include "quant.h"

namespace berth {
namespace {

// Columns 8b..8b+7 of y for T activation rows from row0: y[row0 + t, 8b + i] = w_{8b+i} . x[row0 + t].
template <int T>
void q4_block_scalar(const uint8_t* w, const at::Half* scale_min, const QuantizedRows& qx, int64_t k, int64_t row0,
              float* y, int64_t n, int64_t col0) {
  const int64_t groups = k / kGroup;
  const RowPointers<T> rows(qx, k, row0);
  const int8_t* const* q = rows.q;
  const float* const* dx = rows.d;
  const float* const* sx = rows.s;
  for (int t = 0; t < T; ++t) {
    for (int64_t i = 0; i < kBlockRows; ++i) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int dot = 0;
        for (int64_t v = 0; v < 4; ++v) {
          for (int64_t e = 0; e < 4; ++e) {
            const uint8_t byte = w[g * 128 + v * 32 + 4 * i + e];
            dot += (byte & 0x0F) * q[t][g * kGroup + 4 * v + e] + (byte >> 4) * q[t][g * kGroup + 16 + 4 * v + e];
          }
        }
        const float scale = static_cast<float>(scale_min[g * 16 + i]), mn = static_cast<float>(scale_min[g * 16 + 8 + i]);
        total += scale * dx[t][g] * static_cast<float>(dot) + mn * sx[t][g];
      }
      y[(row0 + t) * n + col0 + i] = total;
    }
  }
}

}  // namespace

// Columns 8b..8b+7 of y (rows, n) for weight blocks b in [begin, end), every activation row, from
// the int8-rounded activations qx (width k): int4 weights (q4_linear's layout) ...
void q4_blocks_scalar(const uint8_t* packed, const at::Half* scale_min, const QuantizedRows& qx, int64_t k, int64_t rows,
               float* y, int64_t n, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  for_block_tiles(rows, begin, end, [&](auto t, int64_t b, int64_t r) {
    q4_block_scalar<decltype(t)::value>(packed + b * groups * 128, scale_min + b * groups * 16, qx, k, r, y, n, b * kBlockRows);
  });
}

}  // namespace berth
