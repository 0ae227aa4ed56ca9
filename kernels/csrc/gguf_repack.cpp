// GGUF tensors -> the native kernels' layouts (q4_linear's and q8_linear's, see cpu_model.cpp), at load time.
//
// The Python version (kernels/gguf_repack.py, numpy) is the reference the tests compare this with; it
// converted the 135M default model in ~8 s, which would be ~8 minutes for an 8B model. This runs over rows
// in parallel with scalar code: it is load-time work, bound by reading the file.
//
// Block formats are ggml's (ggml-common.h); the dequantisation formulas follow ggml's reference
// dequantize_row_* so the float values (and the int8 re-quantisation rounding) match the gguf package's.
#include <torch/extension.h>

#include <cmath>
#include <cstring>

namespace {

// ggml type ids
enum GgmlType : int64_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13,
  kQ6_K = 14, kBF16 = 30
};

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline float bf16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  uint32_t f = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

// Q4_K / Q5_K: scale and min j (0..7) from the 12 packed bytes (ggml's get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

int64_t row_bytes(int64_t type, int64_t k) {
  switch (type) {
    case kF32: return 4 * k;
    case kF16: case kBF16: return 2 * k;
    case kQ4_0: return k / 32 * 18;
    case kQ4_1: return k / 32 * 20;
    case kQ5_0: return k / 32 * 22;
    case kQ5_1: return k / 32 * 24;
    case kQ8_0: return k / 32 * 34;
    case kQ4_K: return k / 256 * 144;
    case kQ5_K: return k / 256 * 176;
    case kQ6_K: return k / 256 * 210;
    default: TORCH_CHECK(false, "GGUF type ", type, " has no native conversion");
  }
  return 0;
}

// One row of k values of any supported type -> floats (ggml's dequantize_row_* formulas)
void dequantize_row(int64_t type, const uint8_t* x, int64_t k, float* y) {
  switch (type) {
    case kF32: std::memcpy(y, x, 4 * k); return;
    case kF16: for (int64_t i = 0; i < k; ++i) y[i] = half_at(x + 2 * i); return;
    case kBF16: for (int64_t i = 0; i < k; ++i) y[i] = bf16_at(x + 2 * i); return;
    case kQ4_0: case kQ4_1:
      for (int64_t b = 0; b < k / 32; ++b, y += 32) {
        const uint8_t* blk = x + b * (type == kQ4_0 ? 18 : 20);
        const float d = half_at(blk), m = type == kQ4_0 ? 0.f : half_at(blk + 2);
        const uint8_t* qs = blk + (type == kQ4_0 ? 2 : 4);
        for (int j = 0; j < 16; ++j) {
          if (type == kQ4_0) {
            y[j] = ((qs[j] & 0xF) - 8) * d;
            y[j + 16] = ((qs[j] >> 4) - 8) * d;
          } else {
            y[j] = (qs[j] & 0xF) * d + m;
            y[j + 16] = (qs[j] >> 4) * d + m;
          }
        }
      }
      return;
    case kQ5_0: case kQ5_1:
      for (int64_t b = 0; b < k / 32; ++b, y += 32) {
        const uint8_t* blk = x + b * (type == kQ5_0 ? 22 : 24);
        const float d = half_at(blk), m = type == kQ5_0 ? 0.f : half_at(blk + 2);
        uint32_t qh;
        std::memcpy(&qh, blk + (type == kQ5_0 ? 2 : 4), 4);
        const uint8_t* qs = blk + (type == kQ5_0 ? 6 : 8);
        for (int j = 0; j < 16; ++j) {
          const int x0 = (qs[j] & 0xF) | (((qh >> j) << 4) & 0x10);
          const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
          if (type == kQ5_0) {
            y[j] = (x0 - 16) * d;
            y[j + 16] = (x1 - 16) * d;
          } else {
            y[j] = x0 * d + m;
            y[j + 16] = x1 * d + m;
          }
        }
      }
      return;
    case kQ8_0:
      for (int64_t b = 0; b < k / 32; ++b, y += 32) {
        const uint8_t* blk = x + b * 34;
        const float d = half_at(blk);
        for (int j = 0; j < 32; ++j) y[j] = static_cast<int8_t>(blk[2 + j]) * d;
      }
      return;
    case kQ4_K:
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* blk = x + b * 144;
        const float d = half_at(blk), dmin = half_at(blk + 2);
        const uint8_t* scales = blk + 4;
        const uint8_t* q = blk + 16;
        for (int j = 0; j < 4; ++j, q += 32) {
          uint8_t sc, m;
          scale_min_k4(2 * j, scales, &sc, &m);
          const float d1 = d * sc, m1 = dmin * m;
          scale_min_k4(2 * j + 1, scales, &sc, &m);
          const float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
          for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
        }
      }
      return;
    case kQ5_K:
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* blk = x + b * 176;
        const float d = half_at(blk), dmin = half_at(blk + 2);
        const uint8_t* scales = blk + 4;
        const uint8_t* qh = blk + 16;
        const uint8_t* ql = blk + 48;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0; j < 4; ++j, ql += 32, u1 <<= 2, u2 <<= 2) {
          uint8_t sc, m;
          scale_min_k4(2 * j, scales, &sc, &m);
          const float d1 = d * sc, m1 = dmin * m;
          scale_min_k4(2 * j + 1, scales, &sc, &m);
          const float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
          for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
      }
      return;
    case kQ6_K:
      for (int64_t b = 0; b < k / 256; ++b) {
        const uint8_t* blk = x + b * 210;
        const uint8_t* ql = blk;
        const uint8_t* qh = blk + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        const float d = half_at(blk + 208);
        for (int n = 0; n < 2; ++n, y += 128, ql += 64, qh += 32, sc += 8) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = static_cast<int>((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = static_cast<int>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
          }
        }
      }
      return;
    default: TORCH_CHECK(false, "GGUF type ", type, " has no native conversion");
  }
}

