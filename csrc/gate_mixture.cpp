// nextrec_fast::gate_mixture_*: the gates' weighted sums of expert outputs on the CPU,
// out[b, g, :] = sum_e weights[b, g, e] * experts[b, e, :] (MMoE / PLE, Ma et al. 2018; Tang et
// al. 2020), and both gradients in one pass.
//
// As a batched matmul this is B products of [G, E] @ [E, D] with G, E <= ~8: far too small for a
// GEMM library. torch.bmm (MKL) and oneDNN spent 0.5 ms on each of the three products of a PLE
// level at batch 2048 (forward, weight gradient, expert gradient), several times the time to
// stream the experts once. Here each row b is one small loop nest over data that sits in L1
// (E * D floats of experts, G * D of the output); the backward reads the experts and the output
// gradient once and writes both gradients.
//
// Layouts: weights [B, G, E] contiguous; experts [B, E, D] with unit stride in D and any other
// strides (in the models a transposed view of the expert bank's [E, B, D] output). The expert
// gradient takes the experts' layout when that is [B, E, D] or its [E, B, D] transpose, so the
// expert bank's backward reads it without a copy. dtypes: float32, float64 (sums in the dtype).
// Rows are independent: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_clones.h"
#include "output_cache.h"

#include <cstdint>
#include <tuple>

namespace nextrec_fast {
namespace {

void check_inputs(const char* op, const at::Tensor& weights, const at::Tensor& experts) {
  TORCH_CHECK_VALUE(weights.dim() == 3 && experts.dim() == 3, op, ": weights must be [B, G, E] and experts [B, E, D], got ",
                    weights.sizes(), " and ", experts.sizes());
  TORCH_CHECK_VALUE(weights.size(0) == experts.size(0) && weights.size(2) == experts.size(1), op,
                    ": weights ", weights.sizes(), " do not match experts ", experts.sizes(),
                    " (batch and expert counts must agree)");
  TORCH_CHECK_TYPE(weights.scalar_type() == experts.scalar_type() &&
                       (weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble),
                   op, ": weights and experts must share a float32 or float64 dtype, got ", weights.scalar_type(),
                   " and ", experts.scalar_type());
  TORCH_CHECK_VALUE(weights.device().is_cpu() && experts.device().is_cpu(), op, ": CPU tensors only");
}

// experts with unit stride along D (else a contiguous copy).
at::Tensor unit_inner_stride(const at::Tensor& experts) {
  return experts.size(2) <= 1 || experts.stride(2) == 1 ? experts : experts.contiguous();
}

// An uninitialised tensor shaped like `like` ([B, E, D]) in its layout when that is contiguous
// [B, E, D] or the transpose of a contiguous [E, B, D], else contiguous.
at::Tensor empty_like_layout(const at::Tensor& like) {
  OutputCache& cache = OutputCache::instance();
  const int64_t B = like.size(0), E = like.size(1), D = like.size(2);
  if (like.stride(2) == 1 && like.stride(0) == D && like.stride(1) == B * D && B > 1 && E > 1)
    return cache.empty({E, B, D}, like.options()).transpose(0, 1);
  return cache.empty({B, E, D}, like.options());
}

constexpr int64_t kRowsPerTask = 64;

// Inner loops: one clone set per dtype below (cpu_clones.h), the template bodies inlined into each.

struct Shape {
  int64_t G, E, D;
  int64_t xb, xe;    // experts' strides (batch, expert)
  int64_t gxb, gxe;  // the expert gradient's strides
};

template <typename T>
NEXTREC_FAST_INLINE void mix_rows(const T* w, const T* x, T* o, const Shape& s, int64_t b0, int64_t b1) {
  const int64_t G = s.G, E = s.E, D = s.D;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      const T* wg = w + (b * G + g) * E;
      T* dst = o + (b * G + g) * D;
      const T* src = x + b * s.xb;
      const T w0 = wg[0];
      for (int64_t d = 0; d < D; ++d) dst[d] = w0 * src[d];
      for (int64_t e = 1; e < E; ++e) {
        const T we = wg[e];
        const T* xs = src + e * s.xe;
        for (int64_t d = 0; d < D; ++d) dst[d] += we * xs[d];
      }
    }
  }
}

