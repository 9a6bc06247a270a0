// The embedding_rows_update_ op's rules and argument checks, shared by its CPU kernel
// (embedding_update.cpp) and its CUDA kernel (embedding_update_cuda.cu) so that both run the same
// arithmetic in the same order: the emulated CUDA build equals the CPU bit for bit (the tests
// assert it); on a GPU, nvcc may fuse a multiply and an add, a difference of an ulp. The formulas
// and their sources are documented in nextrec_fast/optim.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "op_namespace.h"

namespace nextrec_fast {

enum UpdateRule : int64_t { kSgd = 0, kAdagrad = 1, kRowwiseAdagrad = 2, kSparseAdam = 3 };

// Per rule: how many state tensors and hyper-parameters it takes (see the op's schema comment).
constexpr size_t kRuleStates[] = {0, 1, 1, 2};
constexpr size_t kRuleHyper[] = {1, 2, 3, 4};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t update_sqrt(acc_t x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// w -= lr * g
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sgd_update(acc_t w, acc_t g, acc_t lr) {
  return w - lr * g;
}

// S += g^2; w -= clr * g / (sqrt(S) + eps)   (torch.optim.Adagrad; clr = lr / (1 + (step-1) lr_decay))
template <typename acc_t>
C10_HOST_DEVICE inline acc_t adagrad_update(acc_t w, acc_t g, acc_t& s, acc_t clr, acc_t eps) {
  s += g * g;
  return w - clr * (g / (update_sqrt(s) + eps));
}

// Row-wise Adagrad's per-element gradient with weight decay: g + wd * w (FBGEMM's L2 decay).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rowwise_decayed_grad(acc_t g, acc_t w, acc_t wd) {
  return wd != 0 ? g + wd * w : g;
}

// Row-wise Adagrad, once per row: G += mean(g^2) (sq = sum over the row's D columns);
// returns the row's step multiplier lr / (sqrt(G) + eps). Each element then does w -= g * multiplier.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rowwise_adagrad_multiplier(acc_t& G, acc_t sq, int64_t D, acc_t lr, acc_t eps) {
  G += sq / static_cast<acc_t>(D);
  return lr / (update_sqrt(G) + eps);
}

// Lazy Adam (torch.optim.SparseAdam on the touched rows): m += (1-b1)(g-m); v += (1-b2)(g^2-v);
// w -= step_size * m / (sqrt(v) + eps), step_size = lr * sqrt(1 - b2^t) / (1 - b1^t).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sparse_adam_update(acc_t w, acc_t g, acc_t& m, acc_t& v, acc_t step_size, acc_t b1,
                                                acc_t b2, acc_t eps) {
  m += (g - m) * (1 - b1);
  v += (g * g - v) * (1 - b2);
  return w - step_size * (m / (update_sqrt(v) + eps));
}

// One table's share of an embedding_rows_update_ call.
struct TableUpdate {
  at::Tensor table, rows, grad;
  std::vector<at::Tensor> state;
  std::vector<double> hyper;
  int64_t rule;
};

// Splits the op's flat arguments into per-table updates and checks everything that can be checked
// without reading tensor data (the callers check the rows' range: on the CPU by reading them, on
// CUDA on the device). Raises ValueError naming the problem.
inline std::vector<TableUpdate> split_table_updates(const std::vector<at::Tensor>& tables,
                                                    const std::vector<at::Tensor>& state,
                                                    const std::vector<at::Tensor>& rows,
                                                    const std::vector<at::Tensor>& grads, at::IntArrayRef rules,
                                                    at::ArrayRef<double> hyper) {
  const size_t n = tables.size();
  TORCH_CHECK_VALUE(rows.size() == n && grads.size() == n && rules.size() == n,
                    "embedding_rows_update_: tables, rows, grads and rules differ in length");
  std::vector<TableUpdate> out;
  size_t s = 0, h = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t rule = rules[i];
    TORCH_CHECK_VALUE(rule >= kSgd && rule <= kSparseAdam, "embedding_rows_update_: unknown rule ", rule);
    TORCH_CHECK_VALUE(s + kRuleStates[rule] <= state.size() && h + kRuleHyper[rule] <= hyper.size(),
                      "embedding_rows_update_: fewer state tensors or hyper-parameters than the rules take");
    TableUpdate u{tables[i], rows[i], grads[i],
                  std::vector<at::Tensor>(state.begin() + s, state.begin() + s + kRuleStates[rule]),
                  std::vector<double>(hyper.begin() + h, hyper.begin() + h + kRuleHyper[rule]), rule};
    s += kRuleStates[rule];
    h += kRuleHyper[rule];
    const at::Tensor& table = u.table;
    TORCH_CHECK_VALUE(table.dim() == 2 && table.is_contiguous(), "embedding_rows_update_: expected a contiguous [V, D] table");
    const int64_t V = table.size(0), D = table.size(1), count = u.rows.numel();
    TORCH_CHECK_VALUE(u.rows.scalar_type() == at::kLong && u.rows.dim() == 1 && u.rows.is_contiguous(),
                      "embedding_rows_update_: rows must be contiguous int64 [U]");
    TORCH_CHECK_VALUE(u.grad.dim() == 2 && u.grad.size(0) == count && u.grad.size(1) == D && u.grad.is_contiguous(),
                      "embedding_rows_update_: grad must be contiguous [U, D] = [", count, ", ", D, "]");
    const at::ScalarType acc = u.grad.scalar_type();
    const at::ScalarType expected = (table.scalar_type() == at::kHalf || table.scalar_type() == at::kBFloat16)
                                        ? at::kFloat : table.scalar_type();
    TORCH_CHECK_VALUE(acc == expected, "embedding_rows_update_: grad dtype ", acc, " for a ", table.scalar_type(),
                      " table (expected ", expected, ")");
    for (const at::Tensor* t : {&u.rows, &u.grad}) {
      TORCH_CHECK_VALUE(t->device() == table.device(), "embedding_rows_update_: a table on ", table.device(),
                        " with rows or grad on ", t->device());
    }
    for (const at::Tensor& st : u.state) {
      TORCH_CHECK_VALUE(st.scalar_type() == acc && st.is_contiguous() && st.size(0) == V &&
                            st.device() == table.device() &&
                            (rule == kRowwiseAdagrad ? st.dim() == 1 : (st.dim() == 2 && st.size(1) == D)),
                        "embedding_rows_update_: a state tensor of the wrong shape, dtype or device");
    }
    out.push_back(std::move(u));
  }
  TORCH_CHECK_VALUE(s == state.size() && h == hyper.size(),
                    "embedding_rows_update_: more state tensors or hyper-parameters than the rules take");
  return out;
}

}  // namespace nextrec_fast
