// Large batches on CPUs with AMX: a quantized weight is expanded to bf16 for one product and multiplied by
// oneDNN (at::linear in bf16), which runs on the AMX tiles. Measured on a Sapphire Rapids (issue 13):
// bf16 F.linear reaches ~900 GFLOP/s at 64 rows and ~1,600 at 256, against ~160 for the int8-activation
// kernels, so past a few dozen rows the expansion (one pass over the weight) is paid back many times.
// On CPUs without AMX bf16 GEMM is slower than our kernels (this file's path is then off by default;
// BERTH_BF16_MIN_ROWS forces it, which the tests use to check it anywhere).
#include "quant.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace berth {

bool cpu_has_amx_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) return (d >> 22) & 1;  // CPUID.(7,0):EDX[22] AMX-BF16
#endif
  return false;
}

int64_t bf16_min_rows() {
  static const int64_t rows = [] {
    const char* forced = std::getenv("BERTH_BF16_MIN_ROWS");
    if (forced && *forced) return static_cast<int64_t>(std::stoll(forced));
    return cpu_has_amx_bf16() ? int64_t{64} : int64_t{0};   // 0: never
  }();
  return rows;
}

// packed (N/8, G, 4, 32) + scale_min (N/8, G, 2, 8) -> (n, K) bf16
at::Tensor q4_to_bf16(const at::Tensor& packed, const at::Tensor& scale_min, int64_t n) {
  const int64_t blocks = packed.size(0), groups = packed.size(1), k = groups * kGroup;
  at::Tensor out = at::empty({blocks * kBlockRows, k}, at::kBFloat16);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::Half* sm = scale_min.data_ptr<at::Half>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* w = p + (b * groups + g) * 128;
        const at::Half* s = sm + (b * groups + g) * 16;
        for (int i = 0; i < 8; ++i) {
          const float scale = s[i], mn = s[8 + i];
          at::BFloat16* row = o + (b * 8 + i) * k + g * kGroup;
          for (int v = 0; v < 4; ++v) {
            for (int e = 0; e < 4; ++e) {
              const uint8_t byte = w[v * 32 + 4 * i + e];
              row[4 * v + e] = static_cast<at::BFloat16>((byte & 0x0F) * scale + mn);
              row[16 + 4 * v + e] = static_cast<at::BFloat16>((byte >> 4) * scale + mn);
            }
          }
        }
      }
    }
  });
  return n == out.size(0) ? out : out.narrow(0, 0, n);
}

// qweight (N/8, G, 8, 32) + scales (N/8, G, 8) -> (n, K) bf16
at::Tensor q8_to_bf16(const at::Tensor& qweight, const at::Tensor& scales, int64_t n) {
  const int64_t blocks = qweight.size(0), groups = qweight.size(1), k = groups * kGroup;
  at::Tensor out = at::empty({blocks * kBlockRows, k}, at::kBFloat16);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        const int8_t* w = q + (b * groups + g) * 256;
        for (int i = 0; i < 8; ++i) {
          const float scale = sc[(b * groups + g) * 8 + i];
          at::BFloat16* row = o + (b * 8 + i) * k + g * kGroup;
          for (int v = 0; v < 8; ++v) {
            for (int e = 0; e < 4; ++e) row[4 * v + e] = static_cast<at::BFloat16>(w[v * 32 + 4 * i + e] * scale);
          }
        }
      }
    }
  });
  return n == out.size(0) ? out : out.narrow(0, 0, n);
}

}  // namespace berth
