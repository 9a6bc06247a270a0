// Host-side plan of one multi-feature pooling call, shared by the CPU (.cpp) and CUDA (.cu)
// implementations: argument validation, output layout and the per-feature FeatureMeta.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "op_namespace.h"
#include "pooling_common.h"


namespace nextrec_fast {

using TensorList = std::vector<at::Tensor>;
using OptTensorList = std::vector<std::optional<at::Tensor>>;

// The op arguments that describe the features (everything but grad_out / grads).
struct PoolingArgs {
  const TensorList& tables;
  const TensorList& ids;
  const OptTensorList& offsets;
  const TensorList& weights;               // per-id weights of the features in weighted_features
  at::IntArrayRef weighted_features;
  at::IntArrayRef table_index;
  at::IntArrayRef combiners;
  at::IntArrayRef mask_ids;
  at::IntArrayRef max_lens;
  const std::vector<std::string>& names;
};

struct PoolingPlan {
  std::vector<FeatureMeta> features;
  // Contiguous versions of the inputs: they own the memory the FeatureMeta pointers read.
  TensorList tables, ids, offsets, weights;
  std::vector<int64_t> weight_slot;  // per feature: index into weights or -1
  std::vector<void*> table_grads;  // backward: per table, its gradient buffer or nullptr
  int64_t batch = 0;
  int64_t total_dim = 0;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
};

// Validates shapes, dtypes and devices (raising ValueError/TypeError that name the feature)
// and lays out the output. Does not read tensor data (ids, offsets): the kernels check those.
PoolingPlan make_plan(const PoolingArgs& args, at::IntArrayRef grad_padding_idx = {});

// Raises the Python error for a kernel-reported problem (PoolingError codes).
[[noreturn]] void raise_kernel_error(const PoolingPlan& plan, const std::vector<std::string>& names,
                                     int64_t kind, int64_t feature, int64_t row, int64_t value);

// make_plan for a backward call, plus the checks of grad_out against the plan.
PoolingPlan backward_plan(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                          const OptTensorList& offsets, const TensorList& weights, at::IntArrayRef weighted_features,
                          at::IntArrayRef table_index, at::IntArrayRef combiners, at::IntArrayRef mask_ids,
                          at::IntArrayRef max_lens, const std::vector<std::string>& names,
                          at::IntArrayRef grad_padding_idx);

// Attaches grads[k] to the k-th table that needs a gradient; checks their shapes.
void attach_grads(PoolingPlan& plan, const TensorList& grads, at::IntArrayRef table_needs_grad_mask);

}  // namespace nextrec_fast
