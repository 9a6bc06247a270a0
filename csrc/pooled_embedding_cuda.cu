// CUDA implementation of the nextrec_fast::pooled_embedding_* ops (schema and CPU kernels in
// pooled_embedding.cpp). Per-bag semantics come from pooling_common.h, shared with the CPU.
//
// Forward: one launch for all features; a group of G lanes (G = power of two covering the
// largest dim, at most a warp) pools one (feature, row) bag, accumulating in fp32.
// Backward: deterministic mode emits (global row, entry) pairs, stable-sorts them by row and
// reduces each run in a fixed order with a single writer per row; otherwise atomics (fp32/fp64
// tables only: fp16/bf16 always sort, to accumulate in fp32). The coalesced backward (the
// in-backward optimisers) reduces the same sorted runs into one row per distinct id.
#include "pooled_embedding.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>

#include "cuda_launch.h"

namespace nextrec_fast {
namespace {

constexpr int kThreads = 256;

#define NEXTREC_FAST_DISPATCH_CUDA_FLOATING(dtype, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, NAME, __VA_ARGS__)

// Copies the per-feature metadata (a few hundred bytes) to the device with one async copy
// from pinned memory (the caching host allocator keeps the staging buffer alive until done).
at::Tensor upload_meta(const PoolingPlan& plan) {
  const int64_t bytes = static_cast<int64_t>(plan.features.size() * sizeof(FeatureMeta));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(!kCudaEmulation));
  std::memcpy(host.data_ptr(), plan.features.data(), bytes);
  return host.to(plan.device, /*non_blocking=*/true);
}

int lanes_per_bag(const PoolingPlan& plan) {
  int64_t max_dim = 1;
  for (const auto& f : plan.features) max_dim = std::max(max_dim, f.dim);
  int g = 1;
  while (g < max_dim && g < 32) g *= 2;
  return g;
}

// Error record [kind, feature, row, value]; the first reporter wins.
__device__ void report_error(int64_t* err, int64_t kind, int64_t feature, int64_t row, int64_t value) {
  if (err == nullptr) return;
  unsigned long long* slot = reinterpret_cast<unsigned long long*>(err);
  if (atomicCAS(slot, 0ull, static_cast<unsigned long long>(kind)) == 0ull) {
    err[1] = feature;
    err[2] = row;
    err[3] = value;
  }
}

// Validates the offsets of a jagged bag (lane 0 of the bag's group reports).
__device__ void check_bag_offsets(const FeatureMeta& f, int64_t b, int64_t batch, int64_t* err) {
  if (f.offsets == nullptr) return;
  const int64_t lo = load_index(f.offsets, f.offsets_int64, b);
  const int64_t hi = load_index(f.offsets, f.offsets_int64, b + 1);
  if (b == 0 && lo != 0) report_error(err, kOffsetsBadEnds, f.feature, 0, lo);
  if (b == batch - 1 && hi != f.seq_len) report_error(err, kOffsetsBadEnds, f.feature, batch, hi);
  if (hi < lo) report_error(err, kOffsetsNotMonotone, f.feature, b, hi);
}

template <typename scalar_t>
__global__ void forward_kernel(const FeatureMeta* __restrict__ feats, int64_t num_bags, int64_t batch,
                               scalar_t* __restrict__ out, int64_t out_stride, int lanes, int64_t* err) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bag = thread / lanes;
  const int lane = static_cast<int>(thread % lanes);
  if (bag >= num_bags) return;
  const FeatureMeta& f = feats[bag / batch];
  const int64_t b = bag % batch;
  if (lane == 0) check_bag_offsets(f, b, batch, err);
  int64_t begin, end;
  bag_bounds(f, b, &begin, &end);
  begin = kept_begin(begin, end, f.max_len);
  const scalar_t* table = static_cast<const scalar_t*>(f.table);
  const scalar_t* weights = static_cast<const scalar_t*>(f.weights);
  scalar_t* dst = out + b * out_stride + f.out_offset;
  const int64_t D = f.dim;

