// CUDA implementation of embedding_rows_update_ (schema and CPU kernel in embedding_update.cpp;
// the formulas in embedding_update.h, shared with the CPU).
//
// The rows of one call are distinct, so no two threads write the same element: one thread per
// (row, column) element for the element-wise rules (SGD, Adagrad, lazy Adam), coalesced along the
// row; row-wise Adagrad first computes each row's multiplier (one thread per row, summing g^2 over
// the row in the CPU's order), then applies it element-wise. No shared memory, barriers or warp
// shuffles, so the CUDA-emulation build runs exactly this code on the CPU in the tests.
#include "embedding_update.h"

#include <ATen/OpMathType.h>

#include "cuda_launch.h"

namespace nextrec_fast {
namespace {

constexpr int kUpdateThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void elementwise_update_kernel(scalar_t* __restrict__ table, acc_t* __restrict__ state0,
                                          acc_t* __restrict__ state1, const int64_t* __restrict__ rows,
                                          const acc_t* __restrict__ grad, int64_t n, int64_t D, int64_t rule,
                                          acc_t h0, acc_t h1, acc_t h2, acc_t h3) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * D) return;
  const int64_t i = e / D, d = e % D;
  const int64_t at = rows[i] * D + d;
  const acc_t w = static_cast<acc_t>(table[at]);
  const acc_t g = grad[e];
  if (rule == kSgd) {
    table[at] = static_cast<scalar_t>(sgd_update(w, g, h0));
  } else if (rule == kAdagrad) {
    table[at] = static_cast<scalar_t>(adagrad_update(w, g, state0[at], h0, h1));
  } else {
    table[at] = static_cast<scalar_t>(sparse_adam_update(w, g, state0[at], state1[at], h0, h1, h2, h3));
  }
}

// Row-wise Adagrad, pass 1: per row, G += mean((g + wd w)^2) and its multiplier lr / (sqrt(G) + eps).
template <typename scalar_t, typename acc_t>
__global__ void rowwise_multiplier_kernel(const scalar_t* __restrict__ table, acc_t* __restrict__ sum,
                                          const int64_t* __restrict__ rows, const acc_t* __restrict__ grad,
                                          int64_t n, int64_t D, acc_t lr, acc_t eps, acc_t wd,
                                          acc_t* __restrict__ multiplier) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t r = rows[i];
  acc_t sq = 0;
  for (int64_t d = 0; d < D; ++d) {
    const acc_t gd = rowwise_decayed_grad(grad[i * D + d], static_cast<acc_t>(table[r * D + d]), wd);
    sq += gd * gd;
  }
  multiplier[i] = rowwise_adagrad_multiplier(sum[r], sq, D, lr, eps);
}

// Row-wise Adagrad, pass 2: w -= (g + wd w) * multiplier, element-wise.
template <typename scalar_t, typename acc_t>
__global__ void rowwise_apply_kernel(scalar_t* __restrict__ table, const int64_t* __restrict__ rows,
                                     const acc_t* __restrict__ grad, int64_t n, int64_t D, acc_t wd,
                                     const acc_t* __restrict__ multiplier) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * D) return;
  const int64_t i = e / D, d = e % D;
  const int64_t at = rows[i] * D + d;
  const acc_t w = static_cast<acc_t>(table[at]);
  table[at] = static_cast<scalar_t>(w - rowwise_decayed_grad(grad[e], w, wd) * multiplier[i]);
}

int64_t blocks_for(int64_t work) { return (work + kUpdateThreads - 1) / kUpdateThreads; }

void embedding_rows_update_cuda(const std::vector<at::Tensor>& tables, const std::vector<at::Tensor>& state,
                                const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& grads,
                                at::IntArrayRef rules, at::ArrayRef<double> hyper) {
  const std::vector<TableUpdate> updates = split_table_updates(tables, state, rows, grads, rules, hyper);
  if (updates.empty()) return;
  DeviceGuard guard(updates[0].table.device());
  // Every table's rows checked before any table changes: one device reduction and one sync.
  std::vector<at::Tensor> bad;
  for (const TableUpdate& u : updates)
    if (u.rows.numel() > 0) bad.push_back(((u.rows < 0) | (u.rows >= u.table.size(0))).any());
  if (!bad.empty()) {
    const at::Tensor flags = at::stack(bad).cpu();
    for (int64_t k = 0; k < flags.numel(); ++k)
      TORCH_CHECK_INDEX(!flags[k].item<bool>(), "embedding_rows_update_: a row out of range for a table of ",
                        updates[k].table.size(0), " rows");
  }
  auto stream = current_stream();
  for (const TableUpdate& u : updates) {
    const int64_t n = u.rows.numel(), D = u.table.size(1);
    if (n == 0 || D == 0) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.table.scalar_type(), "embedding_rows_update_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto hp = [&](size_t k) { return k < u.hyper.size() ? static_cast<acc_t>(u.hyper[k]) : acc_t(0); };
      scalar_t* table = u.table.data_ptr<scalar_t>();
      const int64_t* r = u.rows.data_ptr<int64_t>();
      const acc_t* g = u.grad.data_ptr<acc_t>();
      // Through pointers: a template-id's comma would split the launch macro's arguments.
      auto* const multiplier_kernel = &rowwise_multiplier_kernel<scalar_t, acc_t>;
      auto* const apply_kernel = &rowwise_apply_kernel<scalar_t, acc_t>;
      auto* const elementwise_kernel = &elementwise_update_kernel<scalar_t, acc_t>;
      if (u.rule == kRowwiseAdagrad) {
        at::Tensor multiplier = at::empty({n}, u.grad.options());
        NEXTREC_FAST_LAUNCH(multiplier_kernel, blocks_for(n), kUpdateThreads, stream, table,
                            u.state[0].data_ptr<acc_t>(), r, g, n, D, hp(0), hp(1), hp(2),
                            multiplier.data_ptr<acc_t>());
        NEXTREC_FAST_LAUNCH(apply_kernel, blocks_for(n * D), kUpdateThreads, stream, table,
                            r, g, n, D, hp(2), multiplier.data_ptr<acc_t>());
      } else {
        acc_t* s0 = u.state.size() > 0 ? u.state[0].data_ptr<acc_t>() : nullptr;
        acc_t* s1 = u.state.size() > 1 ? u.state[1].data_ptr<acc_t>() : nullptr;
        NEXTREC_FAST_LAUNCH(elementwise_kernel, blocks_for(n * D), kUpdateThreads, stream,
                            table, s0, s1, r, g, n, D, u.rule, hp(0), hp(1), hp(2), hp(3));
      }
    });
  }
}

}  // namespace
}  // namespace nextrec_fast

NEXTREC_FAST_LIBRARY_IMPL(NEXTREC_FAST_OP_NAMESPACE, NEXTREC_FAST_CUDA_DISPATCH_KEY, m) {
  m.impl("embedding_rows_update_", &nextrec_fast::embedding_rows_update_cuda);
}
