// Quantized products shared by the native CPU step: activation rows rounded to int8 per group of 32, the
// int4 / int8 weight layouts, and the table of block kernels chosen once per process by cpuid
// (dispatch.cpp), as ggml-cpu lays its code out: one file per quant family and instruction set
// (q4_avx2.cpp, q4_avx512vnni.cpp, q4_scalar.cpp, q8_*.cpp), one dispatch table.
//
// ---- weight-only int4 / int8 x int8-quantized activations (llama.cpp's Q4_1 / Q8_0 x Q8 scheme) ----
// Each activation row is quantized per group of 32 inputs to int8 with a scale dx, so a group's dot
// product is an integer multiply-add over 32 pairs (AVX2 maddubs + madd) scaled by weight scale * dx.
// Small batches are bound by reading the weights: int4 reads 4.5 bits per weight, fp32 32.
//
// int4 layout: rows in blocks of 8, packed (N / 8, G, 4, 32) uint8. For block b, group g and
// vector v, byte 4 * i + e holds row 8b + i's code of input 32g + 4v + e in its low nibble and of
// input 32g + 16 + 4v + e in its high nibble (codes 0..15). So one 32-byte load and two masks give
// 8 rows x 4 inputs, which maddubs multiplies by 4 broadcast activations: each 32-bit lane stays one
// output column, a group's dot products land in one vector and the per-group scales apply as vectors
// (no horizontal sums). scale_min (N / 8, G, 2, 8) fp16: w = code * scale + min per row and group.
// int8 layout: the same blocks of 8 rows, qweight (N / 8, G, 8, 32) int8 where vector v holds inputs
// 32g + 4v .. 32g + 4v + 3 of each row (byte 4i + e); scales (N / 8, G, 8) fp16: w = code * scale.
#pragma once

// light includes: the kernel files compile in seconds (torch/extension.h alone costs ~30 s per file)
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace at {
using ::c10::Half;
class Tensor;
}  // namespace at

namespace berth {

constexpr int64_t kGroup = 32;
constexpr int64_t kTile = 4;       // activation rows per pass over a block of weight rows
constexpr int64_t kPrefetchBytes = 1024;  // software prefetch distance in the int4 weight stream
constexpr int64_t kBlockRows = 8;  // weight rows per block (int4 and int8 layouts)
constexpr int64_t kMaxGroups = 2048;  // K <= 65536 (kernels/quant.py NATIVE_MAX_K)

struct QuantizedRows {      // activations (M, K) as int8 per group of 32
  std::vector<int8_t> q;    // (M, K)
  std::vector<float> d;     // (M, G) scale
  std::vector<float> s;     // (M, G) scale * sum(q)
};

// Rows row0..row0+T-1 of qx (width k): their codes, scales and scaled sums, for a kernel's pass over T rows
template <int T>
struct RowPointers {
  const int8_t* q[T];
  const float* d[T];
  const float* s[T];
  RowPointers(const QuantizedRows& qx, int64_t k, int64_t row0) {
    const int64_t groups = k / kGroup;
    for (int t = 0; t < T; ++t) {
      q[t] = qx.q.data() + (row0 + t) * k;
      d[t] = qx.d.data() + (row0 + t) * groups;
      s[t] = qx.s.data() + (row0 + t) * groups;
    }
  }
};

// activations -> int8 per group of 32 (quant_rows.cpp)
// Groups [begin, end) of the flattened (rows * K / 32) sequence: group i is row i / groups, group
// i % groups. out holds at least that many rows of width k.
void quantize_range(const float* x, int64_t begin, int64_t end, QuantizedRows& out);
QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k);

// Columns 8b..8b+7 of y (rows, n) for weight blocks b in [begin, end), every activation row, from the
// int8-rounded activations qx (width k)
using Q4Blocks = void (*)(const uint8_t* packed, const at::Half* scale_min, const QuantizedRows& qx, int64_t k,
                          int64_t rows, float* y, int64_t n, int64_t begin, int64_t end);
using Q8Blocks = void (*)(const int8_t* qweight, const at::Half* scales, const QuantizedRows& qx, int64_t k,
                          int64_t rows, float* y, int64_t n, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;      // "avx512vnni", "avx2" or "scalar"
  Q4Blocks q4_blocks;
  Q8Blocks q8_blocks;
};

// The kernels for this CPU, filled once (cpuid; BERTH_ISA=avx2|scalar forces a lesser set for tests).
const KernelTable& kernels();

// Large batches through oneDNN bf16 (AMX where the CPU has it, dequant_bf16.cpp): products of at least
// bf16_min_rows() rows (0: never; BERTH_BF16_MIN_ROWS overrides) expand their quantized weight to bf16.
bool cpu_has_amx_bf16();
int64_t bf16_min_rows();
at::Tensor q4_to_bf16(const at::Tensor& packed, const at::Tensor& scale_min, int64_t n);
at::Tensor q8_to_bf16(const at::Tensor& qweight, const at::Tensor& scales, int64_t n);

// the kernels of each instruction set (nullptr where this build has none)
void q4_blocks_scalar(const uint8_t*, const at::Half*, const QuantizedRows&, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
void q8_blocks_scalar(const int8_t*, const at::Half*, const QuantizedRows&, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
extern const Q4Blocks q4_blocks_avx2, q4_blocks_avx512vnni;
extern const Q8Blocks q8_blocks_avx2, q8_blocks_avx512vnni;

template <typename Fn>
inline void by_tile(int64_t tile, Fn fn) {
  switch (tile) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, 4>{}); break;
  }
}

// The 512-bit kernels (two weight blocks per vector) take batches of at least kWideMinRows rows, kWideTile
// rows per pass over a pair of blocks (llama-3.1-8b shapes, M = 512, 2 cores: 1.4-1.6x the 256-bit kernels;
// at 8 rows on par)
constexpr int64_t kWideMinRows = 8;
constexpr int64_t kWideTile = 8;

template <typename Fn>
inline void by_wide_tile(int64_t tile, Fn fn) {
  switch (tile) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, kWideTile>{}); break;
  }
}

// fn(tile, b, r) for weight blocks b in [begin, end) and each tile of up to kTile activation rows from row r:
// the loop every ISA's q4_blocks / q8_blocks shares
template <typename Fn>
inline void for_block_tiles(int64_t rows, int64_t begin, int64_t end, Fn fn) {
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t r = 0; r < rows; r += kTile) {
      by_tile(std::min(kTile, rows - r), [&](auto t) { fn(t, b, r); });
    }
  }
}

}  // namespace berth
