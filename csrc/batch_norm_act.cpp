// nextrec_fast::batch_norm_act_*: BatchNorm1d (with the preceding Linear's bias folded in) and
// an optional ReLU over the channels of many experts at once, on the CPU.
//
// nextrec's MLP runs Linear -> BatchNorm1d -> activation per hidden layer. PyTorch makes four
// full passes over the [B, C] activations for that forward (bias broadcast inside addmm, the
// statistics, normalisation, ReLU) and four for the backward. Here the Linear runs without its
// bias (the batch mean absorbs it; it is folded into the statistics), the forward is two
// statistics passes (the mean, then moments about it, as PyTorch's own two-pass statistics)
// and one normalise+ReLU pass, the backward one reduction pass and one input-gradient pass
// that recomputes the ReLU mask.
//
// Layouts: x is [B, C] (batch-major, what one GEMM over concatenated weights gives), [E, B, N]
// (expert-major, what a bmm gives) or [G, B, M*N] (G groups of M experts, a bmm over groups of
// experts that share an input), C = E * N channels in expert order (channel e * N + n). The output is written in either layout, so the next layer's bmm
// reads it without a transposing copy.
//
// dtypes: float32 and float64 compute in their own type. bfloat16 (what CPU autocast's GEMMs
// give) is read and written as bfloat16 and computed in float32 with float32 parameters, as
// nn.BatchNorm1d does under autocast: half the bytes of each pass, and no casting passes
// around the op.
//
// Work is split over chunks of rows (every pass streams whole rows), or, with at least 4
// blocks of 32 channels per thread, over those blocks (all rows of a block through every pass,
// then the next: the block stays in L2 between passes; rows prefetched a few ahead, as a column
// walk crosses a page per row). Either way column sums are taken per row chunk and combined in
// chunk order, and the chunking does not depend on the thread count, so results are
// deterministic and the same bits in both orders.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_clones.h"
#include "output_cache.h"
#include "prefetch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace nextrec_fast {
namespace {

// A [E, B, N] view (unit stride over n) of a batch-major or expert-major buffer.
// A buffer holding E experts' [B, N] blocks as [G, B, M * N] with G * M = E: expert e is
// columns (e % M) * N.. of group e / M. Batch-major [B, E*N] is G = 1; expert-major [E, B, N]
// is M = 1; [G, B, M*N] is what one bmm over G groups of experts with a shared input gives.
template <typename T>
struct Blocks {
  T* data;
  int64_t group_stride, row_stride, per_group, width;
  T* at(int64_t e, int64_t b, int64_t n) const {
    return data + (e / per_group) * group_stride + b * row_stride + (e % per_group) * width + n;
  }
};

template <typename T>
Blocks<T> blocks_of(T* data, int64_t groups, int64_t experts, int64_t batch, int64_t width) {
  const int64_t per_group = experts / groups;
  return {data, batch * per_group * width, per_group * width, per_group, width};
}

struct Shape {
  int64_t experts, batch, width;  // E, B, N
  int64_t x_groups;               // G of x's layout (see Blocks)
};

Shape shape_of(const at::Tensor& x, int64_t experts) {
  TORCH_CHECK_VALUE(experts >= 1, "batch_norm_act: experts must be >= 1, got ", experts);
  if (x.dim() == 3) {
    const int64_t groups = x.size(0);
    TORCH_CHECK_VALUE(groups >= 1 && experts % groups == 0, "batch_norm_act: x is [G, B, M*N] with G=", groups,
                      ", which does not divide experts=", experts);
    const int64_t per_group = experts / groups;
    TORCH_CHECK_VALUE(x.size(2) % per_group == 0, "batch_norm_act: x's ", x.size(2), " columns per group do not split into ",
                      per_group, " experts");
    return {experts, x.size(1), x.size(2) / per_group, groups};
  }
  TORCH_CHECK_VALUE(x.dim() == 2, "batch_norm_act: x must be [B, C] or [G, B, M*N], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) % experts == 0, "batch_norm_act: ", x.size(1), " channels do not split into ",
                    experts, " experts");
  return {experts, x.size(0), x.size(1) / experts, 1};
}

// The parameters' (and parameter gradients') dtype: x's, or float32 for a bfloat16 x (autocast's
// float32 master weights).
at::ScalarType param_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type();
}

void check_channel_vector(const std::optional<at::Tensor>& v, const at::Tensor& x, int64_t channels,
                          const char* what) {
  if (!v.has_value()) return;
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == channels, "batch_norm_act: ", what, " must be [", channels,
                    "], got shape ", v->sizes());
  TORCH_CHECK_TYPE(v->scalar_type() == param_dtype(x), "batch_norm_act: ", what, " is ", v->scalar_type(),
                   " but must be ", param_dtype(x), " for x of ", x.scalar_type());
  TORCH_CHECK_VALUE(v->device() == x.device(), "batch_norm_act: ", what, " is on ", v->device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(v->is_contiguous(), "batch_norm_act: ", what, " must be contiguous");
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& v) {
  return v.has_value() ? v->data_ptr<T>() : nullptr;
}

// Rows per chunk: a fixed function of the batch size (never of the thread count).
int64_t chunk_rows(int64_t batch) {
  constexpr int64_t kMinRows = 32, kMaxChunks = 16;
  const int64_t rows = (batch + kMaxChunks - 1) / kMaxChunks;
  return std::max(kMinRows, (rows + kMinRows - 1) / kMinRows * kMinRows);
}


// Rows summed in T (vectorises without widening) before each flush into double accumulators.
constexpr int64_t kFlushRows = 32;

// What every pass reads; per-channel arrays are [C], in channel order. S is the activations'
// storage type, T the compute and parameter type (S = T, or S = bfloat16 and T = float).
template <typename S, typename T>
struct Pass {
  int64_t experts, width;  // E, N
  Blocks<const S> x;
  Blocks<const S> grad_out;  // backward
  Blocks<S> out;             // forward: the output; backward: grad_x (x's layout)
  const T* x0;               // forward statistics: the shift (x's batch mean, rounded to T)
  const T* scale;            // z = x * scale + shift (rounded to T: the forward's arithmetic)
  const T* shift;
  // Backward, in double: the input gradient cancels heavily when the variance is near eps
  // (small batches), so it is formed in double from x - mean with the unrounded mean.
  const double* mean;        // mean of x (without linear_bias)
  const double* scale_d;     // weight * invstd
  const double* k_mean;      // mean(dz)
  const double* k_xc;        // invstd^2 * mean(dz * (x - mean))
  bool batch_stats;          // backward: k_mean and k_xc apply (running statistics: grad_x = scale * dz)
};