  if (f.combiner == kConcat) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t id = load_index(f.ids, f.ids_int64, p);
      scalar_t* slot = dst + (p - begin) * D;
      if (!id_in_range(id, f.vocab)) {
        if (lane == 0) report_error(err, kIdOutOfRange, f.feature, b, id);
        for (int64_t d = lane; d < D; d += lanes) slot[d] = scalar_t(0);
        continue;
      }
      const scalar_t* row = table + id * D;
      for (int64_t d = lane; d < D; d += lanes) slot[d] = row[d];
    }
    return;
  }
  // Dims beyond 4 * lanes are handled in further passes over the bag.
  constexpr int kPerLane = 4;
  for (int64_t d0 = 0; d0 < D; d0 += static_cast<int64_t>(kPerLane) * lanes) {
    acc_t acc[kPerLane] = {0, 0, 0, 0};
    int64_t count = 0;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t id = load_index(f.ids, f.ids_int64, p);
      if (!id_in_range(id, f.vocab)) {
        if (lane == 0 && d0 == 0) report_error(err, kIdOutOfRange, f.feature, b, id);
        continue;
      }
      if (!is_pooled(id, f.mask_id)) continue;
      ++count;
      const acc_t w = weights != nullptr ? static_cast<acc_t>(weights[p]) : acc_t(1);
      const scalar_t* row = table + id * D;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t d = d0 + static_cast<int64_t>(k) * lanes + lane;
        if (d < D) acc[k] += weights != nullptr ? w * static_cast<acc_t>(row[d]) : static_cast<acc_t>(row[d]);
      }
    }
    const acc_t denom = mean_denominator<acc_t>(count);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t d = d0 + static_cast<int64_t>(k) * lanes + lane;
      if (d < D) dst[d] = static_cast<scalar_t>(f.combiner == kMean ? acc[k] / denom : acc[k]);
    }
  }
}

// Raises the first kernel-reported problem (one device sync).
void raise_if_failed(const PoolingPlan& plan, const std::vector<std::string>& names, const at::Tensor& err) {
  at::Tensor host = err.cpu();
  const int64_t* e = host.data_ptr<int64_t>();
  if (e[0] != kNoError) raise_kernel_error(plan, names, e[0], e[1], e[2], e[3]);
}

at::Tensor forward_cuda(const TensorList& tables, const TensorList& ids, const OptTensorList& offsets,
                        const TensorList& weights, at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners,
                        at::IntArrayRef mask_ids, at::IntArrayRef max_lens, const std::vector<std::string>& names,
                        at::IntArrayRef grad_padding_idx, bool check_ids, bool deterministic, bool sparse_grad) {
  // grad_padding_idx, deterministic and sparse_grad are for the autograd formula only.
  (void)grad_padding_idx, (void)deterministic, (void)sparse_grad;
  PoolingPlan plan = make_plan({tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids, max_lens, names});
  DeviceGuard guard(plan.device);
  at::Tensor out = at::empty({plan.batch, plan.total_dim}, plan.tables[0].options());
  const int64_t num_bags = static_cast<int64_t>(plan.features.size()) * plan.batch;
  if (num_bags == 0) return out;
  at::Tensor meta = upload_meta(plan);
  at::Tensor err = at::zeros({4}, plan.tables[0].options().dtype(at::kLong));
  const int lanes = lanes_per_bag(plan);
  const int64_t blocks = (num_bags * lanes + kThreads - 1) / kThreads;
  auto stream = current_stream();
  NEXTREC_FAST_DISPATCH_CUDA_FLOATING(plan.dtype, "pooled_embedding_forward_cuda", [&] {
    NEXTREC_FAST_LAUNCH(forward_kernel<scalar_t>, blocks, kThreads, stream,
                        reinterpret_cast<const FeatureMeta*>(meta.data_ptr()), num_bags, plan.batch,
                        out.data_ptr<scalar_t>(), plan.total_dim, lanes, err.data_ptr<int64_t>());
  });
  if (check_ids) raise_if_failed(plan, names, err);
  return out;
}

