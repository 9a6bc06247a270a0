// Optimiser updates of an embedding table's distinct rows, in place: the last step of the
// in-backward optimisers (nextrec_fast/optim.py, which documents the formulas). One pass per row
// over its D columns; rows are distinct, so rows run in parallel without races (the formulas:
// embedding_update.h, shared with the CUDA kernel). ATen's
// index_add_ of the same update costs 2.4x more on unsorted rows (it adds row by row), and
// index_select / index_copy_ around it cost a pass each.
#include "embedding_update.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace nextrec_fast {
namespace {

// Rows fetched ahead of the one being updated (its table row is a cache miss in a large table).
constexpr int64_t kPrefetch = 16;

// scalar_t: the table's dtype; acc_t: the gradient's and the state's (float32 for half tables).
template <typename scalar_t, typename acc_t>
void update_rows(scalar_t* table, const std::vector<acc_t*>& state, const int64_t* rows, const acc_t* grad,
                 int64_t n, int64_t D, int64_t rule, const std::vector<double>& h) {
  at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = rows[i];
      // Distinct rows of a large table are cache misses: fetch a few rows ahead.
      if (i + kPrefetch < i1) {
        const int64_t ahead = rows[i + kPrefetch];
        __builtin_prefetch(table + ahead * D, 1);
        if (rule == kRowwiseAdagrad) __builtin_prefetch(state[0] + ahead, 1);
        for (size_t k = 0; rule != kRowwiseAdagrad && k < state.size(); ++k) __builtin_prefetch(state[k] + ahead * D, 1);
      }
      scalar_t* w = table + r * D;
      const acc_t* g = grad + i * D;
      switch (rule) {
        case kSgd: {
          const acc_t lr = static_cast<acc_t>(h[0]);
          for (int64_t d = 0; d < D; ++d) w[d] = static_cast<scalar_t>(sgd_update(static_cast<acc_t>(w[d]), g[d], lr));
          break;
        }
        case kAdagrad: {
          const acc_t clr = static_cast<acc_t>(h[0]), eps = static_cast<acc_t>(h[1]);
          acc_t* s = state[0] + r * D;
          for (int64_t d = 0; d < D; ++d)
            w[d] = static_cast<scalar_t>(adagrad_update(static_cast<acc_t>(w[d]), g[d], s[d], clr, eps));
          break;
        }
        case kRowwiseAdagrad: {
          const acc_t lr = static_cast<acc_t>(h[0]), eps = static_cast<acc_t>(h[1]), wd = static_cast<acc_t>(h[2]);
          acc_t sq = 0;
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = rowwise_decayed_grad(g[d], static_cast<acc_t>(w[d]), wd);
            sq += gd * gd;
          }
          const acc_t multiplier = rowwise_adagrad_multiplier(state[0][r], sq, D, lr, eps);
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = rowwise_decayed_grad(g[d], static_cast<acc_t>(w[d]), wd);
            w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - gd * multiplier);
          }
          break;
        }
        default: {
          const acc_t step_size = static_cast<acc_t>(h[0]), b1 = static_cast<acc_t>(h[1]),
                      b2 = static_cast<acc_t>(h[2]), eps = static_cast<acc_t>(h[3]);
          acc_t* m = state[0] + r * D;
          acc_t* v = state[1] + r * D;
          for (int64_t d = 0; d < D; ++d)
            w[d] = static_cast<scalar_t>(
                sparse_adam_update(static_cast<acc_t>(w[d]), g[d], m[d], v[d], step_size, b1, b2, eps));
        }
      }
    }
  });
}

// Several tables in one call (one backward's updates); see the schema below. Every table is
// checked before any is updated.
void embedding_rows_update_cpu(const std::vector<at::Tensor>& tables, const std::vector<at::Tensor>& state,
                               const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& grads,
                               at::IntArrayRef rules, at::ArrayRef<double> hyper) {
  const std::vector<TableUpdate> updates = split_table_updates(tables, state, rows, grads, rules, hyper);
  for (const TableUpdate& u : updates) {
    const int64_t V = u.table.size(0), n = u.rows.numel();
    const int64_t* r = u.rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_INDEX(r[i] >= 0 && r[i] < V, "embedding_rows_update_: row ", r[i], " out of range");
  }
  for (const TableUpdate& u : updates) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.table.scalar_type(), "embedding_rows_update_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<acc_t*> s;
      for (const at::Tensor& t : u.state) s.push_back(t.data_ptr<acc_t>());
      update_rows<scalar_t, acc_t>(u.table.data_ptr<scalar_t>(), s, u.rows.data_ptr<int64_t>(), u.grad.data_ptr<acc_t>(),
                                   u.rows.numel(), u.table.size(1), u.rule, u.hyper);
    });
  }
}

}  // namespace
}  // namespace nextrec_fast

NEXTREC_FAST_LIBRARY_FRAGMENT(NEXTREC_FAST_OP_NAMESPACE, m) {
  // Per table i: tables[i] [V, D] (updated in place) with rules[i] (0 SGD, 1 Adagrad, 2 row-wise
  // Adagrad, 3 lazy (sparse) Adam), its distinct rows[i] int64 [U] and their summed grads[i] [U, D]
  // (float32 for half tables, else the table's dtype). Its state tensors (updated; per rule: none;
  // [V, D] sum; [V] sum; [V, D] exp_avg and exp_avg_sq, in the grad's dtype) and hyper-parameters
  // (per rule: [lr]; [clr, eps]; [lr, eps, weight_decay]; [step_size, beta1, beta2, eps]) follow
  // each other in `state` and `hyper`, in table order. CPU and CUDA.
  m.def("embedding_rows_update_(Tensor(a!)[] tables, Tensor(b!)[] state, Tensor[] rows, Tensor[] grads, int[] rules, "
        "float[] hyper) -> ()");
}

// The CUDA-emulation test build registers embedding_update_cuda.cu's host code for CPU tensors.
#ifndef NEXTREC_FAST_CUDA_EMULATION
NEXTREC_FAST_LIBRARY_IMPL(NEXTREC_FAST_OP_NAMESPACE, CPU, m) {
  m.impl("embedding_rows_update_", &nextrec_fast::embedding_rows_update_cpu);
}
#endif