// Widening a stored value to the compute type, and rounding back (bfloat16: to nearest even,
// NaN kept NaN, as c10::BFloat16 rounds). On the bits and branch-free, so that the row loops
// vectorise: through c10's conversions (a NaN branch per element) the bfloat16 op ran slower
// than the float32 one.
template <typename T, typename S>
NEXTREC_FAST_INLINE T load(S v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return static_cast<T>(f);
  } else {
    return static_cast<T>(v);
  }
}

template <typename S, typename T>
NEXTREC_FAST_INLINE S store(T v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
    const bool nan = (bits & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
    return c10::BFloat16(static_cast<uint16_t>(nan ? UINT32_C(0x7FC0) : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<S>(v);
  }
}

// z = x * scale + shift, written once for the forward and both backward passes: the backward
// recomputes the ReLU mask instead of storing it, so it must match the forward bit for bit
// (the extension is compiled with -ffp-contract=off: no FMA in one place and not the other).
// With bfloat16 storage the mask is taken on z before rounding: a z below bfloat16's smallest
// subnormal stores +0 yet passes its gradient (torch masks on the stored output).
template <typename T>
NEXTREC_FAST_INLINE T affine(T x, T scale, T shift) {
  return x * scale + shift;
}

// ReLU's gradient as torch's threshold_backward(grad, out, 0) gives it: zero where z <= 0 (+-0
// included), passed on elsewhere, a NaN z included.
template <typename T, bool kRelu>
NEXTREC_FAST_INLINE T masked_grad(T g, T x, T scale, T shift) {
  if constexpr (kRelu) return affine(x, scale, shift) <= T(0) ? T(0) : g;
  return g;
}

// The row loops: restrict pointers and the ReLU as a template flag so that each vectorises
// (the mask must be a select, not a data-dependent branch per element).
template <typename S, typename T>
NEXTREC_FAST_INLINE void moments_row(const S* __restrict x, const T* __restrict x0, T* __restrict s1,
                                     T* __restrict s2, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T d = load<T>(x[j]) - x0[j];
    s1[j] += d;
    s2[j] += d * d;
  }
}

template <typename S, typename T>
NEXTREC_FAST_INLINE void sum_row(const S* __restrict x, T* __restrict s1, int64_t n) {
  for (int64_t j = 0; j < n; ++j) s1[j] += load<T>(x[j]);
}

template <typename S, typename T, bool kRelu>
NEXTREC_FAST_INLINE void normalize_row(const S* __restrict x, const T* __restrict scale, const T* __restrict shift,
                                       S* __restrict out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T z = affine(load<T>(x[j]), scale[j], shift[j]);
    out[j] = store<S>(kRelu ? (z < T(0) ? T(0) : z) : z);  // NaN stays NaN, as in torch.relu
  }
}

// acc[j] += part[j] (in double), then part[j] = 0.
template <typename T>
NEXTREC_FAST_INLINE void flush(T* __restrict part, double* __restrict acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc[j] += static_cast<double>(part[j]);
    part[j] = T(0);
  }
}

// The five passes over rows (run_rows).
enum PassKind { kMoments, kNormalize, kReduce, kInputGrad, kSum };

// Channels per block of the column walks (the backward's passes; the training forward's with
// enough blocks, see by_column_blocks).
constexpr int64_t kBlock = 32;

// Rows ahead a column walk prefetches. The backward walks a column block down the rows, a row stride apart
// (8 KiB for batch-major [2048, 2048] float32; N values expert-major), and hardware prefetchers
// do not follow such strides across pages: without this each row's block was a demand miss and
// the [2048, 2048] backward ran ~10x the forward's time.
constexpr int64_t kPrefetchRows = 8;

// One backward pass over rows [b0, b1) of expert e's channels n0 .. n0 + width. Rows one at a
// time over the whole [C] (as the forward does) kept two double column sums per channel in
// memory, a load and a store per element and sum: the backward ran 4-5x the forward's time, at
// 1 thread and at 2 alike (compute-bound, not memory-bound). A block's sums live in registers
// for the chunk instead. Each channel still adds its rows in row order from zero into the
// chunk's partial, so the results are the bits the row-at-a-time loops gave. kWidth: the block
// width as a constant (kBlock), or 0 for a narrower last block (width at run time). acc1 / acc2
// point at the block's first channel. Rows are prefetched up to prefetch_end (b1, or B when the
// same thread walks on into the next chunk).
template <typename S, typename T, bool kRelu, int kKind, int64_t kWidth>
NEXTREC_FAST_INLINE void backward_block(const Pass<S, T>& p, int64_t e, int64_t n0, int64_t width, int64_t b0,
                                        int64_t b1, int64_t prefetch_end, double* acc1, double* acc2) {
  const int64_t w = kWidth > 0 ? kWidth : width;
  const int64_t c = e * p.width + n0;
  const T* __restrict scale = p.scale + c;
  const T* __restrict shift = p.shift + c;
  const double* __restrict mean = p.mean + c;
  T dz[kBlock];
  double s1[kBlock], s2[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) s1[j] = s2[j] = 0.0;
  for (int64_t b = b0; b < b1; ++b) {
    const S* __restrict x = p.x.at(e, b, n0);
    const S* __restrict g = p.grad_out.at(e, b, n0);
    if (b + kPrefetchRows < prefetch_end) {
      prefetch_row<false>(p.x.at(e, b + kPrefetchRows, n0), w);
      prefetch_row<false>(p.grad_out.at(e, b + kPrefetchRows, n0), w);
      if constexpr (kKind != kReduce) prefetch_row<true>(p.out.at(e, b + kPrefetchRows, n0), w);
    }
    // dz = grad_out * relu'(z) in T: the select vectorises on its own (next to a widening to
    // double GCC gives up: "control flow in loop").
    for (int64_t j = 0; j < w; ++j) dz[j] = masked_grad<T, kRelu>(load<T>(g[j]), load<T>(x[j]), scale[j], shift[j]);
    if constexpr (kKind == kReduce) {
      // sum(dz), sum(dz * (x - mean))
      for (int64_t j = 0; j < w; ++j) {
        const double d = static_cast<double>(dz[j]);
        s1[j] += d;
        s2[j] += d * (static_cast<double>(load<T>(x[j])) - mean[j]);
      }
    } else {
      // grad_x = scale * (dz - mean(dz) - (x - mean) * k_xc), formed in double; its column sum
      // (the sum of what grad_x holds) is the linear bias's gradient.
      const double* __restrict scale_d = p.scale_d + c;
      S* __restrict dx = p.out.at(e, b, n0);
      // Under running statistics the terms in k_mean and k_xc are not formed at all: they are 0,
      // and (x - mean) * 0 would turn an infinite x into a NaN gradient where torch gives scale * dz.
      if (!p.batch_stats) {
        for (int64_t j = 0; j < w; ++j) dz[j] = static_cast<T>(scale_d[j] * static_cast<double>(dz[j]));
        for (int64_t j = 0; j < w; ++j) dx[j] = store<S>(dz[j]);
        for (int64_t j = 0; j < w; ++j) s1[j] += static_cast<double>(load<T>(dx[j]));
      } else if constexpr (std::is_same_v<S, T>) {
        const double* __restrict k_mean = p.k_mean + c;  // set only under batch statistics
        const double* __restrict k_xc = p.k_xc + c;
        for (int64_t j = 0; j < w; ++j) {
          const T r = static_cast<T>(scale_d[j] * (static_cast<double>(dz[j]) - k_mean[j] -
                                                   (static_cast<double>(x[j]) - mean[j]) * k_xc[j]));
          dx[j] = r;
          s1[j] += static_cast<double>(r);
        }
      } else {
        // Three loops: in one (double, float and 16-bit lanes together) GCC vectorised nothing,
        // and the bfloat16 backward ran 2.7x slower than the float32 one.
        const double* __restrict k_mean = p.k_mean + c;
        const double* __restrict k_xc = p.k_xc + c;
        for (int64_t j = 0; j < w; ++j)
          dz[j] = static_cast<T>(scale_d[j] * (static_cast<double>(dz[j]) - k_mean[j] -
                                               (static_cast<double>(load<T>(x[j])) - mean[j]) * k_xc[j]));
        for (int64_t j = 0; j < w; ++j) dx[j] = store<S>(dz[j]);
        for (int64_t j = 0; j < w; ++j) s1[j] += static_cast<double>(load<T>(dx[j]));
      }
    }
  }
  for (int64_t j = 0; j < w; ++j) acc1[j] += s1[j];
  if constexpr (kKind == kReduce)
    for (int64_t j = 0; j < w; ++j) acc2[j] += s2[j];
}

