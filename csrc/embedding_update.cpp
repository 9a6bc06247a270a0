// Optimiser updates of an embedding table's distinct rows, in place: the last step of the
// in-backward optimisers (nextrec_fast/optim.py, which documents the formulas). One pass per row
// over its D columns; rows are distinct, so rows run in parallel without races. ATen's
// index_add_ of the same update costs 2.4x more on unsorted rows (it adds row by row), and
// index_select / index_copy_ around it cost a pass each.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace nextrec_fast {
namespace {

enum Rule : int64_t { kSgd = 0, kAdagrad = 1, kRowwiseAdagrad = 2, kSparseAdam = 3 };

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
        case kSgd: {  // w -= lr * g
          const acc_t lr = static_cast<acc_t>(h[0]);
          for (int64_t d = 0; d < D; ++d) w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - lr * g[d]);
          break;
        }
        case kAdagrad: {  // S += g^2; w -= clr * g / (sqrt(S) + eps)
          const acc_t clr = static_cast<acc_t>(h[0]), eps = static_cast<acc_t>(h[1]);
          acc_t* s = state[0] + r * D;
          for (int64_t d = 0; d < D; ++d) {
            s[d] += g[d] * g[d];
            w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - clr * (g[d] / (std::sqrt(s[d]) + eps)));
          }
          break;
        }
        case kRowwiseAdagrad: {  // g += wd * w; G += mean(g^2); w -= lr * g / (sqrt(G) + eps)
          const acc_t lr = static_cast<acc_t>(h[0]), eps = static_cast<acc_t>(h[1]), wd = static_cast<acc_t>(h[2]);
          acc_t sq = 0;
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = wd != 0 ? g[d] + wd * static_cast<acc_t>(w[d]) : g[d];
            sq += gd * gd;
          }
          acc_t& G = state[0][r];
          G += sq / static_cast<acc_t>(D);
          const acc_t multiplier = lr / (std::sqrt(G) + eps);
          for (int64_t d = 0; d < D; ++d) {
            const acc_t gd = wd != 0 ? g[d] + wd * static_cast<acc_t>(w[d]) : g[d];
            w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - gd * multiplier);
          }
          break;
        }
        default: {  // lazy Adam: m += (1-b1)(g-m); v += (1-b2)(g^2-v); w -= step_size * m / (sqrt(v)+eps)
          const acc_t step_size = static_cast<acc_t>(h[0]), b1 = static_cast<acc_t>(h[1]),
                      b2 = static_cast<acc_t>(h[2]), eps = static_cast<acc_t>(h[3]);
          acc_t* m = state[0] + r * D;
          acc_t* v = state[1] + r * D;
          for (int64_t d = 0; d < D; ++d) {
            m[d] += (g[d] - m[d]) * (1 - b1);
            v[d] += (g[d] * g[d] - v[d]) * (1 - b2);
            w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - step_size * (m[d] / (std::sqrt(v[d]) + eps)));
          }
        }
      }
    }
  });
}

