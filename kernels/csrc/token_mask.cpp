// Grammar token masks (structured outputs): logits of tokens a bitmask forbids become -inf, in place.
// Bitmask layout is llguidance's: row r holds ceil(V / 32) int32 words, bit t % 32 of word t / 32 set
// = token t allowed. A word of all ones (most of a JSON string's mask) is skipped whole.
#include <torch/extension.h>

#include <limits>

namespace {

void apply_token_bitmask(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "apply_token_bitmask: logits must be contiguous (B, V) fp32");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "apply_token_bitmask: rows must be (R,) int64");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous() &&
                  bitmask.size(0) >= rows.size(0),
              "apply_token_bitmask: bitmask must be contiguous (>= R, W) int32");
  const int64_t vocab = logits.size(1), words = bitmask.size(1), num_rows = rows.size(0);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < num_rows; ++r) {
    TORCH_CHECK(row_ids[r] >= 0 && row_ids[r] < logits.size(0), "apply_token_bitmask: row out of range");
  }
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < num_rows; ++r) {
    float* out = logits.data_ptr<float>() + row_ids[r] * vocab;
    const uint32_t* mask = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>()) + r * words;
    for (int64_t w = 0; w * 32 < vocab; ++w) {
      const uint32_t bits = w < words ? mask[w] : 0u;   // tokens past the mask's width are forbidden
      if (bits == 0xFFFFFFFFu) continue;
      const int64_t end = std::min<int64_t>(32, vocab - w * 32);
      float* block = out + w * 32;
      for (int64_t b = 0; b < end; ++b) {
        if (!((bits >> b) & 1u)) block[b] = neg_inf;
      }
    }
  }
}

}  // namespace

void register_token_mask(pybind11::module& m) {
  m.def("apply_token_bitmask", &apply_token_bitmask, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "logits (B, V) fp32 in place: rows[i] keeps only the tokens bitmask[i] allows (llguidance layout)");
}