// The five passes over rows [b0, b1). Column sums go to acc (one or two [C] double arrays of
// this chunk); `scratch` holds 2 * C values of T for the statistics passes (kSum, kMoments).
template <typename S, typename T, bool kRelu, int kKind>
NEXTREC_FAST_INLINE void run_rows(const Pass<S, T>& p, int64_t b0, int64_t b1, double* acc1, double* acc2,
                                  T* scratch) {
  const int64_t E = p.experts, N = p.width, C = E * N;
  if constexpr (kKind == kSum) {
    // Column sums, kFlushRows rows at a time in T, flushed into double.
    T* part1 = scratch;
    for (int64_t c = 0; c < C; ++c) part1[c] = T(0);
    for (int64_t f0 = b0; f0 < b1; f0 += kFlushRows) {
      const int64_t f1 = std::min(b1, f0 + kFlushRows);
      for (int64_t b = f0; b < f1; ++b)
        for (int64_t e = 0; e < E; ++e) sum_row(p.x.at(e, b, 0), part1 + e * N, N);
      flush(part1, acc1, C);
    }
  } else if constexpr (kKind == kMoments) {
    // Shifted sums, kFlushRows rows at a time in T, flushed into double.
    T* part1 = scratch;
    T* part2 = scratch + C;
    for (int64_t c = 0; c < 2 * C; ++c) scratch[c] = T(0);
    for (int64_t f0 = b0; f0 < b1; f0 += kFlushRows) {
      const int64_t f1 = std::min(b1, f0 + kFlushRows);
      for (int64_t b = f0; b < f1; ++b)
        for (int64_t e = 0; e < E; ++e) moments_row(p.x.at(e, b, 0), p.x0 + e * N, part1 + e * N, part2 + e * N, N);
      flush(part1, acc1, C);
      flush(part2, acc2, C);
    }
  } else if constexpr (kKind == kNormalize) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t e = 0; e < E; ++e)
        normalize_row<S, T, kRelu>(p.x.at(e, b, 0), p.scale + e * N, p.shift + e * N, p.out.at(e, b, 0), N);
  } else {
    // Column blocks of kBlock channels, walked down the chunk's rows, so that the block's column
    // sums stay in registers (see backward_block); a narrower last block per expert.
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
        const int64_t c = e * N + n0;
        double* a2 = kKind == kReduce ? acc2 + c : nullptr;
        if (n0 + kBlock <= N)
          backward_block<S, T, kRelu, kKind, kBlock>(p, e, n0, kBlock, b0, b1, b1, acc1 + c, a2);
        else
          backward_block<S, T, kRelu, kKind, 0>(p, e, n0, N - n0, b0, b1, b1, acc1 + c, a2);
      }
    }
  }
}

#define NEXTREC_FAST_PASS_ENTRY(name, kind, S, T)                                                          \
  NEXTREC_FAST_CPU_CLONES void name(const Pass<S, T>& p, bool relu, int64_t b0, int64_t b1, double* acc1, \
                                    double* acc2, T* scratch) {                                            \
    if (relu)                                                                                              \
      run_rows<S, T, true, kind>(p, b0, b1, acc1, acc2, scratch);                                          \
    else                                                                                                   \
      run_rows<S, T, false, kind>(p, b0, b1, acc1, acc2, scratch);                                         \
  }
