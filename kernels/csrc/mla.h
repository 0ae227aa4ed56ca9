// DeepSeek's multi-head latent attention in the native step (server/engine/models/mla.py is the Python path and
// the oracle): the per-row and per-(token, head) pieces between the layer's products, which cpu_model.cpp's team
// step runs split across its threads. The cache keeps one row of rank + rope values per token (the normed latent
// c and the rotated shared key k_pe); attention runs absorbed, as multi-query attention over those rows:
//
//   kv_a row  -> mla_store:  [rms_norm(c), rope(k_pe)] written to the token's cache row
//   q row     -> mla_query:  per head [W_uk[h]^T q_nope, rope(q_pe)]  (rank + rope)
//   attention over the rows (keys: whole rows, values: their first rank values) -> per head a latent (rank)
//   latent    -> mla_value:  per head W_uv[h] latent  (v), the input of o_proj
//
// Both per-head products run as rows of multiply-adds over contiguous weight rows (W_uk as stored, W_uv
// transposed), which the compiler vectorises.
//
// RoPE: DeepSeek's interleaved pairs are gathered into halves first (for queries and keys alike), then rotated
// as rotate-half, as mla.py does.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace berth {

struct Mla {
  int64_t heads = 0, nope = 0, rope = 0, rank = 0, v = 0, q_lora = 0;   // q_lora 0: no query LoRA (q_proj)
  float scale = 0.f, eps = 1e-6f;   // softmax scale (YaRN's mscale included); the latent norms' eps
  bool interleaved = true;
  at::Tensor q_a_norm, kv_a_norm;   // (q_lora,) or undefined, (rank,) fp32
  at::Tensor w_uk, w_uv_t;          // (heads, nope, rank), (heads, rank, v) fp32: kv_b_proj split per head

  int64_t q_width() const { return heads * (nope + rope); }   // q_proj / q_b_proj outputs
  int64_t row() const { return rank + rope; }                 // a cache row, and a query head in latent space
};

// (q_a_norm | None, kv_a_norm, w_uk, w_uv_t, heads, nope, rope, rank, v, q_lora, scale, eps, interleaved)
Mla make_mla(pybind11::tuple t);

// kva (rank + rope) of one token -> its cache row; cos_sin: the position's (rope) row, cos half then sin half
void mla_store(const Mla& m, const float* kva, const float* cos_sin, float* cache_row);
// q (nope + rope) of one token's head h -> out (rank + rope)
void mla_query(const Mla& m, int64_t h, const float* q, const float* cos_sin, float* out);
// latent (rank) of one token's head h -> out (v)
void mla_value(const Mla& m, int64_t h, const float* latent, float* out);

}  // namespace berth