// ---- backward: dense table gradients ----------------------------------------------------

// Number of (kept or not) ids of a feature: every one gets an entry slot in the backward.
int64_t num_positions(const FeatureMeta& f, int64_t batch) {
  return f.offsets == nullptr ? batch * f.seq_len : f.seq_len;
}

// Per kept, gradient-receiving position either adds its contribution atomically
// (entry_key == nullptr) or records an entry (global row key, grad_out column, scale) for
// the deterministic sorted reduction. entry_base[fi] is the feature's first entry slot.
template <typename scalar_t>
__global__ void emit_kernel(const FeatureMeta* __restrict__ feats, int64_t num_bags, int64_t batch,
                            const scalar_t* __restrict__ grad_out, int64_t out_stride, int lanes,
                            const int64_t* __restrict__ entry_base, int64_t* __restrict__ entry_key,
                            int64_t* __restrict__ entry_src, at::opmath_type<scalar_t>* __restrict__ entry_denom,
                            at::opmath_type<scalar_t>* __restrict__ entry_weight,
                            int32_t* __restrict__ entry_feature) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bag = thread / lanes;
  const int lane = static_cast<int>(thread % lanes);
  if (bag >= num_bags) return;
  const int64_t fi = bag / batch;
  const FeatureMeta& f = feats[fi];
  // A feature whose table takes no gradient has no buffer to add into (atomics) or no entry
  // slots (entry_base -1: the sorted paths).
  if (entry_key == nullptr ? f.grad == nullptr : entry_base[fi] < 0) return;
  const int64_t b = bag % batch;
  int64_t begin, end;
  bag_bounds(f, b, &begin, &end);
  begin = kept_begin(begin, end, f.max_len);
  const int64_t count = f.combiner == kMean ? pooled_count(f, begin, end) : 0;
  const acc_t denom = f.combiner == kMean ? mean_denominator<acc_t>(count) : acc_t(1);
  const scalar_t* weights = static_cast<const scalar_t*>(f.weights);
  scalar_t* grad = static_cast<scalar_t*>(f.grad);
  const int64_t D = f.dim;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t id = load_index(f.ids, f.ids_int64, p);
    if (!receives_grad(f, id)) continue;
    const acc_t w = weights != nullptr ? static_cast<acc_t>(weights[p]) : acc_t(1);
    const int64_t src = b * out_stride + out_column(f, p - begin);
    if (entry_key != nullptr) {
      if (lane == 0) {
        const int64_t e = entry_base[fi] + p;
        entry_key[e] = f.row_base + id;
        entry_src[e] = src;
        entry_denom[e] = denom;
        entry_weight[e] = w;
        entry_feature[e] = static_cast<int32_t>(fi);
      }
      continue;
    }
    for (int64_t d = lane; d < D; d += lanes) {
      acc_t v = static_cast<acc_t>(grad_out[src + d]);
      if (f.combiner == kMean) v /= denom;
      gpuAtomicAdd(grad + id * D + d, static_cast<scalar_t>(v * w));
    }
  }
}