// The five passes for one (storage, compute) type pair.
#define NEXTREC_FAST_PASS_ENTRIES(suffix, S, T)                  \
  NEXTREC_FAST_PASS_ENTRY(sum_##suffix, kSum, S, T)              \
  NEXTREC_FAST_PASS_ENTRY(moments_##suffix, kMoments, S, T)      \
  NEXTREC_FAST_PASS_ENTRY(normalize_##suffix, kNormalize, S, T)  \
  NEXTREC_FAST_PASS_ENTRY(reduce_##suffix, kReduce, S, T)        \
  NEXTREC_FAST_PASS_ENTRY(input_grad_##suffix, kInputGrad, S, T)
NEXTREC_FAST_PASS_ENTRIES(float, float, float)
NEXTREC_FAST_PASS_ENTRIES(double, double, double)
NEXTREC_FAST_PASS_ENTRIES(bf16, c10::BFloat16, float)
#undef NEXTREC_FAST_PASS_ENTRIES
#undef NEXTREC_FAST_PASS_ENTRY

// The entry of a (storage, compute) type pair among its bfloat16 / float / double instances.
template <typename S, typename T>
constexpr auto for_types(auto bf16, auto float32, auto float64) {
  if constexpr (std::is_same_v<S, c10::BFloat16>)
    return bf16;
  else if constexpr (std::is_same_v<T, float>)
    return float32;
  else
    return float64;
}

// Per-channel formulas both orders share (one definition, so both give the same bits).
// The forward: x's mean and biased variance from the sums of (x - x0) and (x - x0)^2.
NEXTREC_FAST_INLINE void channel_stats(double x0, double sum1, double sum2, int64_t B, double& mean, double& var) {
  const double m = sum1 / static_cast<double>(B);
  mean = x0 + m;
  var = std::max(sum2 / static_cast<double>(B) - m * m, 0.0);
}

// The backward: mean(dz) and invstd^2 * mean(dz * (x - mean)) from their sums (0 under running
// statistics, where grad_x = scale * dz).
NEXTREC_FAST_INLINE void grad_coefficients(double sum0, double sum1, double invstd, int64_t B, bool batch_stats,
                                           double& k_mean, double& k_xc) {
  k_mean = batch_stats ? sum0 / static_cast<double>(B) : 0.0;
  k_xc = batch_stats ? sum1 * invstd * invstd / static_cast<double>(B) : 0.0;
}

// The backward of one column block (expert e, channels n0 .. n0 + width) over all B rows: the
// reduce pass, the block's k_mean / k_xc, then the input-gradient pass, in row chunks of `rows`.
// Run block by block, the second pass finds the block's x and grad_out (2 x 256 KiB at batch
// 2048) still in L2, where the pass-by-pass order (every channel's reduce, then every channel's
// input gradient) reads them from L3 or memory twice. Each channel's arithmetic is the
// pass-by-pass order's: a partial per row chunk from zero, partials added in chunk order, so
// the two orders give the same bits. Writes sum0 / sum1 (sum(dz), sum(dz * (x - mean))),
// k_mean / k_xc and sum_dx (sum of grad_x) at the block's channels.
template <typename S, typename T, bool kRelu, int64_t kWidth>
NEXTREC_FAST_INLINE void backward_column(const Pass<S, T>& p, int64_t e, int64_t n0, int64_t width, int64_t B,
                                         int64_t rows, const double* invstd, double* sum0, double* sum1,
                                         double* k_mean, double* k_xc, double* sum_dx) {
  const int64_t w = kWidth > 0 ? kWidth : width;
  const int64_t c = e * p.width + n0;
  double s0[kBlock], s1[kBlock], sd[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) s0[j] = s1[j] = sd[j] = 0.0;
  for (int64_t b0 = 0; b0 < B; b0 += rows) {
    double a1[kBlock], a2[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) a1[j] = a2[j] = 0.0;
    backward_block<S, T, kRelu, kReduce, kWidth>(p, e, n0, width, b0, std::min(B, b0 + rows), B, a1, a2);
    for (int64_t j = 0; j < w; ++j) {
      s0[j] += a1[j];
      s1[j] += a2[j];
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    sum0[c + j] = s0[j];
    sum1[c + j] = s1[j];
    grad_coefficients(s0[j], s1[j], invstd[c + j], B, p.batch_stats, k_mean[c + j], k_xc[c + j]);
  }
  for (int64_t b0 = 0; b0 < B; b0 += rows) {
    double a1[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) a1[j] = 0.0;
    backward_block<S, T, kRelu, kInputGrad, kWidth>(p, e, n0, width, b0, std::min(B, b0 + rows), B, a1, nullptr);
    for (int64_t j = 0; j < w; ++j) sd[j] += a1[j];
  }
  for (int64_t j = 0; j < w; ++j) sum_dx[c + j] = sd[j];
}

// Column blocks [u0, u1) (kBlock channels of one expert each, experts in order).
#define NEXTREC_FAST_COLUMN_ENTRY(suffix, S, T)                                                                    \
  NEXTREC_FAST_CPU_CLONES void backward_columns_##suffix(                                                          \
      const Pass<S, T>& p, bool relu, int64_t u0, int64_t u1, int64_t B, int64_t rows, const double* invstd,       \
      double* sum0, double* sum1, double* k_mean, double* k_xc, double* sum_dx) {                                  \
    const int64_t per_expert = (p.width + kBlock - 1) / kBlock;                                                    \
    for (int64_t u = u0; u < u1; ++u) {                                                                            \
      const int64_t e = u / per_expert, n0 = (u % per_expert) * kBlock, w = std::min(kBlock, p.width - n0);       \
      if (w == kBlock) {                                                                                           \
        if (relu)                                                                                                  \
          backward_column<S, T, true, kBlock>(p, e, n0, w, B, rows, invstd, sum0, sum1, k_mean, k_xc, sum_dx);    \
        else                                                                                                       \
          backward_column<S, T, false, kBlock>(p, e, n0, w, B, rows, invstd, sum0, sum1, k_mean, k_xc, sum_dx);   \
      } else if (relu) {                                                                                           \
        backward_column<S, T, true, 0>(p, e, n0, w, B, rows, invstd, sum0, sum1, k_mean, k_xc, sum_dx);           \
      } else {                                                                                                     \
        backward_column<S, T, false, 0>(p, e, n0, w, B, rows, invstd, sum0, sum1, k_mean, k_xc, sum_dx);          \
      }                                                                                                            \
    }                                                                                                              \
  }
NEXTREC_FAST_COLUMN_ENTRY(float, float, float)
NEXTREC_FAST_COLUMN_ENTRY(double, double, double)
NEXTREC_FAST_COLUMN_ENTRY(bf16, c10::BFloat16, float)
#undef NEXTREC_FAST_COLUMN_ENTRY

template <typename S, typename T>
using PassFn = void (*)(const Pass<S, T>&, bool, int64_t, int64_t, double*, double*, T*);

template <typename S, typename T>
PassFn<S, T> pass_fn(PassKind kind) {
  const PassFn<S, T> fns[] = {for_types<S, T>(moments_bf16, moments_float, moments_double),
                              for_types<S, T>(normalize_bf16, normalize_float, normalize_double),
                              for_types<S, T>(reduce_bf16, reduce_float, reduce_double),
                              for_types<S, T>(input_grad_bf16, input_grad_float, input_grad_double),
                              for_types<S, T>(sum_bf16, sum_float, sum_double)};
  return fns[kind];
}

// Runs one pass over all rows, chunk-parallel. Returns the column sums (num_sums arrays of C
// doubles, chunk partials added in chunk order).
template <typename S, typename T>
std::vector<std::vector<double>> run_pass(PassKind kind, const Pass<S, T>& p, int64_t batch, bool relu,
                                          int num_sums) {
  const int64_t C = p.experts * p.width, rows = chunk_rows(batch);
  const int64_t chunks = (batch + rows - 1) / rows;
  std::vector<double> partial(static_cast<size_t>(num_sums > 0 ? chunks * num_sums * C : 0), 0.0);
  const PassFn<S, T> fn = pass_fn<S, T>(kind);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> scratch(kind == kSum || kind == kMoments ? 2 * C : 0);  // the backward's sums are local
    for (int64_t k = k0; k < k1; ++k) {
      double* acc1 = num_sums > 0 ? partial.data() + (k * num_sums) * C : nullptr;
      double* acc2 = num_sums > 1 ? acc1 + C : nullptr;
      fn(p, relu, k * rows, std::min(batch, (k + 1) * rows), acc1, acc2, scratch.data());
    }
  });
  std::vector<std::vector<double>> sums(num_sums, std::vector<double>(C, 0.0));
  for (int64_t k = 0; k < chunks; ++k)
    for (int i = 0; i < num_sums; ++i) {
      const double* src = partial.data() + (k * num_sums + i) * C;
      for (int64_t c = 0; c < C; ++c) sums[i][c] += src[c];
    }
  return sums;
}

// The per-channel affine form z = x * scale + shift of BatchNorm applied to x + linear_bias,
// from the mean of x (without the bias) and the biased variance, both kept in double. The
// forward and the backward both call this, so the backward's recomputed z (for the ReLU mask)
// is bit-identical.
template <typename T>
NEXTREC_FAST_INLINE void affine_channels(int64_t c0, int64_t c1, const double* mean_x, const double* var,
                                         const T* weight, const T* bias, double eps, T* scale, T* shift,
                                         double* scale_d, double* invstd) {
  for (int64_t c = c0; c < c1; ++c) {
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    const double w = weight != nullptr ? static_cast<double>(weight[c]) : 1.0;
    const double b = bias != nullptr ? static_cast<double>(bias[c]) : 0.0;
    scale_d[c] = w * invstd[c];
    scale[c] = static_cast<T>(scale_d[c]);
    shift[c] = static_cast<T>(b - mean_x[c] * scale_d[c]);
  }
}

template <typename T>
void affine_params(int64_t C, const double* mean_x, const double* var, const T* weight, const T* bias, double eps,
                   std::vector<T>& scale, std::vector<T>& shift, std::vector<double>& scale_d,
                   std::vector<double>& invstd) {
  scale.resize(C);
  shift.resize(C);
  scale_d.resize(C);
  invstd.resize(C);
  affine_channels<T>(0, C, mean_x, var, weight, bias, eps, scale.data(), shift.data(), scale_d.data(), invstd.data());
}

// The forward's column sums of one block over all B rows, as run_rows takes them (of x; with
// kMoments, of x - x0 and its square): T partials of kFlushRows rows flushed into a double partial
// per row chunk, the chunk partials added in chunk order into total1 (and total2).
template <typename S, typename T, bool kMoments, int64_t kWidth>
NEXTREC_FAST_INLINE void column_sums(const Pass<S, T>& p, int64_t e, int64_t n0, int64_t width, int64_t B,
                                     int64_t rows, const T* x0, double* total1, double* total2) {
  const int64_t w = kWidth > 0 ? kWidth : width;
  for (int64_t j = 0; j < kBlock; ++j) {
    total1[j] = 0.0;
    if constexpr (kMoments) total2[j] = 0.0;
  }
  for (int64_t b0 = 0; b0 < B; b0 += rows) {
    const int64_t b1 = std::min(B, b0 + rows);
    double acc1[kBlock], acc2[kBlock];
    T part1[kBlock], part2[kBlock];
    for (int64_t j = 0; j < kBlock; ++j) {
      acc1[j] = acc2[j] = 0.0;
      part1[j] = part2[j] = T(0);
    }
    for (int64_t f0 = b0; f0 < b1; f0 += kFlushRows) {
      for (int64_t b = f0; b < std::min(b1, f0 + kFlushRows); ++b) {
        // A row stride apart down the block: prefetch a few rows ahead (see kPrefetchRows).
        if (b + kPrefetchRows < B) prefetch_row<false>(p.x.at(e, b + kPrefetchRows, n0), w);
        if constexpr (kMoments)
          moments_row<S, T>(p.x.at(e, b, n0), x0, part1, part2, w);
        else
          sum_row<S, T>(p.x.at(e, b, n0), part1, w);
      }
      flush(part1, acc1, w);
      if constexpr (kMoments) flush(part2, acc2, w);
    }
    for (int64_t j = 0; j < w; ++j) {
      total1[j] += acc1[j];
      if constexpr (kMoments) total2[j] += acc2[j];
    }
  }
}

// The training forward of one column block (expert e, channels n0 .. n0 + width) over all B
// rows: the sum, the moments about x0, the block's statistics and affine form, then the
// normalisation. Block by block, x's block (256 KiB at batch 2048) is read from memory once and
// from L2 twice, where the pass-by-pass order reads all of x three times from L3 or memory.
// Each channel's arithmetic is the pass-by-pass order's (column_sums, channel_stats), so the
// two orders give the same bits.
template <typename S, typename T, bool kRelu, int64_t kWidth>
NEXTREC_FAST_INLINE void forward_column(const Pass<S, T>& p, int64_t e, int64_t n0, int64_t width, int64_t B,
                                        int64_t rows, const T* weight, const T* bias, double eps, T* x0,
                                        double* mean_x, double* var, T* scale, T* shift, double* scale_d,
                                        double* invstd) {
  const int64_t w = kWidth > 0 ? kWidth : width;
  const int64_t c = e * p.width + n0;
  double total[kBlock], m1[kBlock], m2[kBlock];
  column_sums<S, T, false, kWidth>(p, e, n0, width, B, rows, nullptr, total, nullptr);
  for (int64_t j = 0; j < w; ++j) x0[c + j] = static_cast<T>(total[j] / static_cast<double>(B));
  column_sums<S, T, true, kWidth>(p, e, n0, width, B, rows, x0 + c, m1, m2);
  for (int64_t j = 0; j < w; ++j)
    channel_stats(static_cast<double>(x0[c + j]), m1[j], m2[j], B, mean_x[c + j], var[c + j]);
  affine_channels<T>(c, c + w, mean_x, var, weight, bias, eps, scale, shift, scale_d, invstd);
  const T* sc = scale + c;
  const T* sh = shift + c;
  for (int64_t b = 0; b < B; ++b) {
    if (b + kPrefetchRows < B) {
      prefetch_row<false>(p.x.at(e, b + kPrefetchRows, n0), w);
      prefetch_row<true>(p.out.at(e, b + kPrefetchRows, n0), w);
    }
    normalize_row<S, T, kRelu>(p.x.at(e, b, n0), sc, sh, p.out.at(e, b, n0), w);
  }
}

// Column blocks [u0, u1) of the training forward (kBlock channels of one expert each).
#define NEXTREC_FAST_FORWARD_COLUMNS(suffix, S, T)                                                                 \
  NEXTREC_FAST_CPU_CLONES void forward_columns_##suffix(                                                           \
      const Pass<S, T>& p, bool relu, int64_t u0, int64_t u1, int64_t B, int64_t rows, const T* weight,            \
      const T* bias, double eps, T* x0, double* mean_x, double* var, T* scale, T* shift, double* scale_d,          \
      double* invstd) {                                                                                            \
    const int64_t per_expert = (p.width + kBlock - 1) / kBlock;                                                    \
    for (int64_t u = u0; u < u1; ++u) {                                                                            \
      const int64_t e = u / per_expert, n0 = (u % per_expert) * kBlock, w = std::min(kBlock, p.width - n0);       \
      if (w == kBlock && relu)                                                                                     \
        forward_column<S, T, true, kBlock>(p, e, n0, w, B, rows, weight, bias, eps, x0, mean_x, var, scale, shift, \
                                           scale_d, invstd);                                                       \
      else if (w == kBlock)                                                                                        \
        forward_column<S, T, false, kBlock>(p, e, n0, w, B, rows, weight, bias, eps, x0, mean_x, var, scale,       \
                                            shift, scale_d, invstd);                                               \
      else if (relu)                                                                                               \
        forward_column<S, T, true, 0>(p, e, n0, w, B, rows, weight, bias, eps, x0, mean_x, var, scale, shift,      \
                                      scale_d, invstd);                                                            \
      else                                                                                                         \
        forward_column<S, T, false, 0>(p, e, n0, w, B, rows, weight, bias, eps, x0, mean_x, var, scale, shift,     \
                                       scale_d, invstd);                                                           \
    }                                                                                                              \
  }
NEXTREC_FAST_FORWARD_COLUMNS(float, float, float)
NEXTREC_FAST_FORWARD_COLUMNS(double, double, double)
NEXTREC_FAST_FORWARD_COLUMNS(bf16, c10::BFloat16, float)
#undef NEXTREC_FAST_FORWARD_COLUMNS

// Blocks of kBlock channels over all experts (the last of each expert may be narrower).
int64_t column_blocks(int64_t experts, int64_t width) { return experts * ((width + kBlock - 1) / kBlock); }

// Whether a kernel runs column block by column block (each thread a run of blocks, all rows)
// rather than pass by pass (each thread a run of row chunks, all channels): enough blocks to
// share out evenly. Both orders give the same bits.
bool by_column_blocks(int64_t experts, int64_t width) {
  return column_blocks(experts, width) >= 4 * at::get_num_threads();
}

// Blocks per task of a column walk: at least at::internal::GRAIN_SIZE elements each, so that a
// small batch runs on one thread, as its single row chunk did.
int64_t column_grain(int64_t batch) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, batch * kBlock));
}

