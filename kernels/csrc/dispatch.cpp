// The block kernels for this CPU, chosen once per process from cpuid (as ggml-cpu fills its type traits):
// AVX-512 VNNI (+VL) where the CPU has it, else AVX2 (+FMA, F16C), else plain C++. A kernel is only in the
// table if this build compiled it AND the CPU reports its instructions, so no instruction the CPU lacks is
// ever executed. BERTH_ISA=avx2|scalar picks a lesser set (tests compare the paths on one machine).
#include "quant.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace berth {
namespace {

bool cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx512vnni") == 0) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
  }
  if (std::strcmp(feature, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return false;
}

KernelTable choose() {
  const char* forced = std::getenv("BERTH_ISA");
  const std::string want = forced ? forced : "";
  KernelTable table{"scalar", q4_blocks_scalar, q8_blocks_scalar};
  const bool allow_vnni = want.empty() || want == "avx512vnni";
  const bool allow_avx2 = want.empty() || want == "avx512vnni" || want == "avx2";
  if (allow_avx2 && q4_blocks_avx2 && q8_blocks_avx2 && cpu_has("avx2")) {
    table = {"avx2", q4_blocks_avx2, q8_blocks_avx2};
  }
  if (allow_vnni && q4_blocks_avx512vnni && q8_blocks_avx512vnni && cpu_has("avx512vnni")) {
    table = {"avx512vnni", q4_blocks_avx512vnni, q8_blocks_avx512vnni};
  }
  return table;
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable table = choose();
  return table;
}

}  // namespace berth