// One group per sorted entry; the group that starts a run of equal rows reduces the run in
// sorted (= stable, emission) order and writes the row once: deterministic. It adds the sum into
// the table's gradient row (out == nullptr), or, for the coalesced backward, writes it to row
// run_index[i] - first_run[t] of table t's block of `out` (at out_base[t]; acc_t, no rounding).
template <typename scalar_t>
__global__ void reduce_sorted_kernel(const FeatureMeta* __restrict__ feats, int64_t num_entries, int64_t sentinel,
                                     const scalar_t* __restrict__ grad_out, int lanes,
                                     const int64_t* __restrict__ sorted_key, const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ entry_src,
                                     const at::opmath_type<scalar_t>* __restrict__ entry_denom,
                                     const at::opmath_type<scalar_t>* __restrict__ entry_weight,
                                     const int32_t* __restrict__ entry_feature, const int64_t* __restrict__ run_index,
                                     const int64_t* __restrict__ out_base, const int64_t* __restrict__ first_run,
                                     at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = thread / lanes;
  const int lane = static_cast<int>(thread % lanes);
  if (i >= num_entries) return;
  const int64_t key = sorted_key[i];
  if (key == sentinel || (i > 0 && sorted_key[i - 1] == key)) return;
  const FeatureMeta& head = feats[entry_feature[order[i]]];
  const int64_t D = head.dim;
  scalar_t* grad_row = out == nullptr ? static_cast<scalar_t*>(head.grad) + (key - head.row_base) * D : nullptr;
  acc_t* out_row = out == nullptr ? nullptr
                                  : out + out_base[head.table_index] + (run_index[i] - first_run[head.table_index]) * D;
  for (int64_t d = lane; d < D; d += lanes) {
    acc_t acc = 0;
    for (int64_t j = i; j < num_entries && sorted_key[j] == key; ++j) {
      const int64_t e = order[j];
      acc_t v = static_cast<acc_t>(grad_out[entry_src[e] + d]);
      if (feats[entry_feature[e]].combiner == kMean) v /= entry_denom[e];
      acc += v * entry_weight[e];
    }
    if (out_row != nullptr) out_row[d] = acc;
    else grad_row[d] = static_cast<scalar_t>(static_cast<acc_t>(grad_row[d]) + acc);
  }
}

// The sorted paths' entries: one slot per position of every feature whose table is wanted
// (wanted[t] != 0), holding (global row key, grad_out offset, mean denominator, per-id weight,
// feature) where the position sends gradient, else the sentinel key; stable-sorted by key. Global
// rows number the wanted tables' rows one table after another, in table order.
struct SortedEntries {
  at::Tensor meta;  // the plan's FeatureMeta on the device, row_base set
  at::Tensor keys, order, src, denom, weight, feature;  // keys sorted; order: the entry of each sorted key
  int64_t count = 0;     // slots (sentinel ones included)
  int64_t sentinel = 0;  // = the number of global rows: sorts after every real key
  std::vector<int64_t> row_base;  // per table: its first global row
};