template <typename S, typename T>
void forward_kernel(const at::Tensor& x, const Shape& s, const T* weight, const T* bias, double eps, bool training,
                    bool relu, bool out_expert_major, S* out, double* mean_x, double* var) {
  const int64_t E = s.experts, B = s.batch, N = s.width, C = E * N;
  Pass<S, T> p{};
  p.experts = E;
  p.width = N;
  p.x = blocks_of<const S>(x.data_ptr<S>(), s.x_groups, E, B, N);
  p.out = blocks_of<S>(out, out_expert_major ? E : 1, E, B, N);
  std::vector<T> x0(C);
  if (training && by_column_blocks(E, N)) {
    std::vector<T> scale(C), shift(C);
    std::vector<double> scale_d(C), invstd(C);
    const int64_t rows = chunk_rows(B);
    at::parallel_for(0, column_blocks(E, N), column_grain(B), [&](int64_t u0, int64_t u1) {
      for_types<S, T>(forward_columns_bf16, forward_columns_float, forward_columns_double)(
          p, relu, u0, u1, B, rows, weight, bias, eps, x0.data(), mean_x, var, scale.data(), shift.data(),
          scale_d.data(), invstd.data());
    });
    return;
  }
  if (training) {
    // Two passes: the mean, then sums of (x - x0) and (x - x0)^2 about x0 = the mean rounded
    // to T (the sum of x - x0 corrects for that rounding). A one-pass shift by the first row lost
    // up to 30x float32 nextrec's accuracy when that row was an outlier in a small batch:
    // E[(x - x0)^2] - E[x - x0]^2 then cancels, summed in T.
    const auto total = run_pass<S, T>(kSum, p, B, relu, 1);
    for (int64_t c = 0; c < C; ++c) x0[c] = static_cast<T>(total[0][c] / static_cast<double>(B));
    p.x0 = x0.data();
    const auto sums = run_pass<S, T>(kMoments, p, B, relu, 2);
    for (int64_t c = 0; c < C; ++c)
      channel_stats(static_cast<double>(x0[c]), sums[0][c], sums[1][c], B, mean_x[c], var[c]);
  }
  std::vector<T> scale, shift;
  std::vector<double> scale_d, invstd;
  affine_params<T>(C, mean_x, var, weight, bias, eps, scale, shift, scale_d, invstd);
  p.scale = scale.data();
  p.shift = shift.data();
  run_pass<S, T>(kNormalize, p, B, relu, 0);
}