// <a, b> over D in 16 running partial sums (vectorisable without reassociating; a fixed order,
// so the result does not depend on the CPU the clone runs on).
template <typename T>
NEXTREC_FAST_INLINE T dot(const T* a, const T* b, int64_t D) {
  constexpr int64_t kLanes = 16;
  T lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  T acc = 0;
  for (int64_t l = 0; l < kLanes; ++l) acc += lanes[l];
  for (; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

template <typename T>
NEXTREC_FAST_INLINE void mix_backward_rows(const T* go, const T* w, const T* x, T* gw, T* gx, const Shape& s,
                                               int64_t b0, int64_t b1) {
  const int64_t G = s.G, E = s.E, D = s.D;
  for (int64_t b = b0; b < b1; ++b) {
    const T* gob = go + b * G * D;
    for (int64_t e = 0; e < E; ++e) {
      const T* xs = x + b * s.xb + e * s.xe;
      // grad_weights[b, g, e] = <grad_out[b, g, :], experts[b, e, :]>
      for (int64_t g = 0; g < G; ++g) gw[(b * G + g) * E + e] = dot(gob + g * D, xs, D);
      // grad_experts[b, e, :] = sum_g weights[b, g, e] * grad_out[b, g, :]
      T* dst = gx + b * s.gxb + e * s.gxe;
      const T w0 = w[b * G * E + e];
      for (int64_t d = 0; d < D; ++d) dst[d] = w0 * gob[d];
      for (int64_t g = 1; g < G; ++g) {
        const T wg = w[(b * G + g) * E + e];
        const T* gg = gob + g * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += wg * gg[d];
      }
    }
  }
}

// One clone set per dtype (overloads; each template body inlined into its clones).
NEXTREC_FAST_CPU_CLONES void mix_rows_cpu(const float* w, const float* x, float* o, const Shape& s, int64_t b0,
                                          int64_t b1) {
  mix_rows<float>(w, x, o, s, b0, b1);
}
NEXTREC_FAST_CPU_CLONES void mix_rows_cpu(const double* w, const double* x, double* o, const Shape& s, int64_t b0,
                                          int64_t b1) {
  mix_rows<double>(w, x, o, s, b0, b1);
}
NEXTREC_FAST_CPU_CLONES void mix_backward_rows_cpu(const float* go, const float* w, const float* x, float* gw,
                                                   float* gx, const Shape& s, int64_t b0, int64_t b1) {
  mix_backward_rows<float>(go, w, x, gw, gx, s, b0, b1);
}
NEXTREC_FAST_CPU_CLONES void mix_backward_rows_cpu(const double* go, const double* w, const double* x, double* gw,
                                                   double* gx, const Shape& s, int64_t b0, int64_t b1) {
  mix_backward_rows<double>(go, w, x, gw, gx, s, b0, b1);
}

Shape shape_of(const at::Tensor& weights, const at::Tensor& experts, const at::Tensor* grad_experts) {
  return Shape{weights.size(1), weights.size(2), experts.size(2), experts.stride(0), experts.stride(1),
               grad_experts != nullptr ? grad_experts->stride(0) : 0, grad_experts != nullptr ? grad_experts->stride(1) : 0};
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& weights, const at::Tensor& experts, at::Tensor& out) {
  const Shape s = shape_of(weights, experts, nullptr);
  const scalar_t* w = weights.data_ptr<scalar_t>();
  const scalar_t* x = experts.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, weights.size(0), kRowsPerTask,
                   [&](int64_t b0, int64_t b1) { mix_rows_cpu(w, x, o, s, b0, b1); });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& experts,
                     at::Tensor& grad_weights, at::Tensor& grad_experts) {
  const Shape s = shape_of(weights, experts, &grad_experts);
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  const scalar_t* w = weights.data_ptr<scalar_t>();
  const scalar_t* x = experts.data_ptr<scalar_t>();
  scalar_t* gw = grad_weights.data_ptr<scalar_t>();
  scalar_t* gx = grad_experts.data_ptr<scalar_t>();
  at::parallel_for(0, weights.size(0), kRowsPerTask,
                   [&](int64_t b0, int64_t b1) { mix_backward_rows_cpu(go, w, x, gw, gx, s, b0, b1); });
}

}  // namespace

// [B, G, D], contiguous.
at::Tensor gate_mixture_forward_cpu(const at::Tensor& weights_in, const at::Tensor& experts_in) {
  check_inputs("gate_mixture_forward", weights_in, experts_in);
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor experts = unit_inner_stride(experts_in);
  at::Tensor out = OutputCache::instance().empty({weights.size(0), weights.size(1), experts.size(2)}, experts.options());
  if (weights.size(2) == 0) return out.zero_();  // an empty sum, as bmm gives
  if (out.numel() > 0)
    AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "gate_mixture_forward_cpu",
                               [&] { forward_kernel<scalar_t>(weights, experts, out); });
  return out;
}

// (grad_weights [B, G, E] contiguous, grad_experts [B, E, D] in the experts' layout).
std::tuple<at::Tensor, at::Tensor> gate_mixture_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& weights_in,
                                                             const at::Tensor& experts_in) {
  check_inputs("gate_mixture_backward", weights_in, experts_in);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 3 && grad_out_in.size(0) == weights_in.size(0) &&
                        grad_out_in.size(1) == weights_in.size(1) && grad_out_in.size(2) == experts_in.size(2),
                    "gate_mixture_backward: grad_out must be [B, G, D] = [", weights_in.size(0), ", ", weights_in.size(1),
                    ", ", experts_in.size(2), "], got ", grad_out_in.sizes());
  TORCH_CHECK_TYPE(grad_out_in.scalar_type() == weights_in.scalar_type(), "gate_mixture_backward: grad_out must be ",
                   weights_in.scalar_type(), ", got ", grad_out_in.scalar_type());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor experts = unit_inner_stride(experts_in);
  at::Tensor grad_weights = at::empty(weights.sizes(), weights.options());
  at::Tensor grad_experts = empty_like_layout(experts);
  if (weights.size(1) == 0) {
    grad_experts.zero_();  // no gate reads the experts (grad_weights is empty)
  } else if (weights.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "gate_mixture_backward_cpu",
                               [&] { backward_kernel<scalar_t>(grad_out, weights, experts, grad_weights, grad_experts); });
  }
  return {grad_weights, grad_experts};
}

}  // namespace nextrec_fast

TORCH_LIBRARY_FRAGMENT(nextrec_fast, m) {
  m.def("gate_mixture_forward(Tensor weights, Tensor experts) -> Tensor");
  m.def("gate_mixture_backward(Tensor grad_out, Tensor weights, Tensor experts) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nextrec_fast, CPU, m) {
  m.impl("gate_mixture_forward", &nextrec_fast::gate_mixture_forward_cpu);
  m.impl("gate_mixture_backward", &nextrec_fast::gate_mixture_backward_cpu);
}