SortedEntries sort_entries(PoolingPlan& plan, at::IntArrayRef wanted, const at::Tensor& g) {
  SortedEntries s;
  s.row_base.assign(plan.tables.size(), 0);
  for (size_t t = 0; t < plan.tables.size(); ++t) {
    s.row_base[t] = s.sentinel;
    if (wanted[t]) s.sentinel += plan.tables[t].size(0);
  }
  std::vector<int64_t> entry_base(plan.features.size(), -1);
  for (size_t i = 0; i < plan.features.size(); ++i) {
    FeatureMeta& f = plan.features[i];
    f.row_base = s.row_base[f.table_index];
    if (!wanted[f.table_index]) continue;
    entry_base[i] = s.count;
    s.count += num_positions(f, plan.batch);
  }
  s.meta = upload_meta(plan);
  const auto long_opts = g.options().dtype(at::kLong);
  const int64_t num_bags = static_cast<int64_t>(plan.features.size()) * plan.batch;
  if (num_bags == 0 || s.count == 0) {
    s.count = 0;
    s.keys = s.order = at::empty({0}, long_opts);
    return s;
  }
  at::Tensor base_dev = at::tensor(entry_base, at::TensorOptions().dtype(at::kLong)).to(plan.device, true);
  // Slots of positions that send no gradient keep the sentinel key and sort last.
  at::Tensor keys = at::full({s.count}, s.sentinel, long_opts);
  s.src = at::empty({s.count}, long_opts);
  // Scales in the accumulation type (double for float64 tables: float would round their weights).
  const auto scale_opts = g.options().dtype(at::toOpMathType(plan.dtype));
  s.denom = at::empty({s.count}, scale_opts);
  s.weight = at::empty({s.count}, scale_opts);
  s.feature = at::empty({s.count}, g.options().dtype(at::kInt));
  const int lanes = lanes_per_bag(plan);
  const int64_t blocks = (num_bags * lanes + kThreads - 1) / kThreads;
  const FeatureMeta* feats = reinterpret_cast<const FeatureMeta*>(s.meta.data_ptr());
  NEXTREC_FAST_DISPATCH_CUDA_FLOATING(plan.dtype, "pooled_embedding_backward_cuda", [&] {
    NEXTREC_FAST_LAUNCH(emit_kernel<scalar_t>, blocks, kThreads, current_stream(), feats, num_bags, plan.batch,
                        g.data_ptr<scalar_t>(), plan.total_dim, lanes, base_dev.data_ptr<int64_t>(),
                        keys.data_ptr<int64_t>(), s.src.data_ptr<int64_t>(),
                        s.denom.data_ptr<at::opmath_type<scalar_t>>(), s.weight.data_ptr<at::opmath_type<scalar_t>>(),
                        s.feature.data_ptr<int32_t>());
  });
  std::tie(s.keys, s.order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return s;
}

void backward_into_dirty_cuda(const at::Tensor& grad_out, const TensorList& grads, const TensorList& tables,
                              const TensorList& ids, const OptTensorList& offsets, const TensorList& weights,
                              at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners,
                              at::IntArrayRef mask_ids, at::IntArrayRef max_lens, const std::vector<std::string>& names,
                              at::IntArrayRef grad_padding_idx, at::IntArrayRef table_needs_grad, bool deterministic,
                              const OptTensorList& dirty_rows) {
  PoolingPlan plan = backward_plan(grad_out, tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids,
                                        max_lens, names, grad_padding_idx);
  DeviceGuard guard(plan.device);
  attach_grads(plan, grads, table_needs_grad);
  TORCH_CHECK(dirty_rows.empty() || dirty_rows.size() == grads.size(), "pooled_embedding_backward_into_dirty: ",
              dirty_rows.size(), " dirty_rows entries for ", grads.size(), " gradient buffers");
  // The kernels add into the buffers: zero the dirty rows of those that list them, the rest whole.
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!dirty_rows.empty() && dirty_rows[i].has_value())
      grads[i].index_fill_(0, dirty_rows[i]->to(grads[i].device()), 0);
    else
      grads[i].zero_();
  }
  if (plan.batch == 0 || plan.features.empty()) return;
  at::Tensor g = grad_out.contiguous();
  const int lanes = lanes_per_bag(plan);
  auto stream = current_stream();
  // Atomics add into the gradient in its own dtype: for fp16/bf16 tables that rounds after every
  // contribution (a row hit often drifts by several ulps; found by the emulated tests), so those
  // always take the sorted path, which accumulates each row in fp32 and writes it once.
  const bool atomics = !deterministic && (plan.dtype == at::kFloat || plan.dtype == at::kDouble);
  if (atomics) {
    at::Tensor meta = upload_meta(plan);
    const int64_t num_bags = static_cast<int64_t>(plan.features.size()) * plan.batch;
    const int64_t blocks = (num_bags * lanes + kThreads - 1) / kThreads;
    NEXTREC_FAST_DISPATCH_CUDA_FLOATING(plan.dtype, "pooled_embedding_backward_cuda", [&] {
      NEXTREC_FAST_LAUNCH(emit_kernel<scalar_t>, blocks, kThreads, stream,
                          reinterpret_cast<const FeatureMeta*>(meta.data_ptr()), num_bags, plan.batch,
                          g.data_ptr<scalar_t>(), plan.total_dim, lanes, nullptr, nullptr, nullptr, nullptr,
                          nullptr, nullptr);
    });
    return;
  }
  const SortedEntries s = sort_entries(plan, table_needs_grad, g);
  if (s.count == 0) return;
  const int64_t reduce_blocks = (s.count * lanes + kThreads - 1) / kThreads;
  NEXTREC_FAST_DISPATCH_CUDA_FLOATING(plan.dtype, "pooled_embedding_backward_cuda", [&] {
    NEXTREC_FAST_LAUNCH(reduce_sorted_kernel<scalar_t>, reduce_blocks, kThreads, stream,
                        reinterpret_cast<const FeatureMeta*>(s.meta.data_ptr()), s.count, s.sentinel,
                        g.data_ptr<scalar_t>(), lanes, s.keys.data_ptr<int64_t>(), s.order.data_ptr<int64_t>(),
                        s.src.data_ptr<int64_t>(), s.denom.data_ptr<at::opmath_type<scalar_t>>(),
                        s.weight.data_ptr<at::opmath_type<scalar_t>>(), s.feature.data_ptr<int32_t>(), nullptr,
                        nullptr, nullptr, nullptr);
  });
}