template <typename S, typename T>
void backward_kernel(const at::Tensor& grad_out, bool grad_expert_major, const at::Tensor& x, const Shape& s,
                     const T* weight, const T* bias, const double* mean_x, const double* var, double eps,
                     bool training, bool relu, S* grad_x, T* grad_linear_bias, T* grad_weight, T* grad_bias) {
  const int64_t E = s.experts, B = s.batch, N = s.width, C = E * N;
  Pass<S, T> p{};
  p.experts = E;
  p.width = N;
  p.x = blocks_of<const S>(x.data_ptr<S>(), s.x_groups, E, B, N);
  p.grad_out = blocks_of<const S>(grad_out.data_ptr<S>(), grad_expert_major ? E : 1, E, B, N);
  p.out = blocks_of<S>(grad_x, s.x_groups, E, B, N);
  std::vector<T> scale, shift;
  std::vector<double> scale_d, invstd;
  affine_params<T>(C, mean_x, var, weight, bias, eps, scale, shift, scale_d, invstd);
  p.scale = scale.data();
  p.shift = shift.data();
  p.scale_d = scale_d.data();
  p.mean = mean_x;
  p.batch_stats = training;
  // sum0 = sum(dz), sum1 = sum(dz * (x - mean)), dz = grad_out * relu'(z); then
  // grad_x = scale * (dz - mean(dz) - (x - mean) * invstd^2 * mean(dz * (x - mean)))  (batch stats)
  //        = scale * dz                                                                 (running stats)
  std::vector<double> k_mean(C), k_xc(C), sum0(C), sum1(C), sum_dx(C);
  p.k_mean = k_mean.data();
  p.k_xc = k_xc.data();
  if (by_column_blocks(E, N)) {
    // Column block by column block (see backward_column): the same bits as the passes below.
    const int64_t rows = chunk_rows(B);
    at::parallel_for(0, column_blocks(E, N), column_grain(B), [&](int64_t u0, int64_t u1) {
      for_types<S, T>(backward_columns_bf16, backward_columns_float, backward_columns_double)(
          p, relu, u0, u1, B, rows, invstd.data(), sum0.data(), sum1.data(), k_mean.data(), k_xc.data(),
          sum_dx.data());
    });
  } else {
    // Few column blocks per thread: row chunks in parallel, pass by pass.
    const auto sums = run_pass<S, T>(kReduce, p, B, relu, 2);
    for (int64_t c = 0; c < C; ++c) {
      sum0[c] = sums[0][c];
      sum1[c] = sums[1][c];
      grad_coefficients(sums[0][c], sums[1][c], invstd[c], B, training, k_mean[c], k_xc[c]);
    }
    sum_dx = std::move(run_pass<S, T>(kInputGrad, p, B, relu, 1)[0]);
  }
  for (int64_t c = 0; c < C; ++c) {
    grad_linear_bias[c] = static_cast<T>(sum_dx[c]);  // sum of grad_x: the bias came before the norm
    grad_weight[c] = static_cast<T>(sum1[c] * invstd[c]);
    grad_bias[c] = static_cast<T>(sum0[c]);
  }
}

