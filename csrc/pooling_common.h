// Per-bag semantics of nextrec 0.3.1's EmbeddingLayer pooling, shared by the CPU and CUDA
// kernels so that the CPU tests exercise exactly the logic the GPU runs.
//
// nextrec (basic/layers.py): seq[:, -max_len:] -> embedding -> mask (ids != padding id)
// -> bmm(mask, emb) [-> / (mask.sum() + 1e-16)] for sum/mean, flatten for concat (no mask).
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace nextrec_fast {

enum Combiner : int64_t { kSum = 0, kMean = 1, kConcat = 2 };

// Error kinds reported by the kernels (host and device), decoded into Python errors.
enum PoolingError : int64_t {
  kNoError = 0,
  kIdOutOfRange = 1,
  kOffsetsNotMonotone = 2,
  kOffsetsBadEnds = 3,
};

// Per-feature description the kernels read. Plain data so it can be copied to the device.
struct FeatureMeta {
  const void* ids;        // int32 or int64 (ids_int64)
  const void* offsets;    // jagged layout: [B + 1] int32/int64 (offsets_int64); nullptr: padded
  const void* weights;    // per-id weights (table dtype) or nullptr
  const void* table;      // [vocab, dim] contiguous rows
  void* grad;             // backward: the table's dense gradient or nullptr (no grad needed)
  int64_t vocab;
  int64_t dim;
  int64_t seq_len;        // padded layout: L (positions per row); jagged: number of values
  int64_t max_len;        // keep the last max_len positions of a bag; -1 keeps all
  int64_t mask_id;        // id skipped by sum/mean; -1 skips nothing
  int64_t grad_padding_idx;  // row that never receives gradient; -1 none
  int64_t combiner;
  int64_t out_offset;     // first output column of the feature
  int64_t out_width;      // dim (sum/mean) or kept_len * dim (concat)
  int64_t feature;        // index in the caller's feature list (error messages)
  int64_t table_index;    // which table (shared tables: several features)
  int64_t row_base;       // CUDA backward: first row of the table in the global row space
  int32_t ids_int64;
  int32_t offsets_int64;
};

C10_HOST_DEVICE inline int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i]
                  : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Positions [begin, end) of bag `row` in the flat ids, before truncation. Padded rows of a
// jagged layout whose offsets are broken are clamped to an empty/valid range (never OOB).
C10_HOST_DEVICE inline void bag_bounds(const FeatureMeta& f, int64_t row, int64_t* begin,
                                       int64_t* end) {
  if (f.offsets == nullptr) {
    *begin = row * f.seq_len;
    *end = *begin + f.seq_len;
    return;
  }
  int64_t b = load_index(f.offsets, f.offsets_int64, row);
  int64_t e = load_index(f.offsets, f.offsets_int64, row + 1);
  b = b < 0 ? 0 : (b > f.seq_len ? f.seq_len : b);
  e = e < b ? b : (e > f.seq_len ? f.seq_len : e);
  *begin = b;
  *end = e;
}

// nextrec keeps the LAST max_len positions (seq[:, -max_len:]).
C10_HOST_DEVICE inline int64_t kept_begin(int64_t begin, int64_t end, int64_t max_len) {
  return (max_len >= 0 && end - begin > max_len) ? end - max_len : begin;
}

C10_HOST_DEVICE inline bool id_in_range(int64_t id, int64_t vocab) {
  return static_cast<uint64_t>(id) < static_cast<uint64_t>(vocab);
}

// Does position with this id enter a sum/mean? (mask_id = -1 never equals a valid id.)
C10_HOST_DEVICE inline bool is_pooled(int64_t id, int64_t mask_id) { return id != mask_id; }

// nextrec's mean divides by (count + 1e-16): an all-padding bag gives 0 / 1e-16 = 0, and for
// count >= 1 the epsilon vanishes in fp32/fp64 rounding. Computed in the accumulation type.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t mean_denominator(int64_t count) {
  return static_cast<acc_t>(count) + static_cast<acc_t>(1e-16);
}

// Positions in [begin, end) that enter the sum/mean: the mean's count (shared by every path).
C10_HOST_DEVICE inline int64_t pooled_count(const FeatureMeta& f, int64_t begin, int64_t end) {
  int64_t count = 0;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t id = load_index(f.ids, f.ids_int64, p);
    count += id_in_range(id, f.vocab) && is_pooled(id, f.mask_id);
  }
  return count;
}

// Does a (kept, pooled) position with this id send gradient into the table?
C10_HOST_DEVICE inline bool receives_grad(const FeatureMeta& f, int64_t id) {
  if (!id_in_range(id, f.vocab) || id == f.grad_padding_idx) return false;
  return f.combiner == kConcat || is_pooled(id, f.mask_id);
}

// Gradient of one kept position's per-id weight: its table row dotted with the bag's output
// gradient `g`, divided by the mean's denominator `denom`; zero for an out-of-range or padding id.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t position_weight_grad(const FeatureMeta& f, const scalar_t* g, int64_t id, acc_t denom) {
  if (!id_in_range(id, f.vocab) || !is_pooled(id, f.mask_id)) return acc_t(0);
  const scalar_t* row = static_cast<const scalar_t*>(f.table) + id * f.dim;
  acc_t dot = 0;
  for (int64_t d = 0; d < f.dim; ++d) dot += static_cast<acc_t>(g[d]) * static_cast<acc_t>(row[d]);
  return f.combiner == kMean ? dot / denom : dot;
}

// Output column of position `slot` (0-based within the kept range) of a bag.
C10_HOST_DEVICE inline int64_t out_column(const FeatureMeta& f, int64_t slot) {
  return f.combiner == kConcat ? f.out_offset + slot * f.dim : f.out_offset;
}

}  // namespace nextrec_fast