void backward_into_cuda(const at::Tensor& grad_out, const TensorList& grads, const TensorList& tables,
                        const TensorList& ids, const OptTensorList& offsets, const TensorList& weights,
                        at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners, at::IntArrayRef mask_ids,
                        at::IntArrayRef max_lens, const std::vector<std::string>& names,
                        at::IntArrayRef grad_padding_idx, at::IntArrayRef table_needs_grad, bool deterministic) {
  backward_into_dirty_cuda(grad_out, grads, tables, ids, offsets, weights, weighted_features, table_index, combiners,
                           mask_ids, max_lens, names, grad_padding_idx, table_needs_grad, deterministic, {});
}

TensorList backward_cuda(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                         const OptTensorList& offsets, const TensorList& weights, at::IntArrayRef weighted_features, at::IntArrayRef table_index,
                         at::IntArrayRef combiners, at::IntArrayRef mask_ids, at::IntArrayRef max_lens,
                         const std::vector<std::string>& names, at::IntArrayRef grad_padding_idx,
                         at::IntArrayRef table_needs_grad, bool deterministic) {
  TensorList grads;
  for (size_t t = 0; t < tables.size() && t < table_needs_grad.size(); ++t)
    if (table_needs_grad[t]) grads.push_back(at::empty(tables[t].sizes(), tables[t].options()));
  backward_into_cuda(grad_out, grads, tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids, max_lens,
                     names, grad_padding_idx, table_needs_grad, deterministic);
  return grads;
}

// ---- backward: coalesced sparse gradients (the in-backward optimisers) ----------------------