void check_inputs(const at::Tensor& x, const Shape& s, const std::optional<at::Tensor>& linear_bias,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
                   "batch_norm_act: x must be float32, float64 or bfloat16 on the CPU, got ", x.scalar_type());
  TORCH_CHECK_VALUE(s.batch >= 1, "batch_norm_act: empty batch");
  const int64_t channels = s.experts * s.width;
  check_channel_vector(linear_bias, x, channels, "linear_bias");
  check_channel_vector(weight, x, channels, "weight");
  check_channel_vector(bias, x, channels, "bias");
}

}  // namespace

// Returns (out, mean_x, var): the output in the requested layout, and the per-channel mean of x
// (without linear_bias) and biased variance that were used (batch statistics when training,
// else running_mean - linear_bias and running_var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, int64_t experts, bool training, double eps, bool relu,
    bool out_expert_major) {
  const at::Tensor x = x_in.contiguous();
  const Shape s = shape_of(x, experts);
  check_inputs(x, s, linear_bias, weight, bias);
  const int64_t channels = s.experts * s.width;
  if (training) {
    TORCH_CHECK_VALUE(s.batch >= 2, "batch_norm_act: batch statistics need more than one sample per batch (got ",
                      s.batch, ")");
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(),
                      "batch_norm_act: running_mean and running_var are needed when training=False");
    check_channel_vector(running_mean, x, channels, "running_mean");
    check_channel_vector(running_var, x, channels, "running_var");
  }
  OutputCache& cache = OutputCache::instance();
  at::Tensor out = out_expert_major ? cache.empty({s.experts, s.batch, s.width}, x.options())
                                    : cache.empty({s.batch, channels}, x.options());
  at::Tensor mean_x, var;
  // Statistics are kept in double whatever x's dtype (see Pass::mean).
  const auto stats_options = x.options().dtype(at::kDouble);
  if (training) {
    mean_x = at::empty({channels}, stats_options);
    var = at::empty({channels}, stats_options);
  } else {
    mean_x = running_mean->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
    if (linear_bias.has_value()) mean_x.sub_(linear_bias->to(at::kDouble));
    mean_x = mean_x.contiguous();
    var = running_var->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  if (x.scalar_type() == at::kBFloat16) {
    forward_kernel<c10::BFloat16, float>(x, s, data_or_null<float>(weight), data_or_null<float>(bias), eps, training,
                                         relu, out_expert_major, out.data_ptr<c10::BFloat16>(),
                                         mean_x.data_ptr<double>(), var.data_ptr<double>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_forward_cpu", [&] {
      forward_kernel<scalar_t, scalar_t>(x, s, data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias), eps,
                                         training, relu, out_expert_major, out.data_ptr<scalar_t>(),
                                         mean_x.data_ptr<double>(), var.data_ptr<double>());
    });
  }
  return {out, mean_x, var};
}

// Gradients (x, linear_bias, weight, bias) of the forward above, from its saved mean_x and var.
// grad_out is in the layout the forward wrote (out_expert_major); grad_x in x's layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const std::optional<at::Tensor>& linear_bias,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean_x,
    const at::Tensor& var, int64_t experts, bool training, double eps, bool relu, bool out_expert_major) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const Shape s = shape_of(x, experts);
  check_inputs(x, s, linear_bias, weight, bias);
  const int64_t channels = s.experts * s.width;
  for (const auto& [v, what] : {std::pair<const at::Tensor&, const char*>{mean_x, "mean_x"}, {var, "var"}}) {
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == channels && v.scalar_type() == at::kDouble && v.is_contiguous(),
                      "batch_norm_act: ", what, " must be the forward's contiguous float64 [", channels, "] statistics");
  }
  const std::vector<int64_t> out_shape = out_expert_major ? std::vector<int64_t>{s.experts, s.batch, s.width}
                                                          : std::vector<int64_t>{s.batch, channels};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape), "batch_norm_act: grad_out has shape ",
                    grad_out.sizes(), ", expected ", at::IntArrayRef(out_shape));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "batch_norm_act: grad_out is ", grad_out.scalar_type(),
                   " but x is ", x.scalar_type());
  at::Tensor grad_x = OutputCache::instance().empty(x.sizes(), x.options());
  const auto param_options = x.options().dtype(param_dtype(x));
  at::Tensor grad_linear_bias = at::empty({channels}, param_options);
  at::Tensor grad_weight = at::empty({channels}, param_options);
  at::Tensor grad_bias = at::empty({channels}, param_options);
  if (x.scalar_type() == at::kBFloat16) {
    backward_kernel<c10::BFloat16, float>(grad_out, out_expert_major, x, s, data_or_null<float>(weight),
                                          data_or_null<float>(bias), mean_x.data_ptr<double>(),
                                          var.data_ptr<double>(), eps, training, relu,
                                          grad_x.data_ptr<c10::BFloat16>(), grad_linear_bias.data_ptr<float>(),
                                          grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_backward_cpu", [&] {
      backward_kernel<scalar_t, scalar_t>(grad_out, out_expert_major, x, s, data_or_null<scalar_t>(weight),
                                          data_or_null<scalar_t>(bias), mean_x.data_ptr<double>(),
                                          var.data_ptr<double>(), eps, training, relu, grad_x.data_ptr<scalar_t>(),
                                          grad_linear_bias.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
                                          grad_bias.data_ptr<scalar_t>());
    });
  }
  return {grad_x, grad_linear_bias, grad_weight, grad_bias};
}