// One row of Q4_0 / Q4_1 / Q4_K -> codes (k) 0..15, scale and min per group of 32: w = code * scale + min
void q4_row(int64_t type, const uint8_t* x, int64_t k, uint8_t* codes, float* scale, float* low) {
  if (type == kQ4_K) {
    for (int64_t b = 0; b < k / 256; ++b) {
      const uint8_t* blk = x + b * 144;
      const float d = half_at(blk), dmin = half_at(blk + 2);
      const uint8_t* q = blk + 16;
      for (int j = 0; j < 4; ++j, q += 32) {
        for (int h = 0; h < 2; ++h) {
          uint8_t sc, m;
          scale_min_k4(2 * j + h, blk + 4, &sc, &m);
          const int64_t g = b * 8 + 2 * j + h;
          scale[g] = d * sc;
          low[g] = -dmin * m;
          for (int l = 0; l < 32; ++l) codes[g * 32 + l] = h ? q[l] >> 4 : q[l] & 0xF;
        }
      }
    }
    return;
  }
  const int64_t size = type == kQ4_0 ? 18 : 20;
  for (int64_t g = 0; g < k / 32; ++g) {
    const uint8_t* blk = x + g * size;
    const float d = half_at(blk);
    scale[g] = d;
    low[g] = type == kQ4_0 ? -8.f * d : half_at(blk + 2);
    const uint8_t* qs = blk + size - 16;
    for (int j = 0; j < 16; ++j) {
      codes[g * 32 + j] = qs[j] & 0xF;
      codes[g * 32 + 16 + j] = qs[j] >> 4;
    }
  }
}

void check_raw(const at::Tensor& raw, int64_t type, int64_t k) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous(), "raw must be (N, row bytes) uint8");
  TORCH_CHECK(k % 32 == 0 && raw.size(1) == row_bytes(type, k), "raw rows do not match type ", type, " and K ", k);
}

}  // namespace

// raw (N, row bytes) uint8 of Q4_0 / Q4_1 / Q4_K, N % 8 == 0 -> (packed (N/8, K/32, 4, 32) uint8,
// scale_min (N/8, K/32, 2, 8) fp16) in q4_linear's layout
std::tuple<at::Tensor, at::Tensor> gguf_to_q4(const at::Tensor& raw, int64_t type, int64_t k) {
  check_raw(raw, type, k);
  TORCH_CHECK(type == kQ4_0 || type == kQ4_1 || type == kQ4_K, "gguf_to_q4: type ", type, " is not a 4-bit type");
  const int64_t n = raw.size(0), groups = k / 32, blocks = n / 8;
  TORCH_CHECK(n % 8 == 0, "gguf_to_q4 needs N % 8 == 0");
  at::Tensor packed = at::empty({blocks, groups, 4, 32}, at::kByte);
  at::Tensor scale_min = at::empty({blocks, groups, 2, 8}, at::kHalf);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* pk = packed.data_ptr<uint8_t>();
  at::Half* sm = scale_min.data_ptr<at::Half>();
  const int64_t rb = raw.size(1);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(8 * k);
    std::vector<float> scale(8 * groups), low(8 * groups);
    for (int64_t b = begin; b < end; ++b) {
      for (int i = 0; i < 8; ++i) {
        q4_row(type, src + (8 * b + i) * rb, k, codes.data() + i * k, scale.data() + i * groups, low.data() + i * groups);
      }
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* out = pk + (b * groups + g) * 128;
        for (int v = 0; v < 4; ++v) {
          for (int i = 0; i < 8; ++i) {
            for (int e = 0; e < 4; ++e) {
              const uint8_t lo = codes[i * k + 32 * g + 4 * v + e], hi = codes[i * k + 32 * g + 16 + 4 * v + e];
              out[v * 32 + 4 * i + e] = lo | (hi << 4);
            }
          }
        }
        at::Half* s = sm + (b * groups + g) * 16;
        for (int i = 0; i < 8; ++i) {
          s[i] = static_cast<at::Half>(scale[i * groups + g]);
          s[8 + i] = static_cast<at::Half>(low[i * groups + g]);
        }
      }
    }
  });
  return {packed, scale_min};
}