// One table: table [V, D] (updated), state (updated; per rule: none; [V, D] sum; [V] sum;
// [V, D] exp_avg and exp_avg_sq), rows [U] int64 distinct, grad [U, D] in the state's dtype
// (float32 for half tables, else the table's), hyper per rule: [lr]; [clr, eps];
// [lr, eps, weight_decay]; [step_size, beta1, beta2, eps].
// check_only: validate, change nothing (every table is checked before any is updated).
void update_table(const at::Tensor& table, const std::vector<at::Tensor>& state, const at::Tensor& rows,
                  const at::Tensor& grad, int64_t rule, const std::vector<double>& h, bool check_only) {
  TORCH_CHECK_VALUE(table.dim() == 2 && table.is_contiguous(), "embedding_rows_update_: expected a contiguous [V, D] table");
  const int64_t V = table.size(0), D = table.size(1), n = rows.numel();
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
                    "embedding_rows_update_: rows must be contiguous int64 [U]");
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == D && grad.is_contiguous(),
                    "embedding_rows_update_: grad must be contiguous [U, D] = [", n, ", ", D, "]");
  const at::ScalarType acc = grad.scalar_type();
  const at::ScalarType expected = (table.scalar_type() == at::kHalf || table.scalar_type() == at::kBFloat16)
                                      ? at::kFloat : table.scalar_type();
  TORCH_CHECK_VALUE(acc == expected, "embedding_rows_update_: grad dtype ", acc, " for a ", table.scalar_type(),
                    " table (expected ", expected, ")");
  for (const at::Tensor& s : state) {
    TORCH_CHECK_VALUE(s.scalar_type() == acc && s.is_contiguous() && s.size(0) == V &&
                          (rule == kRowwiseAdagrad ? s.dim() == 1 : (s.dim() == 2 && s.size(1) == D)),
                      "embedding_rows_update_: a state tensor of the wrong shape or dtype");
  }
  const int64_t* r = rows.data_ptr<int64_t>();
  if (check_only) {
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_INDEX(r[i] >= 0 && r[i] < V, "embedding_rows_update_: row ", r[i], " out of range");
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "embedding_rows_update_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t*> s;
    for (const at::Tensor& t : state) s.push_back(t.data_ptr<acc_t>());
    update_rows<scalar_t, acc_t>(table.data_ptr<scalar_t>(), s, r, grad.data_ptr<acc_t>(), n, D, rule, h);
  });
}

// Several tables in one call (one backward's updates): per table i, rules[i]; its state tensors
// and hyper-parameters follow each other in `state` and `hyper`, in table order, as many as its
// rule takes.
void embedding_rows_update_cpu(const std::vector<at::Tensor>& tables, const std::vector<at::Tensor>& state,
                               const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& grads,
                               at::IntArrayRef rules, at::ArrayRef<double> hyper) {
  static const size_t kStates[] = {0, 1, 1, 2};
  static const size_t kHyper[] = {1, 2, 3, 4};
  const size_t n = tables.size();
  TORCH_CHECK_VALUE(rows.size() == n && grads.size() == n && rules.size() == n,
                    "embedding_rows_update_: tables, rows, grads and rules differ in length");
  size_t s = 0, h = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t rule = rules[i];
    TORCH_CHECK_VALUE(rule >= kSgd && rule <= kSparseAdam, "embedding_rows_update_: unknown rule ", rule);
    TORCH_CHECK_VALUE(s + kStates[rule] <= state.size() && h + kHyper[rule] <= hyper.size(),
                      "embedding_rows_update_: fewer state tensors or hyper-parameters than the rules take");
    s += kStates[rule];
    h += kHyper[rule];
  }
  TORCH_CHECK_VALUE(s == state.size() && h == hyper.size(),
                    "embedding_rows_update_: more state tensors or hyper-parameters than the rules take");
  for (bool check_only : {true, false}) {
    s = h = 0;
    for (size_t i = 0; i < n; ++i) {
      const int64_t rule = rules[i];
      update_table(tables[i], std::vector<at::Tensor>(state.begin() + s, state.begin() + s + kStates[rule]), rows[i],
                   grads[i], rule, std::vector<double>(hyper.begin() + h, hyper.begin() + h + kHyper[rule]),
                   check_only);
      s += kStates[rule];
      h += kHyper[rule];
    }
  }
}

}  // namespace
}  // namespace nextrec_fast

TORCH_LIBRARY_FRAGMENT(nextrec_fast, m) {
  // Rules: 0 SGD, 1 Adagrad, 2 row-wise Adagrad, 3 lazy (sparse) Adam; see embedding_rows_update_cpu.
  m.def("embedding_rows_update_(Tensor(a!)[] tables, Tensor(b!)[] state, Tensor[] rows, Tensor[] grads, int[] rules, "
        "float[] hyper) -> ()");
}

TORCH_LIBRARY_IMPL(nextrec_fast, CPU, m) { m.impl("embedding_rows_update_", &nextrec_fast::embedding_rows_update_cpu); }