// bias_act: act(x + linear_bias) for layers without a norm, in the same layouts. The forward is
// the eval-mode kernel with identity statistics (running mean 0, variance 1, eps 0, no affine:
// scale exactly 1, shift exactly the bias, so x + b rounded once, as torch's add). The backward
// takes the *output*, not x: ReLU's mask from it is threshold_backward's (out <= 0: no
// gradient; a NaN passes it), and the next layer's GEMM saves that output anyway, so autograd
// keeps one activation per layer instead of two.
at::Tensor bias_act_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& linear_bias,
                                int64_t experts, bool relu, bool out_expert_major) {
  const Shape s = shape_of(x, experts);
  const int64_t channels = s.experts * s.width;
  const auto stats_options = x.options().dtype(param_dtype(x));
  return std::get<0>(batch_norm_act_forward_cpu(x, linear_bias, std::nullopt, std::nullopt,
                                                at::zeros({channels}, stats_options),
                                                at::ones({channels}, stats_options), experts,
                                                /*training=*/false, /*eps=*/0.0, relu, out_expert_major));
}

template <typename S, typename T>
void bias_act_backward_kernel(const at::Tensor& grad_out, const at::Tensor& out, bool out_expert_major,
                              int64_t x_groups, int64_t E, int64_t B, int64_t N, bool relu, S* grad_x,
                              T* grad_bias) {
  const int64_t C = E * N;
  Pass<S, T> p{};
  p.experts = E;
  p.width = N;
  p.x = blocks_of<const S>(out.data_ptr<S>(), out_expert_major ? E : 1, E, B, N);  // the mask's z: the output
  p.grad_out = blocks_of<const S>(grad_out.data_ptr<S>(), out_expert_major ? E : 1, E, B, N);
  p.out = blocks_of<S>(grad_x, x_groups, E, B, N);
  std::vector<T> scale(C, T(1)), shift(C, T(0));
  std::vector<double> scale_d(C, 1.0), mean(C, 0.0);
  p.scale = scale.data();
  p.shift = shift.data();
  p.scale_d = scale_d.data();
  p.mean = mean.data();
  p.batch_stats = false;
  const auto sum_dx = run_pass<S, T>(kInputGrad, p, B, relu, 1);
  for (int64_t c = 0; c < C; ++c) grad_bias[c] = static_cast<T>(sum_dx[0][c]);
}

// Gradients (x, linear_bias) of bias_act from its output; grad_out and out share the output's
// layout ([E, B, N] or [B, E*N]); grad_x is written [B, E*N] (x_groups 1) or [G, B, (E/G)*N].
std::tuple<at::Tensor, at::Tensor> bias_act_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& out_in,
                                                         int64_t experts, int64_t x_groups, bool relu) {
  const at::Tensor out = out_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  TORCH_CHECK_VALUE(experts >= 1, "bias_act_backward: experts must be >= 1, got ", experts);
  TORCH_CHECK_VALUE(out.dim() == 2 || (out.dim() == 3 && out.size(0) == experts),
                    "bias_act_backward: out must be [B, E*N] or [E, B, N], got shape ", out.sizes());
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), "bias_act_backward: grad_out has shape ", grad_out.sizes(),
                    ", out ", out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == out.scalar_type() &&
                       (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble ||
                        out.scalar_type() == at::kBFloat16),
                   "bias_act_backward: grad_out and out must share a float32, float64 or bfloat16 dtype, got ",
                   grad_out.scalar_type(), " and ", out.scalar_type());
  const bool out_expert_major = out.dim() == 3;
  const int64_t B = out_expert_major ? out.size(1) : out.size(0);
  TORCH_CHECK_VALUE(out_expert_major || out.size(1) % experts == 0, "bias_act_backward: ", out.size(1),
                    " channels do not split into ", experts, " experts");
  const int64_t N = out_expert_major ? out.size(2) : out.size(1) / experts;
  TORCH_CHECK_VALUE(x_groups >= 1 && experts % x_groups == 0, "bias_act_backward: x_groups=", x_groups,
                    " does not divide experts=", experts);
  TORCH_CHECK_VALUE(B >= 1, "bias_act_backward: empty batch");
  const int64_t C = experts * N;
  at::Tensor grad_x = x_groups == 1 ? OutputCache::instance().empty({B, C}, out.options())
                                    : OutputCache::instance().empty({x_groups, B, C / x_groups}, out.options());
  at::Tensor grad_bias = at::empty({C}, out.options().dtype(param_dtype(out)));
  if (out.scalar_type() == at::kBFloat16) {
    bias_act_backward_kernel<c10::BFloat16, float>(grad_out, out, out_expert_major, x_groups, experts, B, N, relu,
                                                   grad_x.data_ptr<c10::BFloat16>(), grad_bias.data_ptr<float>());
  } else {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "bias_act_backward_cpu", [&] {
      bias_act_backward_kernel<scalar_t, scalar_t>(grad_out, out, out_expert_major, x_groups, experts, B, N, relu,
                                                   grad_x.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>());
    });
  }
  return {grad_x, grad_bias};
}

}  // namespace nextrec_fast

TORCH_LIBRARY_FRAGMENT(nextrec_fast, m) {
  // x: [B, E*N] or [G, B, (E/G)*N] (G = E: [E, B, N]); out: [E, B, N] if out_expert_major
  // else [B, E*N]; grad_x has x's shape.
  m.def(
      "batch_norm_act_forward(Tensor x, Tensor? linear_bias, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, int experts, bool training, float eps, bool relu, bool out_expert_major) "
      "-> (Tensor out, Tensor mean_x, Tensor var)");
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor x, Tensor? linear_bias, Tensor? weight, Tensor? bias, "
      "Tensor mean_x, Tensor var, int experts, bool training, float eps, bool relu, bool out_expert_major) "
      "-> (Tensor grad_x, Tensor grad_linear_bias, Tensor grad_weight, Tensor grad_bias)");
  // act(x + linear_bias), act = ReLU or the identity, in batch_norm_act's layouts; the backward
  // from the output (x_groups: G of x's [G, B, (E/G)*N] layout, 1 for [B, E*N]).
  m.def("bias_act_forward(Tensor x, Tensor? linear_bias, int experts, bool relu, bool out_expert_major) -> Tensor");
  m.def("bias_act_backward(Tensor grad_out, Tensor out, int experts, int x_groups, bool relu) "
        "-> (Tensor grad_x, Tensor grad_linear_bias)");
}

TORCH_LIBRARY_IMPL(nextrec_fast, CPU, m) {
  m.impl("batch_norm_act_forward", &nextrec_fast::batch_norm_act_forward_cpu);
  m.impl("batch_norm_act_backward", &nextrec_fast::batch_norm_act_backward_cpu);
  m.impl("bias_act_forward", &nextrec_fast::bias_act_forward_cpu);
  m.impl("bias_act_backward", &nextrec_fast::bias_act_backward_cpu);
}