// Per table needing a gradient: its distinct rows [U] (int64, ascending: the CPU op gives them in
// first-appearance order) then their summed gradients [U, D] (float32 for half tables, else the
// table's dtype); last, a bool tensor [tables needing a gradient]: whether each table's sums are
// all finite. Each row's sum adds its entries in the CPU op's order (features in order, positions
// in order) from zero: the emulated build gives the CPU's bits. Two syncs: the number of distinct
// rows and their split among the tables.
TensorList backward_coalesced_cuda(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                                   const OptTensorList& offsets, const TensorList& weights,
                                   at::IntArrayRef weighted_features, at::IntArrayRef table_index,
                                   at::IntArrayRef combiners, at::IntArrayRef mask_ids, at::IntArrayRef max_lens,
                                   const std::vector<std::string>& names, at::IntArrayRef grad_padding_idx,
                                   at::IntArrayRef table_needs_grad) {
  PoolingPlan plan = backward_plan(grad_out, tables, ids, offsets, weights, weighted_features, table_index, combiners,
                                   mask_ids, max_lens, names, grad_padding_idx);
  DeviceGuard guard(plan.device);
  TORCH_CHECK_VALUE(table_needs_grad.size() == plan.tables.size(), "pooled_embedding backward: table_needs_grad has ",
                    table_needs_grad.size(), " entries for ", plan.tables.size(), " tables");
  at::Tensor g = grad_out.contiguous();
  const SortedEntries s = sort_entries(plan, table_needs_grad, g);
  // Runs of equal keys: a sorted entry starts one where its key is real and differs from the
  // previous key; the runs' keys are the distinct global rows, ascending, hence table by table.
  at::Tensor head = s.keys < s.sentinel;
  if (s.count > 1) head.slice(0, 1).logical_and_(s.keys.slice(0, 1) != s.keys.slice(0, 0, s.count - 1));
  const at::Tensor distinct = s.keys.masked_select(head);
  const int64_t num_tables = static_cast<int64_t>(plan.tables.size());
  // Per table: the runs whose keys fall in its global rows [row_base, row_base + V).
  std::vector<int64_t> bounds;
  for (int64_t t = 0; t < num_tables; ++t) {
    bounds.push_back(s.row_base[t]);
    bounds.push_back(s.row_base[t] + (table_needs_grad[t] ? plan.tables[t].size(0) : 0));
  }
  const at::Tensor split =
      at::searchsorted(distinct, at::tensor(bounds, at::TensorOptions().dtype(at::kLong)).to(plan.device)).cpu();
  const int64_t* run_bounds = split.data_ptr<int64_t>();
  std::vector<int64_t> out_base(num_tables, 0), first_run(num_tables, 0);
  int64_t total = 0;
  for (int64_t t = 0; t < num_tables; ++t) {
    first_run[t] = run_bounds[2 * t];
    out_base[t] = total;
    total += (run_bounds[2 * t + 1] - run_bounds[2 * t]) * plan.tables[t].size(1);
  }
  at::Tensor flat = at::empty({total}, g.options().dtype(at::toOpMathType(plan.dtype)));
  if (s.count > 0 && total > 0) {
    const at::Tensor run_index = head.cumsum(0, at::kLong) - 1;
    const at::Tensor out_base_dev = at::tensor(out_base, at::TensorOptions().dtype(at::kLong)).to(plan.device, true);
    const at::Tensor first_run_dev = at::tensor(first_run, at::TensorOptions().dtype(at::kLong)).to(plan.device, true);
    const int lanes = lanes_per_bag(plan);
    const int64_t blocks = (s.count * lanes + kThreads - 1) / kThreads;
    NEXTREC_FAST_DISPATCH_CUDA_FLOATING(plan.dtype, "pooled_embedding_backward_coalesced_cuda", [&] {
      NEXTREC_FAST_LAUNCH(reduce_sorted_kernel<scalar_t>, blocks, kThreads, current_stream(),
                          reinterpret_cast<const FeatureMeta*>(s.meta.data_ptr()), s.count, s.sentinel,
                          g.data_ptr<scalar_t>(), lanes, s.keys.data_ptr<int64_t>(), s.order.data_ptr<int64_t>(),
                          s.src.data_ptr<int64_t>(), s.denom.data_ptr<at::opmath_type<scalar_t>>(),
                          s.weight.data_ptr<at::opmath_type<scalar_t>>(), s.feature.data_ptr<int32_t>(),
                          run_index.data_ptr<int64_t>(), out_base_dev.data_ptr<int64_t>(),
                          first_run_dev.data_ptr<int64_t>(), flat.data_ptr<at::opmath_type<scalar_t>>());
    });
  }
  TensorList out;
  std::vector<at::Tensor> finite;
  for (int64_t t = 0; t < num_tables; ++t) {
    if (!table_needs_grad[t]) continue;
    const int64_t lo = run_bounds[2 * t], hi = run_bounds[2 * t + 1], D = plan.tables[t].size(1);
    at::Tensor sums = flat.slice(0, out_base[t], out_base[t] + (hi - lo) * D).view({hi - lo, D});
    out.push_back(distinct.slice(0, lo, hi) - s.row_base[t]);
    finite.push_back(at::isfinite(sums).all());
    out.push_back(sums);
  }
  out.push_back(finite.empty() ? at::empty({0}, g.options().dtype(at::kBool)) : at::stack(finite));
  return out;
}