// raw (N, row bytes) of any supported type -> (qweight (ceil(N/8), K/32, 8, 32) int8, scales (.., K/32, 8)
// fp16) in q8_linear's layout: Q8_0 exactly, others dequantised and re-quantised symmetric per 32
// (d = fp16(max |w| / 127), code = round-half-even(w / d)); padding rows are zero
std::tuple<at::Tensor, at::Tensor> gguf_to_q8(const at::Tensor& raw, int64_t type, int64_t k) {
  check_raw(raw, type, k);
  const int64_t n = raw.size(0), groups = k / 32, blocks = (n + 7) / 8;
  at::Tensor qweight = at::zeros({blocks, groups, 8, 32}, at::kChar);
  at::Tensor scales = at::zeros({blocks, groups, 8}, at::kHalf);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  int8_t* qw = qweight.data_ptr<int8_t>();
  at::Half* sc = scales.data_ptr<at::Half>();
  const int64_t rb = raw.size(1);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    std::vector<int8_t> codes(k);
    std::vector<at::Half> d(groups);
    for (int64_t b = begin; b < end; ++b) {
      for (int i = 0; i < 8 && 8 * b + i < n; ++i) {
        const uint8_t* x = src + (8 * b + i) * rb;
        if (type == kQ8_0) {
          for (int64_t g = 0; g < groups; ++g) {
            d[g] = c10::Half(static_cast<uint16_t>(x[g * 34] | (x[g * 34 + 1] << 8)), c10::Half::from_bits());
            std::memcpy(codes.data() + g * 32, x + g * 34 + 2, 32);
          }
        } else {
          dequantize_row(type, x, k, row.data());
          for (int64_t g = 0; g < groups; ++g) {
            float amax = 0.f;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(row[g * 32 + j]));
            d[g] = static_cast<at::Half>(amax / 127.f);
            const float df = static_cast<float>(d[g]);
            const float inv = df > 0.f ? 1.f / df : 0.f;
            for (int j = 0; j < 32; ++j) {
              const float q = std::nearbyint(row[g * 32 + j] * inv);
              codes[g * 32 + j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, q)));
            }
          }
        }
        for (int64_t g = 0; g < groups; ++g) {
          int8_t* out = qw + (b * groups + g) * 256;
          for (int v = 0; v < 8; ++v) {
            for (int e = 0; e < 4; ++e) out[v * 32 + 4 * i + e] = codes[32 * g + 4 * v + e];
          }
          sc[(b * groups + g) * 8 + i] = d[g];
        }
      }
    }
  });
  return {qweight, scales};
}

// raw rows (R, row bytes) -> (R, K) fp32: the embedding lookup of a step's tokens
at::Tensor gguf_dequantize(const at::Tensor& raw, int64_t type, int64_t k) {
  check_raw(raw, type, k);
  at::Tensor out = at::empty({raw.size(0), k}, at::kFloat);
  const int64_t rb = raw.size(1);
  for (int64_t r = 0; r < raw.size(0); ++r) dequantize_row(type, raw.data_ptr<uint8_t>() + r * rb, k, out.data_ptr<float>() + r * k);
  return out;
}

void register_gguf_repack(pybind11::module& m) {
  m.def("gguf_to_q4", &gguf_to_q4, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "raw GGUF rows (N, bytes) of Q4_0/Q4_1/Q4_K (ggml type id) -> q4_linear's (packed, scale_min)");
  m.def("gguf_to_q8", &gguf_to_q8, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "raw GGUF rows (N, bytes) of any supported type -> q8_linear's (qweight, scales)");
  m.def("gguf_dequantize", &gguf_dequantize, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "raw GGUF rows (R, bytes) -> (R, K) fp32");
}