// ---- backward: per-id weights (one thread per position; weights are a rare option) ----------

template <typename scalar_t>
__global__ void weight_grad_kernel(FeatureMeta f, int64_t batch, const scalar_t* __restrict__ grad_out,
                                   int64_t out_stride, scalar_t* __restrict__ wgrad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = f.offsets == nullptr ? batch * f.seq_len : f.seq_len;
  if (p >= n) return;
  int64_t b;
  if (f.offsets == nullptr) {
    b = p / f.seq_len;
  } else {  // last bag whose start is <= p (upper bound over the offsets)
    int64_t lo = 0, hi = batch;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (load_index(f.offsets, f.offsets_int64, mid + 1) <= p) lo = mid + 1;
      else hi = mid;
    }
    b = lo;
  }
  wgrad[p] = scalar_t(0);
  if (b >= batch) return;
  int64_t begin, end;
  bag_bounds(f, b, &begin, &end);
  begin = kept_begin(begin, end, f.max_len);
  if (p < begin || p >= end) return;
  const int64_t id = load_index(f.ids, f.ids_int64, p);
  if (!id_in_range(id, f.vocab) || !is_pooled(id, f.mask_id)) return;  // before the bag's count
  const acc_t denom = f.combiner == kMean ? mean_denominator<acc_t>(pooled_count(f, begin, end)) : acc_t(1);
  wgrad[p] = static_cast<scalar_t>(position_weight_grad(f, grad_out + b * out_stride + f.out_offset, id, denom));
}

TensorList weight_backward_cuda(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                                const OptTensorList& offsets, const TensorList& weights,
                                at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners, at::IntArrayRef mask_ids,
                                at::IntArrayRef max_lens, const std::vector<std::string>& names) {
  PoolingPlan plan = backward_plan(grad_out, tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids,
                                        max_lens, names, {});
  DeviceGuard guard(plan.device);
  at::Tensor g = grad_out.contiguous();
  auto stream = current_stream();
  TensorList out(weights.size());
  for (size_t i = 0; i < plan.features.size(); ++i) {
    const FeatureMeta& f = plan.features[i];
    if (plan.weight_slot[i] < 0) continue;  // (an empty weights tensor has a null data pointer)
    at::Tensor wgrad = at::empty(weights[plan.weight_slot[i]].sizes(), weights[plan.weight_slot[i]].options());
    const int64_t n = wgrad.numel();
    if (n > 0) {
      NEXTREC_FAST_DISPATCH_CUDA_FLOATING(plan.dtype, "pooled_embedding_weight_backward_cuda", [&] {
        NEXTREC_FAST_LAUNCH(weight_grad_kernel<scalar_t>, (n + kThreads - 1) / kThreads, kThreads, stream, f,
                            plan.batch, g.data_ptr<scalar_t>(), plan.total_dim, wgrad.data_ptr<scalar_t>());
      });
    }
    out[plan.weight_slot[i]] = wgrad;
  }
  return out;
}

}  // namespace
}  // namespace nextrec_fast

NEXTREC_FAST_LIBRARY_IMPL(NEXTREC_FAST_OP_NAMESPACE, NEXTREC_FAST_CUDA_DISPATCH_KEY, m) {
  m.impl("pooled_embedding_forward", &nextrec_fast::forward_cuda);
  m.impl("pooled_embedding_backward", &nextrec_fast::backward_cuda);
  m.impl("pooled_embedding_backward_into", &nextrec_fast::backward_into_cuda);
  m.impl("pooled_embedding_backward_into_dirty", &nextrec_fast::backward_into_dirty_cuda);
  m.impl("pooled_embedding_backward_coalesced", &nextrec_fast::backward_coalesced_cuda);
  m.impl("pooled_embedding_weight_backward", &nextrec_fast::weight_backward_cuda);
}
