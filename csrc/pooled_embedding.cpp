// nextrec_fast::pooled_embedding_* ops: schema, host-side plan (validation, output layout)
// and the CPU kernels. CUDA kernels live in pooled_embedding_cuda.cu.
//
// One call pools every feature of a model into one [B, total_dim] output, written once.
#include "pooled_embedding.h"
#include "output_cache.h"
#include "prefetch.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
// AVX-512 loops of the forward (pass-1 listing, fp16/bf16 pass 2), compiled for x86-64 with
// GCC/Clang whatever the baseline ISA and run only where the CPU has every feature in
// NEXTREC_FAST_AVX512_TARGET (see cpu_simd_enabled).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(NEXTREC_FAST_CUDA_EMULATION)
#define NEXTREC_FAST_HAVE_AVX512 1
#define NEXTREC_FAST_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,f16c")))
#include <immintrin.h>
#else
#define NEXTREC_FAST_HAVE_AVX512 0
#endif
#include <cstdlib>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>

namespace nextrec_fast {

namespace {

bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

}  // namespace

PoolingPlan make_plan(const PoolingArgs& a, at::IntArrayRef grad_padding_idx) {
  const int64_t num_features = static_cast<int64_t>(a.ids.size());
  const int64_t num_tables = static_cast<int64_t>(a.tables.size());
  TORCH_CHECK_VALUE(num_features > 0, "pooled_embedding: no features given");
  TORCH_CHECK_VALUE(num_tables > 0, "pooled_embedding: no tables given");
  for (const auto& [n, what] : std::initializer_list<std::pair<int64_t, const char*>>{
           {static_cast<int64_t>(a.offsets.size()), "offsets"},
           {static_cast<int64_t>(a.table_index.size()), "table_index"},
           {static_cast<int64_t>(a.combiners.size()), "combiners"},
           {static_cast<int64_t>(a.mask_ids.size()), "mask_ids"},
           {static_cast<int64_t>(a.max_lens.size()), "max_lens"},
           {static_cast<int64_t>(a.names.size()), "feature_names"}}) {
    TORCH_CHECK_VALUE(n == num_features, "pooled_embedding: ", what, " has ", n,
                      " entries but there are ", num_features, " features (ids)");
  }
  TORCH_CHECK_VALUE(grad_padding_idx.empty() || static_cast<int64_t>(grad_padding_idx.size()) == num_tables,
                    "pooled_embedding: grad_padding_idx has ", grad_padding_idx.size(),
                    " entries but there are ", num_tables, " tables");

  PoolingPlan plan;
  TORCH_CHECK_VALUE(a.weights.size() == a.weighted_features.size(), "pooled_embedding: ", a.weights.size(),
                    " per_id_weights for ", a.weighted_features.size(), " weighted_features");
  plan.weight_slot.assign(num_features, -1);
  for (size_t k = 0; k < a.weighted_features.size(); ++k) {
    const int64_t f = a.weighted_features[k];
    TORCH_CHECK_VALUE(f >= 0 && f < num_features && plan.weight_slot[f] < 0, "pooled_embedding: weighted_features[",
                      k, "]=", f, " is out of range or repeated");
    plan.weight_slot[f] = static_cast<int64_t>(k);
  }
  const at::Tensor& first = a.tables[0];
  plan.dtype = first.scalar_type();
  plan.device = first.device();
  TORCH_CHECK_TYPE(plan.dtype == at::kFloat || plan.dtype == at::kHalf || plan.dtype == at::kBFloat16 ||
                       (plan.dtype == at::kDouble && plan.device.is_cpu()),
                   "pooled_embedding: tables must be float32, float16 or bfloat16 (float64 on CPU), got ",
                   plan.dtype);
  for (int64_t t = 0; t < num_tables; ++t) {
    const at::Tensor& w = a.tables[t];
    TORCH_CHECK_VALUE(w.dim() == 2, "pooled_embedding: table ", t, " must be 2-D [num_embeddings, dim], got shape ",
                      w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == plan.dtype, "pooled_embedding: all tables must have one dtype; table ", t,
                     " is ", w.scalar_type(), ", table 0 is ", plan.dtype);
    TORCH_CHECK_VALUE(w.device() == plan.device, "pooled_embedding: all tables must be on one device; table ", t,
                      " is on ", w.device(), ", table 0 on ", plan.device);
    plan.tables.push_back(w.contiguous());
  }

  plan.batch = -1;
  int64_t out_col = 0;
  for (int64_t f = 0; f < num_features; ++f) {
    const std::string& name = a.names[f];
    const at::Tensor& ids = a.ids[f];
    const int64_t t = a.table_index[f];
    TORCH_CHECK_VALUE(t >= 0 && t < num_tables, "pooled_embedding: feature '", name, "': table_index ", t,
                      " is out of range for ", num_tables, " tables");
    const int64_t combiner = a.combiners[f];
    TORCH_CHECK_VALUE(combiner == kSum || combiner == kMean || combiner == kConcat, "pooled_embedding: feature '",
                      name, "': unknown combiner code ", combiner, " (0 sum, 1 mean, 2 concat)");
    TORCH_CHECK_TYPE(is_index_dtype(ids.scalar_type()), "pooled_embedding: feature '", name,
                     "': ids must be int32 or int64, got ", ids.scalar_type());
    TORCH_CHECK_VALUE(ids.device() == plan.device, "pooled_embedding: feature '", name, "': ids are on ",
                      ids.device(), " but the tables are on ", plan.device);
    const at::Tensor& table = plan.tables[t];

    FeatureMeta m{};
    m.feature = f;
    m.table_index = t;
    m.vocab = table.size(0);
    m.dim = table.size(1);
    m.combiner = combiner;
    m.mask_id = a.mask_ids[f];
    m.max_len = a.max_lens[f];
    // max_len=0 is rejected: nextrec's seq[:, -0:] would keep everything, which is surely not meant.
    TORCH_CHECK_VALUE(m.max_len >= 1 || m.max_len == -1, "pooled_embedding: feature '", name,
                      "': max_len must be >= 1 or -1 (keep all), got ", m.max_len);
    m.grad_padding_idx = grad_padding_idx.empty() ? -1 : grad_padding_idx[t];
    m.table = table.data_ptr();

    at::Tensor ids_c = ids.contiguous();
    int64_t rows;
    const std::optional<at::Tensor>& offsets = a.offsets[f];
    if (offsets.has_value()) {
      TORCH_CHECK_VALUE(combiner != kConcat, "pooled_embedding: feature '", name,
                        "': the concat combiner needs the padded layout [B, L], not jagged offsets");
      TORCH_CHECK_VALUE(ids.dim() == 1, "pooled_embedding: feature '", name,
                        "': jagged ids must be 1-D values, got shape ", ids.sizes());
      TORCH_CHECK_TYPE(is_index_dtype(offsets->scalar_type()), "pooled_embedding: feature '", name,
                       "': offsets must be int32 or int64, got ", offsets->scalar_type());
      TORCH_CHECK_VALUE(offsets->dim() == 1 && offsets->numel() >= 1, "pooled_embedding: feature '", name,
                        "': offsets must be 1-D [B + 1], got shape ", offsets->sizes());
      TORCH_CHECK_VALUE(offsets->device() == plan.device, "pooled_embedding: feature '", name,
                        "': offsets are on ", offsets->device(), " but the tables are on ", plan.device);
      at::Tensor off_c = offsets->contiguous();
      rows = off_c.numel() - 1;
      m.offsets = off_c.data_ptr();
      m.offsets_int64 = off_c.scalar_type() == at::kLong;
      m.seq_len = ids_c.numel();
      m.out_width = m.dim;
      plan.offsets.push_back(off_c);
    } else {
      TORCH_CHECK_VALUE(ids.dim() == 1 || ids.dim() == 2, "pooled_embedding: feature '", name,
                        "': padded ids must be [B], [B, 1] or [B, L], got shape ", ids.sizes());
      rows = ids.size(0);
      m.seq_len = ids.dim() == 2 ? ids.size(1) : 1;
      const int64_t kept = m.max_len >= 0 ? std::min(m.seq_len, m.max_len) : m.seq_len;
      if (combiner == kConcat) {
        TORCH_CHECK_VALUE(m.max_len < 0 || m.seq_len >= m.max_len, "pooled_embedding: feature '", name,
                          "': concat needs at least max_len=", m.max_len, " positions per row but ids have ",
                          m.seq_len, " (shape ", ids.sizes(), "); pad the sequences to max_len");
        m.out_width = kept * m.dim;
      } else {
        m.out_width = m.dim;
      }
    }
    if (plan.batch < 0) plan.batch = rows;
    TORCH_CHECK_VALUE(rows == plan.batch, "pooled_embedding: feature '", name, "' has batch size ", rows,
                      " but feature '", a.names[0], "' has ", plan.batch);
    m.ids = ids_c.data_ptr();
    m.ids_int64 = ids_c.scalar_type() == at::kLong;
    plan.ids.push_back(ids_c);

    if (plan.weight_slot[f] >= 0) {
      const at::Tensor* weights = &a.weights[plan.weight_slot[f]];
      TORCH_CHECK_VALUE(combiner != kConcat, "pooled_embedding: feature '", name,
                        "': per_id_weights apply to sum/mean only, not concat");
      TORCH_CHECK_TYPE(weights->scalar_type() == plan.dtype, "pooled_embedding: feature '", name,
                       "': per_id_weights must have the tables' dtype ", plan.dtype, ", got ",
                       weights->scalar_type());
      TORCH_CHECK_VALUE(weights->sizes() == ids.sizes(), "pooled_embedding: feature '", name,
                        "': per_id_weights must have the shape of the ids ", ids.sizes(), ", got ",
                        weights->sizes());
      TORCH_CHECK_VALUE(weights->device() == plan.device, "pooled_embedding: feature '", name,
                        "': per_id_weights are on ", weights->device(), " but the tables are on ", plan.device);
      at::Tensor w_c = weights->contiguous();
      m.weights = w_c.data_ptr();
      plan.weights.push_back(w_c);
    }
    m.out_offset = out_col;
    out_col += m.out_width;
    plan.features.push_back(m);
  }
  plan.total_dim = out_col;
  return plan;
}

void raise_kernel_error(const PoolingPlan& plan, const std::vector<std::string>& names, int64_t kind,
                        int64_t feature, int64_t row, int64_t value) {
  const std::string& name = names.at(feature);
  const FeatureMeta& f = plan.features.at(feature);
  switch (kind) {
    case kIdOutOfRange:
      TORCH_CHECK_VALUE(false, "pooled_embedding: feature '", name, "': id ", value, " in row ", row,
                        " is out of range for its table (num_embeddings=", f.vocab, "): ids must lie in [0, ",
                        f.vocab, "); raise the feature's vocab_size or map the id (e.g. unknown ids to the "
                        "padding id)");
    case kOffsetsNotMonotone:
      TORCH_CHECK_VALUE(false, "pooled_embedding: feature '", name, "': offsets must be non-decreasing; offsets[",
                        row + 1, "]=", value, " is below offsets[", row, "]");
    case kOffsetsBadEnds:
      TORCH_CHECK_VALUE(false, "pooled_embedding: feature '", name, "': offsets must start at 0 and end at ",
                        "the number of ids (", f.seq_len, "); offsets[", row, "]=", value);
    default:
      TORCH_CHECK(false, "pooled_embedding: feature '", name, "': kernel error ", kind);
  }
}

void attach_grads(PoolingPlan& plan, const TensorList& grads, at::IntArrayRef table_needs_grad) {
  TORCH_CHECK_VALUE(table_needs_grad.size() == plan.tables.size(), "pooled_embedding backward: table_needs_grad has ",
                    table_needs_grad.size(), " entries for ", plan.tables.size(), " tables");
  std::vector<void*> grad_ptr(plan.tables.size(), nullptr);
  size_t k = 0;
  for (size_t t = 0; t < plan.tables.size(); ++t) {
    if (!table_needs_grad[t]) continue;
    TORCH_CHECK_VALUE(k < grads.size(), "pooled_embedding backward: fewer gradient buffers than tables needing grad");
    const at::Tensor& g = grads[k++];
    TORCH_CHECK_VALUE(g.sizes() == plan.tables[t].sizes() && g.scalar_type() == plan.dtype &&
                          g.device() == plan.device && g.is_contiguous(),
                      "pooled_embedding backward: gradient buffer for table ", t,
                      " must be a contiguous tensor like the table");
    grad_ptr[t] = g.data_ptr();
  }
  TORCH_CHECK_VALUE(k == grads.size(), "pooled_embedding backward: more gradient buffers than tables needing grad");
  for (auto& f : plan.features) f.grad = grad_ptr[f.table_index];
  plan.table_grads = grad_ptr;
}

// ------------------------------------------------------------------------------------------
// CPU kernels
// ------------------------------------------------------------------------------------------
PoolingPlan backward_plan(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                          const OptTensorList& offsets, const TensorList& weights, at::IntArrayRef weighted_features, at::IntArrayRef table_index,
                          at::IntArrayRef combiners, at::IntArrayRef mask_ids, at::IntArrayRef max_lens,
                          const std::vector<std::string>& names, at::IntArrayRef grad_padding_idx) {
  PoolingPlan plan = make_plan({tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids, max_lens, names},
                               grad_padding_idx);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == plan.batch && grad_out.size(1) == plan.total_dim,
                    "pooled_embedding backward: grad_out must be [", plan.batch, ", ", plan.total_dim, "], got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == plan.dtype && grad_out.device() == plan.device,
                   "pooled_embedding backward: grad_out must be ", plan.dtype, " on ", plan.device);
  return plan;
}

namespace {

// First problem any thread finds; the kernels skip the bad id (never read out of bounds) and
// the host raises after the parallel region.
struct ErrorSink {
  std::atomic<int64_t> kind{kNoError};
  int64_t feature = 0, row = 0, value = 0;
  void report(int64_t k, int64_t f, int64_t r, int64_t v) {
    int64_t expected = kNoError;
    if (kind.compare_exchange_strong(expected, k)) {
      feature = f;
      row = r;
      value = v;
    }
  }
  bool failed() const { return kind.load(std::memory_order_relaxed) != kNoError; }
};

// Offsets are host data on CPU: check them before any kernel reads a bag.
void check_offsets_cpu(const PoolingPlan& plan, const std::vector<std::string>& names) {
  for (const FeatureMeta& f : plan.features) {
    if (f.offsets == nullptr) continue;
    const int64_t first = load_index(f.offsets, f.offsets_int64, 0);
    const int64_t last = load_index(f.offsets, f.offsets_int64, plan.batch);
    if (first != 0) raise_kernel_error(plan, names, kOffsetsBadEnds, f.feature, 0, first);
    if (last != f.seq_len) raise_kernel_error(plan, names, kOffsetsBadEnds, f.feature, plan.batch, last);
    for (int64_t b = 0; b < plan.batch; ++b) {
      const int64_t e = load_index(f.offsets, f.offsets_int64, b + 1);
      if (e < load_index(f.offsets, f.offsets_int64, b)) raise_kernel_error(plan, names, kOffsetsNotMonotone,
                                                                           f.feature, b, e);
    }
  }
}

// ---- forward -------------------------------------------------------------------------------
//
// The forward is bound by the latency of random row reads from large tables (and their TLB
// misses), so it is written to keep many reads in flight. A task pools a chunk of rows for every
// feature in two passes. Pass 1 walks the ids (sequential reads; range checks, truncation and
// padding masks, branch-free) and lists the table rows of every output segment. Pass 2 reads the
// listed rows in a tight loop, prefetching kGatherPrefetch rows ahead across bag and feature
// boundaries, with the row length a compile-time constant for the common dims (the sum stays in
// registers). Measured on a 2-core Xeon (benchmark features, batch 2048 and 8192): about 1.5x
// the previous one-pass kernel (per-feature loops, runtime row length, prefetch of single-id
// rows only) and within 10-20% of a bare gather of the same rows compiled with -march=native;
// a one-pass loop with branch-free masks was slower on cold tables, and AVX2/AVX-512 builds of
// pass 2 gained nothing over the baseline SSE2 build (the loop waits on memory). Pass 1 is
// compute: a fifth of the samples until it listed sequence bags 8 ids per step (AVX-512, where
// the CPU has it) and each chunk's single-id rows of a feature as one strided copy segment
// (together 1.17x on the forward, huge-page tables, batch 2048 and 8192).

// Tuned on the benchmark's features (26 single-id + 3 sequence features of dim 16, fp32), one
// thread, cold tables: prefetch distance 0 / 16 / 64 / 96 rows gave 3.70 / 2.96 / 2.45 / 2.32 ms
// (batch 2048); chunks of 32 / 128 rows at distance 64: 2.45 / 2.42 ms (8192: 13.6 / 13.3).
// Checked again on huge-page tables, two threads, against distance 96, 128 rows, prefetcht0:
// distance 64 / 160 gave 1.08x / 1.06x at batch 2048 but 0.96x / 0.90x at 8192; 64 / 256 rows
// 1.01x / 0.94x (0.89x / 0.87x); prefetcht2 / prefetchnta 0.94x / 0.68x; also prefetching
// every row into L2 from pass 1: 0.90x (0.72x). Non-temporal stores of the output (no
// read-for-ownership) made the op alone 1.07x / 1.22x faster but the op followed by an expert
// layer's GEMM 0.95x slower (the GEMM then reads its input from DRAM): not used.
#ifndef NEXTREC_FAST_GATHER_PREFETCH
#define NEXTREC_FAST_GATHER_PREFETCH 96
#endif
#ifndef NEXTREC_FAST_GATHER_ROWS
#define NEXTREC_FAST_GATHER_ROWS 128
#endif
#ifndef NEXTREC_FAST_PREFETCH_LOCALITY
#define NEXTREC_FAST_PREFETCH_LOCALITY 3
#endif
constexpr int64_t kGatherPrefetch = NEXTREC_FAST_GATHER_PREFETCH;  // listed rows
constexpr int64_t kGatherRows = NEXTREC_FAST_GATHER_ROWS;          // batch rows per chunk

// The AVX-512 loops run where the CPU has every feature they are compiled for, unless
// NEXTREC_FAST_CPU_SIMD=0 (read on every call, so that tests can compare both paths in one process).
bool cpu_simd_enabled() {
#if NEXTREC_FAST_HAVE_AVX512
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("f16c");
  if (!supported) return false;
  const char* env = std::getenv("NEXTREC_FAST_CPU_SIMD");
  return env == nullptr || std::strcmp(env, "0") != 0;
#else
  return false;
#endif
}

enum SegmentMode : int32_t { kSegSum = 0, kSegMean = 1, kSegConcat = 2 };

// One output segment: rows src[begin, end) pooled into dst or (kSegConcat) copied to
// dst + (i - begin) * dst_stride: the slots of a concat bag (stride dim), or a run of
// single-id bags of one feature (stride: the output row).
template <typename scalar_t>
struct Segment {
  scalar_t* dst;
  int64_t begin, end;
  int32_t mode;      // SegmentMode
  int32_t weighted;  // weight[i] multiplies src[i]
  int64_t dim;
  int64_t dst_stride;  // kSegConcat only
};

template <typename scalar_t>
struct GatherList {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<const scalar_t*> src;
  std::vector<acc_t> weight;  // sized like src once a weighted feature is listed
  std::vector<Segment<scalar_t>> segs;  // segs[0, num_segs)
  int64_t n = 0, num_segs = 0;

  // Room for k more rows plus the prefetch run-out.
  void reserve_more(int64_t k, bool weighted) {
    const int64_t need = n + k + kGatherPrefetch;
    if (static_cast<int64_t>(src.size()) < need) src.resize(std::max<int64_t>(need, 2 * src.size()));
    if (weighted && weight.size() < src.size()) weight.resize(src.size());
  }
  void add_segment(scalar_t* dst, int64_t begin, int64_t end, int32_t mode, int32_t weighted, int64_t dim,
                   int64_t dst_stride = 0) {
    segs[num_segs++] = {dst, begin, end, mode, weighted, dim, dst_stride == 0 ? dim : dst_stride};
  }
};

// Pass 1 of one bag: lists the table rows of its positions [begin, end) that enter the output
// (in range, and not the mask id; mask_id = -1 keeps every in-range id) at src[n...], with their
// per-id weights, and returns the new n. Out-of-range ids are reported and skipped.
template <typename scalar_t, typename index_t>
struct RowLister {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* ids;
  const scalar_t* table;
  const scalar_t* weights;  // nullptr: unweighted
  int64_t dim;
  uint64_t vocab;
  int64_t mask_id;
  int64_t feature;

  int64_t list(const scalar_t** src, acc_t* w, int64_t n, int64_t begin, int64_t end, int64_t row,
               ErrorSink& err) const {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t id = static_cast<int64_t>(ids[p]);
      if (C10_UNLIKELY(static_cast<uint64_t>(id) >= vocab)) {
        err.report(kIdOutOfRange, feature, row, id);
        continue;
      }
      // Branch-free masking (padding is about half the positions, in no predictable pattern):
      // always write, advance only past pooled positions.
      src[n] = table + id * dim;
      if (weights != nullptr) w[n] = static_cast<acc_t>(weights[p]);
      n += is_pooled(id, mask_id);
    }
    return n;
  }

  // Unweighted `list`, 8 positions per step with AVX-512 compress (about 13 scalar instructions
  // per position made pass 1 a quarter of the forward): the same rows in the same order. May
  // write up to 7 entries past the returned n (GatherList keeps kGatherPrefetch spare entries).
  int64_t list_simd(const scalar_t** src, int64_t n, int64_t begin, int64_t end, int64_t row,
                    ErrorSink& err) const {
#if NEXTREC_FAST_HAVE_AVX512
    return list_avx512(src, n, begin, end, row, err);
#else
    return list(src, nullptr, n, begin, end, row, err);
#endif
  }

#if NEXTREC_FAST_HAVE_AVX512
  NEXTREC_FAST_AVX512_TARGET int64_t list_avx512(const scalar_t** src, int64_t n, int64_t begin, int64_t end,
                                                 int64_t row, ErrorSink& err) const {
    static_assert(sizeof(const scalar_t*) == 8, "64-bit pointers");
    const __m512i vocab_v = _mm512_set1_epi64(static_cast<int64_t>(vocab));
    const __m512i mask_v = _mm512_set1_epi64(mask_id);
    const __m512i base_v = _mm512_set1_epi64(reinterpret_cast<int64_t>(table));
    const __m512i row_bytes_v = _mm512_set1_epi64(dim * static_cast<int64_t>(sizeof(scalar_t)));
    for (int64_t p = begin; p < end; p += 8) {
      const int64_t k = std::min<int64_t>(8, end - p);
      const __mmask8 lanes = static_cast<__mmask8>((1u << k) - 1);
      __m512i id_v;
      if constexpr (std::is_same_v<index_t, int64_t>) {
        id_v = _mm512_maskz_loadu_epi64(lanes, ids + p);
      } else {
        id_v = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(lanes, ids + p));
      }
      const __mmask8 in_range = _mm512_mask_cmplt_epu64_mask(lanes, id_v, vocab_v);
      if (C10_UNLIKELY(in_range != lanes)) {  // report the bad id exactly as the scalar loop does
        n = list(src, nullptr, n, p, p + k, row, err);
        continue;
      }
      const __mmask8 keep = _mm512_mask_cmpneq_epi64_mask(in_range, id_v, mask_v);
      const __m512i ptr_v = _mm512_add_epi64(base_v, _mm512_mullo_epi64(id_v, row_bytes_v));
      _mm512_storeu_si512(src + n, _mm512_maskz_compress_epi64(keep, ptr_v));
      n += __builtin_popcount(keep);
    }
    return n;
  }
#endif
};

// Pass 1 for rows [b0, b1) of one feature.
template <typename scalar_t, typename index_t>
void list_feature_rows(const FeatureMeta& f, scalar_t* out, int64_t out_stride, int64_t b0, int64_t b1,
                       bool simd, GatherList<scalar_t>& gl, ErrorSink& err) {
  const index_t* ids = static_cast<const index_t*>(f.ids);
  const scalar_t* table = static_cast<const scalar_t*>(f.table);
  const scalar_t* weights = static_cast<const scalar_t*>(f.weights);
  const int64_t D = f.dim, mask_id = f.mask_id, out_offset = f.out_offset;
  const uint64_t vocab = static_cast<uint64_t>(f.vocab);
  const int32_t mode = f.combiner == kConcat ? kSegConcat : (f.combiner == kMean ? kSegMean : kSegSum);
  const bool weighted = weights != nullptr;
  // Single-id padded bags without weights or mask: one position per row, copied exactly like
  // nn.Embedding (a copy: a sum from +0 would turn -0.0 into +0.0). One segment for the whole
  // run of rows, its destination stepping by an output row: per-row segments cost as much as
  // the gather itself here (26 single-id features took as long as 3 sequence features with
  // 4x their rows).
  if (f.offsets == nullptr && f.seq_len == 1 && !weighted && (mode == kSegConcat || mask_id == -1)) {
    gl.reserve_more(b1 - b0, false);
    const scalar_t** src = gl.src.data();
    const int64_t first = gl.n;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t id = static_cast<int64_t>(ids[b]);
      if (C10_UNLIKELY(static_cast<uint64_t>(id) >= vocab)) {
        err.report(kIdOutOfRange, f.feature, b, id);
        return;  // drops the run: the call raises before anyone sees the output
      }
      src[first + (b - b0)] = table + id * D;
    }
    gl.n = first + (b1 - b0);
    gl.add_segment(out + b0 * out_stride + out_offset, first, gl.n, kSegConcat, 0, D, out_stride);
    return;
  }
  const bool masked = mode != kSegConcat;
  const RowLister<scalar_t, index_t> lister{ids, table, weights, D, vocab, masked ? mask_id : -1, f.feature};
  simd = simd && !weighted;
  for (int64_t b = b0; b < b1; ++b) {
    int64_t begin, end;
    bag_bounds(f, b, &begin, &end);
    begin = kept_begin(begin, end, f.max_len);
    gl.reserve_more(end - begin, weighted);
    const int64_t first = gl.n;
    const int64_t n = simd ? lister.list_simd(gl.src.data(), first, begin, end, b, err)
                           : lister.list(gl.src.data(), weighted ? gl.weight.data() : nullptr, first, begin, end, b, err);
    gl.add_segment(out + b * out_stride + out_offset, first, n, mode, weighted, D);
    gl.n = n;
  }
}

template <typename scalar_t>
using ListFn = void (*)(const FeatureMeta&, scalar_t*, int64_t, int64_t, int64_t, bool, GatherList<scalar_t>&,
                        ErrorSink&);

// Prefetches the listed row pf entries ahead of entry i. LINES > 0: cache lines per row as a
// constant, else `lines`.
template <int LINES, typename scalar_t>
C10_ALWAYS_INLINE void prefetch_listed_row(const scalar_t* const* src, int64_t i, int lines, int64_t pf) {
  const char* p = reinterpret_cast<const char*>(src[i + pf]);
  __builtin_prefetch(p, 0, NEXTREC_FAST_PREFETCH_LOCALITY);
  const int nl = LINES > 0 ? LINES : lines;
  for (int l = 1; l < nl; ++l) __builtin_prefetch(p + 64 * l, 0, NEXTREC_FAST_PREFETCH_LOCALITY);
}

// Pass 2 for one segment. DC > 0: the row length as a compile-time constant (DC == dim);
// LINES: see prefetch_listed_row.
template <typename scalar_t, int DC, int LINES>
C10_ALWAYS_INLINE void pool_segment(const Segment<scalar_t>& s, const scalar_t* const* src,
                                    const at::opmath_type<scalar_t>* weight, int lines, int64_t pf) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = DC > 0 ? DC : s.dim;
  auto prefetch = [&](int64_t i) { prefetch_listed_row<LINES>(src, i, lines, pf); };
  if (s.mode == kSegConcat) {
    scalar_t* dst = s.dst;
    for (int64_t i = s.begin; i < s.end; ++i, dst += s.dst_stride) {
      prefetch(i);
      std::memcpy(dst, src[i], D * sizeof(scalar_t));
    }
    return;
  }
  // Accumulated in position order from +0, like the reference; a column block of 16 at a time
  // when the row length is not a compile-time constant.
  constexpr int64_t kBlock = DC > 0 ? DC : 16;
  const acc_t denom = mean_denominator<acc_t>(s.end - s.begin);
  for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
    const int64_t nd = DC > 0 ? DC : std::min<int64_t>(kBlock, D - d0);
    acc_t acc[kBlock];
    for (int64_t d = 0; d < kBlock; ++d) acc[d] = acc_t(0);
    if (s.weighted) {
      for (int64_t i = s.begin; i < s.end; ++i) {
        if (d0 == 0) prefetch(i);
        const scalar_t* r = src[i] + d0;
        const acc_t w = weight[i];
        for (int64_t d = 0; d < nd; ++d) acc[d] += w * static_cast<acc_t>(r[d]);
      }
    } else {
      for (int64_t i = s.begin; i < s.end; ++i) {
        if (d0 == 0) prefetch(i);
        const scalar_t* r = src[i] + d0;
        for (int64_t d = 0; d < nd; ++d) acc[d] += static_cast<acc_t>(r[d]);
      }
    }
    scalar_t* dst = s.dst + d0;
    if (s.mode == kSegMean)
      for (int64_t d = 0; d < nd; ++d) dst[d] = static_cast<scalar_t>(acc[d] / denom);
    else
      for (int64_t d = 0; d < nd; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
  }
}

// pool_segment with the row length as a constant for the common dims.
template <typename scalar_t, int LINES>
C10_ALWAYS_INLINE void pool_segment_any_dim(const Segment<scalar_t>& s, const scalar_t* const* src,
                                            const at::opmath_type<scalar_t>* weight, int lines, int64_t pf) {
  switch (s.dim) {
    case 16: pool_segment<scalar_t, 16, LINES>(s, src, weight, lines, pf); break;
    case 8: pool_segment<scalar_t, 8, LINES>(s, src, weight, lines, pf); break;
    case 32: pool_segment<scalar_t, 32, LINES>(s, src, weight, lines, pf); break;
    case 4: pool_segment<scalar_t, 4, LINES>(s, src, weight, lines, pf); break;
    case 64: pool_segment<scalar_t, 64, LINES>(s, src, weight, lines, pf); break;
    default: pool_segment<scalar_t, 0, LINES>(s, src, weight, lines, pf); break;
  }
}

template <typename scalar_t, int LINES>
void pool_segments(const GatherList<scalar_t>& gl, int lines, int64_t pf) {
  const scalar_t* const* src = gl.src.data();
  const auto* weight = gl.weight.empty() ? nullptr : gl.weight.data();
  for (int64_t k = 0; k < gl.num_segs; ++k) pool_segment_any_dim<scalar_t, LINES>(gl.segs[k], src, weight, lines, pf);
}

#if NEXTREC_FAST_HAVE_AVX512
// Pass 2 for fp16/bf16 tables. The baseline x86-64 build has no F16C, so c10's per-element
// conversions dominated (fp16 ran 2.4x and bf16 1.3x slower than fp32 on half the bytes). Sum
// and mean segments whose row length is a multiple of 16 convert 16 values per instruction
// here; the arithmetic is the scalar loop's (position order from +0, multiply then add, IEEE
// division, round to nearest even with c10's NaN), so the output is bit-identical. Copies and
// other row lengths go to pool_segment.
template <typename scalar_t>
NEXTREC_FAST_AVX512_TARGET inline __m512 load16_as_float(const scalar_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return _mm512_cvtph_ps(h);
  } else {  // bf16: the upper half of a float
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename scalar_t>
NEXTREC_FAST_AVX512_TARGET inline void store16_from_float(scalar_t* p, __m512 v) {
  __m256i h;
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // c10::detail::round_to_nearest_even, NaN -> 0x7FC0
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    h = _mm512_cvtepi32_epi16(rounded);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}

template <typename scalar_t>
NEXTREC_FAST_AVX512_TARGET void pool_half_segments_avx512(
    const GatherList<scalar_t>& gl, int lines, int64_t pf) {
  const scalar_t* const* src = gl.src.data();
  const float* weight = gl.weight.empty() ? nullptr : gl.weight.data();
  for (int64_t k = 0; k < gl.num_segs; ++k) {
    const Segment<scalar_t>& s = gl.segs[k];
    if (s.mode == kSegConcat || s.dim % 16 != 0) {
      pool_segment_any_dim<scalar_t, 0>(s, src, weight, lines, pf);
      continue;
    }
    const __m512 denom = _mm512_set1_ps(mean_denominator<float>(s.end - s.begin));
    for (int64_t d0 = 0; d0 < s.dim; d0 += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = s.begin; i < s.end; ++i) {
        if (d0 == 0) prefetch_listed_row<0>(src, i, lines, pf);
        const __m512 v = load16_as_float(src[i] + d0);
        acc = _mm512_add_ps(acc, s.weighted ? _mm512_mul_ps(_mm512_set1_ps(weight[i]), v) : v);
      }
      if (s.mode == kSegMean) acc = _mm512_div_ps(acc, denom);
      store16_from_float(s.dst + d0, acc);
    }
  }
}
#endif

template <typename scalar_t>
void forward_cpu_kernel(const PoolingPlan& plan, at::Tensor& out, ErrorSink& err) {
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t stride = plan.total_dim;
  const int64_t num_features = static_cast<int64_t>(plan.features.size());
  const int64_t pf = kGatherPrefetch, rows_per_chunk = kGatherRows;
  const bool simd = cpu_simd_enabled();
  std::vector<ListFn<scalar_t>> fns;
  int64_t max_row_bytes = 1;
  for (const auto& f : plan.features) {
    fns.push_back(f.ids_int64 ? &list_feature_rows<scalar_t, int64_t> : &list_feature_rows<scalar_t, int32_t>);
    max_row_bytes = std::max<int64_t>(max_row_bytes, f.dim * static_cast<int64_t>(sizeof(scalar_t)));
  }
  // Cache lines prefetched per listed row (the hardware prefetcher follows longer rows).
  const int lines = static_cast<int>(std::min<int64_t>(4, (max_row_bytes + 63) / 64));
  // Chunks of rows (all features of a chunk: each output row is written by one thread) are
  // handed out dynamically, so a thread slowed down by other work does not hold the others up.
  const int64_t num_chunks = (plan.batch + rows_per_chunk - 1) / rows_per_chunk;
  std::atomic<int64_t> next_chunk{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_chunks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Kept per thread across calls: a fresh list (~150-350 KB of pointers and segments,
    // zero-initialised, often mmap'ed and so page-faulted in) cost tens of us per call.
    thread_local GatherList<scalar_t> gl;
    const size_t max_segs = static_cast<size_t>(rows_per_chunk * num_features);  // one per row and feature
    if (gl.segs.size() < max_segs) gl.segs.resize(max_segs);
    for (int64_t c = next_chunk.fetch_add(1); c < num_chunks; c = next_chunk.fetch_add(1)) {
      const int64_t b0 = c * rows_per_chunk;
      const int64_t b1 = std::min(plan.batch, b0 + rows_per_chunk);
      gl.n = 0;
      gl.num_segs = 0;
      for (int64_t i = 0; i < num_features; ++i) fns[i](plan.features[i], out_ptr, stride, b0, b1, simd, gl, err);
      // Prefetches past the end of the list read a listed row again: never out of bounds.
      gl.reserve_more(0, false);
      for (int64_t k = 0; k < pf; ++k) gl.src[gl.n + k] = gl.n > 0 ? gl.src[0] : nullptr;
#if NEXTREC_FAST_HAVE_AVX512
      if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
        if (simd) {
          pool_half_segments_avx512(gl, lines, pf);
          continue;
        }
      }
#endif
      if (lines == 1) pool_segments<scalar_t, 1>(gl, lines, pf);
      else pool_segments<scalar_t, 0>(gl, lines, pf);
    }
    // Very long bags once must not pin their list for good.
    constexpr size_t kKeepBytes = size_t{8} << 20;
    if (gl.src.capacity() * sizeof(const scalar_t*) > kKeepBytes) std::vector<const scalar_t*>().swap(gl.src);
    if (gl.weight.capacity() * sizeof(at::opmath_type<scalar_t>) > kKeepBytes)
      std::vector<at::opmath_type<scalar_t>>().swap(gl.weight);
  });
}

#define NEXTREC_FAST_DISPATCH_FLOATING(dtype, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, NAME, __VA_ARGS__)

at::Tensor forward_cpu(const TensorList& tables, const TensorList& ids, const OptTensorList& offsets,
                       const TensorList& weights, at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners,
                       at::IntArrayRef mask_ids, at::IntArrayRef max_lens, const std::vector<std::string>& names,
                       at::IntArrayRef grad_padding_idx, bool check_ids, bool deterministic, bool sparse_grad) {
  // grad_padding_idx, deterministic and sparse_grad are for the autograd formula only.
  (void)grad_padding_idx, (void)deterministic, (void)sparse_grad;
  // CPU ids are always range-checked: the check is a compare per id and it keeps every read in
  // bounds; check_ids=False only matters on CUDA, where it saves a device sync.
  (void)check_ids;
  PoolingPlan plan = make_plan({tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids, max_lens, names});
  check_offsets_cpu(plan, names);
  // From the output cache: a fresh [B, total_dim] buffer is page-faulted in on every call once
  // other large allocations churn malloc's heap (e.g. nextrec's or the optimizer's temporaries),
  // ~0.7 us per 4 KiB page: 2.6 ms of a 5 ms forward at batch 8192 here.
  at::Tensor out = OutputCache::instance().empty({plan.batch, plan.total_dim}, plan.tables[0].options());
  ErrorSink err;
  NEXTREC_FAST_DISPATCH_FLOATING(plan.dtype, "pooled_embedding_forward_cpu",
                                 [&] { forward_cpu_kernel<scalar_t>(plan, out, err); });
  if (err.failed()) raise_kernel_error(plan, names, err.kind.load(), err.feature, err.row, err.value);
  return out;
}

// ---- backward: dense table gradients ----------------------------------------------------

// A block of one table's rows owned by a single task: the task zeroes the block, then adds
// every contribution whose id falls inside it, visiting features, rows and positions in a
// fixed order. Each gradient row is therefore accumulated in the same order whatever the
// thread count or partition: the CPU backward is always deterministic.
struct RowBlock {
  int64_t table;
  int64_t row_begin, row_end;
  int64_t bytes;
};

// Positions ahead the scatter prefetches a block row (and rows ahead the dirty-row zeroing):
// both hit a block's rows at random, and an fp32 block of a large table (in place) is far larger
// than the caches: a miss per id without it. (Half types scatter into a scratch of <= 4 MiB.)
constexpr int64_t kScatterPrefetch = 16;
constexpr int64_t kBagPrefetch = 8;

// Positions in `f`'s flat ids (padded: batch x seq_len; jagged: seq_len values).
inline int64_t flat_positions(const FeatureMeta& f, int64_t batch) {
  return f.offsets == nullptr ? batch * f.seq_len : f.seq_len;
}

// Adds the block's contributions of one feature into `block` (rows [row_begin, row_end) of the
// gradient, in the accumulation type).
template <typename scalar_t, typename index_t>
void scatter_feature_block(const FeatureMeta& f, const scalar_t* grad_out, int64_t out_stride, int64_t batch,
                           const at::opmath_type<scalar_t>* denoms, int64_t row_begin, int64_t row_end,
                           at::opmath_type<scalar_t>* block, at::opmath_type<scalar_t>* scaled) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* ids = static_cast<const index_t*>(f.ids);
  const scalar_t* weights = static_cast<const scalar_t*>(f.weights);
  const int64_t D = f.dim;
  auto owned = [&](int64_t id) { return id >= row_begin && id < row_end && receives_grad(f, id); };
  const int64_t positions = flat_positions(f, batch);
  // The block's rows are hit at random: fetch the row of the id kScatterPrefetch positions on.
  auto prefetch_ahead = [&](int64_t p) {
    if (p + kScatterPrefetch >= positions) return;
    const int64_t ahead = static_cast<int64_t>(ids[p + kScatterPrefetch]);
    if (ahead >= row_begin && ahead < row_end) prefetch_row<true>(block + (ahead - row_begin) * D, D);
  };
  for (int64_t b = 0; b < batch; ++b) {
    int64_t begin, end;
    bag_bounds(f, b, &begin, &end);
    begin = kept_begin(begin, end, f.max_len);
    const scalar_t* g = grad_out + b * out_stride;
    // The first line of the feature's grad_out columns (sum / mean), bags a row (all features'
    // columns) apart: prefetched too; in a table's later row blocks most bags own no id and
    // their line goes unused.
    if (b + kBagPrefetch < batch && f.combiner != kConcat)
      __builtin_prefetch(grad_out + (b + kBagPrefetch) * out_stride + f.out_offset, 0);
    if (f.combiner == kConcat) {
      for (int64_t p = begin; p < end; ++p) {
        prefetch_ahead(p);
        const int64_t id = static_cast<int64_t>(ids[p]);
        if (!owned(id)) continue;
        const scalar_t* src = g + out_column(f, p - begin);
        acc_t* dst = block + (id - row_begin) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += static_cast<acc_t>(src[d]);
      }
      continue;
    }
    // Materialise grad_out / denominator lazily: most bags have no id in this block.
    bool have_scaled = false;
    for (int64_t p = begin; p < end; ++p) {
      prefetch_ahead(p);
      const int64_t id = static_cast<int64_t>(ids[p]);
      if (!owned(id)) continue;
      if (!have_scaled) {
        const scalar_t* src = g + f.out_offset;
        if (f.combiner == kMean) {
          const acc_t denom = denoms[b];
          for (int64_t d = 0; d < D; ++d) scaled[d] = static_cast<acc_t>(src[d]) / denom;
        } else {
          for (int64_t d = 0; d < D; ++d) scaled[d] = static_cast<acc_t>(src[d]);
        }
        have_scaled = true;
      }
      acc_t* dst = block + (id - row_begin) * D;
      if (weights != nullptr) {
        const acc_t w = static_cast<acc_t>(weights[p]);
        for (int64_t d = 0; d < D; ++d) dst[d] += scaled[d] * w;
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] += scaled[d];
      }
    }
  }
}

// Calls visit(id) for every kept position of `f` whose id receives gradient, in bag then
// position order: the order of backward_sparse's entries (and of the dense backward's scatter).
template <typename index_t, typename Visit>
void for_each_grad_entry(const FeatureMeta& f, int64_t batch, Visit&& visit) {
  const index_t* ids = static_cast<const index_t*>(f.ids);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t begin, end;
    bag_bounds(f, b, &begin, &end);
    begin = kept_begin(begin, end, f.max_len);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t id = static_cast<int64_t>(ids[p]);
      if (receives_grad(f, id)) visit(id);
    }
  }
}

// Mean denominators (count of pooled positions + 1e-16) per row of a mean feature.
template <typename scalar_t, typename index_t>
void mean_denominators(const FeatureMeta& f, int64_t batch, at::opmath_type<scalar_t>* denoms) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      bag_bounds(f, b, &begin, &end);
      begin = kept_begin(begin, end, f.max_len);
      const int64_t count = pooled_count(f, begin, end);
      denoms[b] = mean_denominator<acc_t>(count);
    }
  });
}

// Zeroes `bytes` bytes at p. A gradient block larger than the caches is zeroed with
// non-temporal stores when `streaming`: they skip the read-for-ownership of every line that
// ordinary stores (memset) pay, which makes zeroing the 288 MB of gradients of the default
// tables markedly faster (the scatter that follows touches few of the lines again). The
// unaligned head and tail, small blocks and other architectures use memset.
constexpr int64_t kStreamingZeroMinBytes = 1 << 20;

void zero_block(void* p, int64_t bytes, bool streaming) {
#if defined(__SSE2__)
  if (streaming && bytes >= kStreamingZeroMinBytes) {
    char* c = static_cast<char*>(p);
    const int64_t head = (64 - reinterpret_cast<uintptr_t>(c) % 64) % 64;
    std::memset(c, 0, head);
    const int64_t body = (bytes - head) / 64 * 64;
    const __m128i z = _mm_setzero_si128();
    for (char* q = c + head; q < c + head + body; q += 64) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(q), z);
      _mm_stream_si128(reinterpret_cast<__m128i*>(q + 16), z);
      _mm_stream_si128(reinterpret_cast<__m128i*>(q + 32), z);
      _mm_stream_si128(reinterpret_cast<__m128i*>(q + 48), z);
    }
    std::memset(c + head + body, 0, bytes - head - body);
    _mm_sfence();  // order the streaming stores before the scatter's ordinary stores and loads
    return;
  }
#endif
  (void)streaming;
  std::memset(p, 0, bytes);
}

// dirty[t] (the vector may be empty: none): table t's gradient buffer holds zeros except, maybe,
// in the rows listed there (int64 ids, in range, repeats allowed): each block zeroes just those
// rows of its own and adds into the rest, instead of zeroing the whole V x D buffer (288 MB for
// the default tables, about as long as the scatter itself) every step.
template <typename scalar_t>
void backward_cpu_kernel(const PoolingPlan& plan, const at::Tensor& grad_out,
                         const std::vector<const int64_t*>& dirty, const std::vector<int64_t>& dirty_count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_tables = static_cast<int64_t>(plan.tables.size());
  const int64_t batch = plan.batch;
  const scalar_t* g = grad_out.data_ptr<scalar_t>();

  std::vector<std::vector<const FeatureMeta*>> readers(num_tables);
  // Every table with a buffer is zeroed, even one that no feature reads.
  const std::vector<void*>& grad_of = plan.table_grads;
  int64_t max_dim = 1;
  for (const auto& f : plan.features) {
    if (f.grad == nullptr) continue;
    readers[f.table_index].push_back(&f);
    max_dim = std::max(max_dim, f.dim);
  }
  std::vector<std::vector<acc_t>> denoms(plan.features.size());
  for (size_t i = 0; i < plan.features.size(); ++i) {
    const FeatureMeta& f = plan.features[i];
    if (f.grad == nullptr || f.combiner != kMean) continue;
    denoms[i].resize(batch);
    if (f.ids_int64) mean_denominators<scalar_t, int64_t>(f, batch, denoms[i].data());
    else mean_denominators<scalar_t, int32_t>(f, batch, denoms[i].data());
  }

  // Split tables into row blocks. Blocks are large (every block rescans its table's ids) but
  // numerous enough to balance threads.
  const int64_t threads = at::get_num_threads();
  int64_t total_bytes = 0;
  for (int64_t t = 0; t < num_tables; ++t)
    if (grad_of[t] != nullptr) total_bytes += plan.tables[t].numel() * static_cast<int64_t>(sizeof(scalar_t));
  // fp32/fp64 gradients accumulate in place; half types accumulate in an fp32 scratch block
  // that is rounded once into the gradient. That scratch is kept per thread across calls and
  // bounded (kHalfBlockBytes of gradient, twice that of scratch): allocating and zero-filling
  // a block of the whole table per call cost 7x the fp32 tables' backward (default bench
  // tables, bf16: 21 ms against 3 ms).
  constexpr bool in_place = std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t kHalfBlockBytes = int64_t{2} << 20;
  int64_t block_bytes = std::max<int64_t>(total_bytes / (4 * threads), 1 << 20);
  if constexpr (!in_place) block_bytes = std::min(block_bytes, kHalfBlockBytes);
  std::vector<RowBlock> blocks;
  for (int64_t t = 0; t < num_tables; ++t) {
    if (grad_of[t] == nullptr) continue;
    const int64_t V = plan.tables[t].size(0);
    const int64_t row_bytes = std::max<int64_t>(plan.tables[t].size(1) * sizeof(scalar_t), 1);
    const int64_t rows_per_block = std::max<int64_t>(block_bytes / row_bytes, 1);
    for (int64_t r = 0; r < V; r += rows_per_block) {
      const int64_t e = std::min(V, r + rows_per_block);
      blocks.push_back({t, r, e, (e - r) * row_bytes});
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const RowBlock& x, const RowBlock& y) { return x.bytes > y.bytes; });

  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  const int64_t workers = std::max<int64_t>(1, std::min(threads, num_blocks));
  // Blocks are handed out dynamically (largest first): a thread slowed down by other work does
  // not hold the others up. Which thread computes a block does not change its result.
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scaled(max_dim);
    static thread_local std::vector<acc_t> scratch;  // half types; grows once, never zero-filled whole
    for (int64_t i = next_block.fetch_add(1); i < num_blocks; i = next_block.fetch_add(1)) {
      const RowBlock& blk = blocks[i];
      const int64_t D = plan.tables[blk.table].size(1);
      const int64_t n = (blk.row_end - blk.row_begin) * D;
      scalar_t* grad = static_cast<scalar_t*>(grad_of[blk.table]) + blk.row_begin * D;
      // Zero the rows of the gradient that may hold something from before: only the dirty ones
      // when they are known, else all of them.
      if (!dirty.empty() && dirty[blk.table] != nullptr) {
        const int64_t* rows = dirty[blk.table];
        const int64_t count = dirty_count[blk.table];
        for (int64_t k = 0; k < count; ++k) {
          if (k + kScatterPrefetch < count) {
            const int64_t ahead = rows[k + kScatterPrefetch];
            if (ahead >= blk.row_begin && ahead < blk.row_end)
              prefetch_row<true>(grad + (ahead - blk.row_begin) * D, D);
          }
          if (rows[k] >= blk.row_begin && rows[k] < blk.row_end)
            std::memset(grad + (rows[k] - blk.row_begin) * D, 0, D * sizeof(scalar_t));
        }
      } else {
        zero_block(grad, n * static_cast<int64_t>(sizeof(scalar_t)), true);
      }
      // Every id this block receives, in the scatter's order (half types).
      auto visit_ids = [&](auto&& fn) {
        for (const FeatureMeta* f : readers[blk.table]) {
          auto in_block = [&](int64_t id) {
            if (id >= blk.row_begin && id < blk.row_end) fn(id);
          };
          if (f->ids_int64)
            for_each_grad_entry<int64_t>(*f, batch, in_block);
          else
            for_each_grad_entry<int32_t>(*f, batch, in_block);
        }
      };
      acc_t* block;
      if constexpr (in_place) {
        block = grad;
      } else {
        // An fp32 scratch of the block's rows, rounded once into the gradient: only the rows the
        // batch touches are zeroed, summed and rounded (see block_bytes above).
        if (static_cast<int64_t>(scratch.size()) < n) scratch.resize(n);
        block = scratch.data();
        visit_ids([&](int64_t id) { std::memset(block + (id - blk.row_begin) * D, 0, D * sizeof(acc_t)); });
      }
      for (const FeatureMeta* f : readers[blk.table]) {
        const acc_t* dn = denoms[f->feature].empty() ? nullptr : denoms[f->feature].data();
        if (f->ids_int64)
          scatter_feature_block<scalar_t, int64_t>(*f, g, plan.total_dim, batch, dn, blk.row_begin, blk.row_end,
                                                   block, scaled.data());
        else
          scatter_feature_block<scalar_t, int32_t>(*f, g, plan.total_dim, batch, dn, blk.row_begin, blk.row_end,
                                                   block, scaled.data());
      }
      if constexpr (!in_place) {  // a row with several ids is rounded again each time: the same value
        visit_ids([&](int64_t id) {
          const int64_t offset = (id - blk.row_begin) * D;
          for (int64_t d = 0; d < D; ++d) grad[offset + d] = static_cast<scalar_t>(block[offset + d]);
        });
      }
    }
  });
}

void backward_into_dirty_cpu(const at::Tensor& grad_out, const TensorList& grads, const TensorList& tables,
                             const TensorList& ids, const OptTensorList& offsets, const TensorList& weights,
                             at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners,
                             at::IntArrayRef mask_ids, at::IntArrayRef max_lens, const std::vector<std::string>& names,
                             at::IntArrayRef grad_padding_idx, at::IntArrayRef table_needs_grad, bool deterministic,
                             const OptTensorList& dirty_rows) {
  (void)deterministic;  // the CPU backward is always deterministic (fixed per-row order)
  PoolingPlan plan = backward_plan(grad_out, tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids,
                                   max_lens, names, grad_padding_idx);
  check_offsets_cpu(plan, names);
  attach_grads(plan, grads, table_needs_grad);
  // Per table the dirty rows of its buffer (checked here, before any thread writes).
  std::vector<const int64_t*> dirty;
  std::vector<int64_t> dirty_count;
  std::vector<at::Tensor> dirty_keep;
  if (!dirty_rows.empty()) {
    TORCH_CHECK(dirty_rows.size() == grads.size(), "pooled_embedding_backward_into_dirty: ", dirty_rows.size(),
                " dirty_rows entries for ", grads.size(), " gradient buffers");
    dirty.assign(tables.size(), nullptr);
    dirty_count.assign(tables.size(), 0);
    size_t slot = 0;
    for (size_t t = 0; t < tables.size() && t < table_needs_grad.size(); ++t) {
      if (!table_needs_grad[t]) continue;
      const std::optional<at::Tensor>& rows = dirty_rows[slot++];
      if (!rows.has_value()) continue;
      TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->device().is_cpu(),
                  "pooled_embedding_backward_into_dirty: dirty rows must be a 1-D int64 CPU tensor");
      at::Tensor r = rows->contiguous();
      const int64_t* p = r.data_ptr<int64_t>();
      const int64_t V = tables[t].size(0);
      for (int64_t k = 0; k < r.numel(); ++k)
        TORCH_CHECK(p[k] >= 0 && p[k] < V, "pooled_embedding_backward_into_dirty: dirty row ", p[k],
                    " out of range for table ", t, " with ", V, " rows");
      dirty[t] = p;
      dirty_count[t] = r.numel();
      dirty_keep.push_back(std::move(r));
    }
  }
  at::Tensor g = grad_out.contiguous();
  NEXTREC_FAST_DISPATCH_FLOATING(plan.dtype, "pooled_embedding_backward_cpu",
                                 [&] { backward_cpu_kernel<scalar_t>(plan, g, dirty, dirty_count); });
}

void backward_into_cpu(const at::Tensor& grad_out, const TensorList& grads, const TensorList& tables,
                       const TensorList& ids, const OptTensorList& offsets, const TensorList& weights,
                       at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners, at::IntArrayRef mask_ids,
                       at::IntArrayRef max_lens, const std::vector<std::string>& names,
                       at::IntArrayRef grad_padding_idx, at::IntArrayRef table_needs_grad, bool deterministic) {
  backward_into_dirty_cpu(grad_out, grads, tables, ids, offsets, weights, weighted_features, table_index, combiners,
                          mask_ids, max_lens, names, grad_padding_idx, table_needs_grad, deterministic, {});
}

TensorList backward_cpu(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                        const OptTensorList& offsets, const TensorList& weights, at::IntArrayRef weighted_features, at::IntArrayRef table_index,
                        at::IntArrayRef combiners, at::IntArrayRef mask_ids, at::IntArrayRef max_lens,
                        const std::vector<std::string>& names, at::IntArrayRef grad_padding_idx,
                        at::IntArrayRef table_needs_grad, bool deterministic) {
  TensorList grads;
  for (size_t t = 0; t < tables.size() && t < table_needs_grad.size(); ++t)
    // Uninitialised: the kernel zeroes each block in the thread that then fills it.
    if (table_needs_grad[t]) grads.push_back(at::empty(tables[t].sizes(), tables[t].options()));
  backward_into_cpu(grad_out, grads, tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids, max_lens, names,
                    grad_padding_idx, table_needs_grad, deterministic);
  return grads;
}

// ---- backward: sparse (COO) table gradients ------------------------------------------------

// Entries (row id, gradient row) of one feature, in row-major position order, like
// nn.Embedding(sparse=True)'s uncoalesced gradient. Returns nothing; fills idx/val from `start`.
template <typename scalar_t, typename index_t>
void sparse_feature_entries(const FeatureMeta& f, const scalar_t* grad_out, int64_t out_stride, int64_t batch,
                            std::vector<int64_t>& bag_start, int64_t* idx, scalar_t* val) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* ids = static_cast<const index_t*>(f.ids);
  const scalar_t* weights = static_cast<const scalar_t*>(f.weights);
  const int64_t D = f.dim;
  at::parallel_for(0, batch, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      bag_bounds(f, b, &begin, &end);
      begin = kept_begin(begin, end, f.max_len);
      const int64_t count = pooled_count(f, begin, end);
      const acc_t denom = mean_denominator<acc_t>(count);
      int64_t k = bag_start[b];
      for (int64_t p = begin; p < end; ++p) {
        const int64_t id = static_cast<int64_t>(ids[p]);
        if (!receives_grad(f, id)) continue;
        const scalar_t* src = grad_out + b * out_stride + out_column(f, p - begin);
        const acc_t w = weights != nullptr ? static_cast<acc_t>(weights[p]) : acc_t(1);
        idx[k] = id;
        scalar_t* dst = val + k * D;
        for (int64_t d = 0; d < D; ++d) {
          acc_t v = static_cast<acc_t>(src[d]);
          if (f.combiner == kMean) v /= denom;
          dst[d] = static_cast<scalar_t>(v * w);
        }
        ++k;
      }
    }
  });
}

template <typename index_t>
void count_sparse_entries(const FeatureMeta& f, int64_t batch, std::vector<int64_t>& per_bag) {
  const index_t* ids = static_cast<const index_t*>(f.ids);
  at::parallel_for(0, batch, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      bag_bounds(f, b, &begin, &end);
      begin = kept_begin(begin, end, f.max_len);
      int64_t n = 0;
      for (int64_t p = begin; p < end; ++p) n += receives_grad(f, static_cast<int64_t>(ids[p]));
      per_bag[b] = n;
    }
  });
}

// Per table needing a gradient: indices [N] (int64) and values [N, D], flattened as
// [indices_0, values_0, indices_1, values_1, ...].
TensorList backward_sparse_cpu(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                               const OptTensorList& offsets, const TensorList& weights,
                               at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners, at::IntArrayRef mask_ids,
                               at::IntArrayRef max_lens, const std::vector<std::string>& names,
                               at::IntArrayRef grad_padding_idx, at::IntArrayRef table_needs_grad) {
  PoolingPlan plan = backward_plan(grad_out, tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids,
                                   max_lens, names, grad_padding_idx);
  check_offsets_cpu(plan, names);
  TORCH_CHECK_VALUE(table_needs_grad.size() == plan.tables.size(), "pooled_embedding backward: table_needs_grad has ",
                    table_needs_grad.size(), " entries for ", plan.tables.size(), " tables");
  at::Tensor g = grad_out.contiguous();
  const int64_t batch = plan.batch;
  // Entry layout: features in order, each feature's bags in row order.
  std::vector<std::vector<int64_t>> bag_start(plan.features.size());
  std::vector<int64_t> table_entries(plan.tables.size(), 0), feature_start(plan.features.size(), 0);
  for (size_t i = 0; i < plan.features.size(); ++i) {
    const FeatureMeta& f = plan.features[i];
    if (!table_needs_grad[f.table_index]) continue;
    std::vector<int64_t>& starts = bag_start[i];
    starts.assign(batch, 0);
    if (f.ids_int64) count_sparse_entries<int64_t>(f, batch, starts);
    else count_sparse_entries<int32_t>(f, batch, starts);
    int64_t run = table_entries[f.table_index];
    feature_start[i] = run;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t n = starts[b];
      starts[b] = run;
      run += n;
    }
    table_entries[f.table_index] = run;
  }
  TensorList out;
  std::vector<at::Tensor> idx_of(plan.tables.size()), val_of(plan.tables.size());
  for (size_t t = 0; t < plan.tables.size(); ++t) {
    if (!table_needs_grad[t]) continue;
    idx_of[t] = at::empty({table_entries[t]}, g.options().dtype(at::kLong));
    val_of[t] = at::empty({table_entries[t], plan.tables[t].size(1)}, g.options());
    out.push_back(idx_of[t]);
    out.push_back(val_of[t]);
  }
  for (size_t i = 0; i < plan.features.size(); ++i) {
    const FeatureMeta& f = plan.features[i];
    if (!table_needs_grad[f.table_index]) continue;
    NEXTREC_FAST_DISPATCH_FLOATING(plan.dtype, "pooled_embedding_backward_sparse_cpu", [&] {
      int64_t* idx = idx_of[f.table_index].data_ptr<int64_t>();
      scalar_t* val = val_of[f.table_index].data_ptr<scalar_t>();
      if (f.ids_int64)
        sparse_feature_entries<scalar_t, int64_t>(f, g.data_ptr<scalar_t>(), plan.total_dim, batch, bag_start[i],
                                                  idx, val);
      else
        sparse_feature_entries<scalar_t, int32_t>(f, g.data_ptr<scalar_t>(), plan.total_dim, batch, bag_start[i],
                                                  idx, val);
    });
  }
  return out;
}

// ---- backward: coalesced sparse gradients (the in-backward optimisers) ----------------------

// Row id -> its slot among a table's distinct rows, in first-appearance order. A table no
// larger than 8x the entries gets a direct [V] map (one cache-friendly load per id); a larger one
// an open-addressing hash of capacity at least twice the entries (a [V] map would cost more to
// clear than the entries to look up). Ids are in-range rows (>= 0), so -1 marks an empty key.
class RowSlots {
 public:
  RowSlots(int64_t entries, int64_t vocab) : direct_(vocab <= 8 * entries) {
    if (direct_) {
      slots_.assign(vocab, -1);
    } else {
      int64_t capacity = 16;
      shift_ = 60;
      while (capacity < 2 * entries) {
        capacity *= 2;
        --shift_;
      }
      keys_.assign(capacity, -1);
      slots_.resize(capacity);
      mask_ = static_cast<uint64_t>(capacity - 1);
    }
    rows_.reserve(std::min<int64_t>(entries, vocab));
  }
  int64_t slot(int64_t id) {
    if (direct_) {
      int32_t& s = slots_[id];
      if (s < 0) {
        s = static_cast<int32_t>(rows_.size());
        rows_.push_back(id);
      }
      return s;
    }
    // Fibonacci hashing: the top bits of id * 2^64 / phi spread consecutive ids.
    uint64_t h = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift_;
    while (true) {
      if (keys_[h] == id) return slots_[h];
      if (keys_[h] == -1) {
        keys_[h] = id;
        slots_[h] = static_cast<int32_t>(rows_.size());
        rows_.push_back(id);
        return slots_[h];
      }
      h = (h + 1) & mask_;
    }
  }
  const std::vector<int64_t>& rows() const { return rows_; }

 private:
  bool direct_;
  std::vector<int64_t> keys_, rows_;
  std::vector<int32_t> slots_;  // fewer than 2^31 distinct rows per call
  uint64_t mask_ = 0;
  int shift_ = 0;
};

// Adds one feature's entries into their rows' sums `acc` ([U, D]), entry by entry in
// backward_sparse's order (k: the running entry index, fresh: the next slot not yet written).
// Each entry is what backward_sparse writes (g / denom * w) summed in acc_t; a row's first entry
// is written (0 + x is x), so `acc` needs no zeroing pass. Without per-id weights every entry of
// a sum/mean bag adds the same vector: computed once per bag.
template <typename scalar_t, typename index_t>
void accumulate_feature(const FeatureMeta& f, const scalar_t* grad_out, int64_t out_stride, int64_t batch,
                        const std::vector<int32_t>& entry_slot, at::opmath_type<scalar_t>* acc, int64_t& k,
                        int32_t& fresh) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* ids = static_cast<const index_t*>(f.ids);
  const scalar_t* weights = static_cast<const scalar_t*>(f.weights);
  const int64_t D = f.dim, entries = static_cast<int64_t>(entry_slot.size());
  const bool per_bag = weights == nullptr && f.combiner != kConcat;
  std::vector<acc_t> bag_grad(D);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t begin, end;
    bag_bounds(f, b, &begin, &end);
    begin = kept_begin(begin, end, f.max_len);
    const acc_t denom = f.combiner == kMean ? mean_denominator<acc_t>(pooled_count(f, begin, end)) : acc_t(1);
    if (per_bag) {
      const scalar_t* src = grad_out + b * out_stride + f.out_offset;
      for (int64_t d = 0; d < D; ++d) {
        acc_t v = static_cast<acc_t>(src[d]);
        if (f.combiner == kMean) v /= denom;
        bag_grad[d] = v;
      }
    }
    for (int64_t p = begin; p < end; ++p) {
      const int64_t id = static_cast<int64_t>(ids[p]);
      if (!receives_grad(f, id)) continue;
      // The rows entries add into are scattered: fetch a few entries ahead.
      if (k + 16 < entries) __builtin_prefetch(acc + static_cast<int64_t>(entry_slot[k + 16]) * D, 1);
      const int32_t slot = entry_slot[k++];
      acc_t* dst = acc + static_cast<int64_t>(slot) * D;
      const acc_t* v = bag_grad.data();
      if (!per_bag) {
        const scalar_t* src = grad_out + b * out_stride + out_column(f, p - begin);
        const acc_t w = weights != nullptr ? static_cast<acc_t>(weights[p]) : acc_t(1);
        for (int64_t d = 0; d < D; ++d) {
          acc_t x = static_cast<acc_t>(src[d]);
          if (f.combiner == kMean) x /= denom;
          bag_grad[d] = x * w;
        }
      }
      if (slot == fresh) {
        ++fresh;
        for (int64_t d = 0; d < D; ++d) dst[d] = v[d];
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d] += v[d];
      }
    }
  }
}

// One table's distinct rows and their summed gradients [U, D] (accumulation dtype), the sum of
// each row's entries in entry order from zero: what index_add_ of backward_sparse's entries
// gives, without writing the [N, D] entries.
template <typename scalar_t>
void coalesce_table(const PoolingPlan& plan, const scalar_t* grad_out, int64_t grad_row_stride, int64_t table,
                    at::Tensor& rows_out, at::Tensor& grad_out_rows, bool& finite) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = plan.batch;
  int64_t bound = 0;
  for (const FeatureMeta& f : plan.features)
    if (f.table_index == table) bound += f.offsets == nullptr ? batch * f.seq_len : f.seq_len;
  RowSlots map(bound, plan.tables[table].size(0));
  std::vector<int32_t> entry_slot;
  entry_slot.reserve(bound);
  for (const FeatureMeta& f : plan.features) {
    if (f.table_index != table) continue;
    auto visit = [&](int64_t id) { entry_slot.push_back(map.slot(id)); };
    if (f.ids_int64) for_each_grad_entry<int64_t>(f, batch, visit);
    else for_each_grad_entry<int32_t>(f, batch, visit);
  }
  const int64_t D = plan.tables[table].size(1);
  const int64_t U = static_cast<int64_t>(map.rows().size());
  rows_out = at::empty({U}, plan.tables[table].options().dtype(at::kLong));
  std::copy(map.rows().begin(), map.rows().end(), rows_out.data_ptr<int64_t>());
  grad_out_rows = at::empty({U, D}, plan.tables[table].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* acc = grad_out_rows.data_ptr<acc_t>();
  int64_t k = 0;
  int32_t fresh = 0;  // slots were numbered in entry order: a slot's first entry is the next new one
  for (const FeatureMeta& f : plan.features) {
    if (f.table_index != table) continue;
    if (f.ids_int64) accumulate_feature<scalar_t, int64_t>(f, grad_out, grad_row_stride, batch, entry_slot, acc, k, fresh);
    else accumulate_feature<scalar_t, int32_t>(f, grad_out, grad_row_stride, batch, entry_slot, acc, k, fresh);
  }
  // NaN fails every comparison, inf exceeds the largest finite value; an OR reduction
  // vectorises where a floating-point sum would wait on every add.
  bool bad = false;
  const acc_t largest = std::numeric_limits<acc_t>::max();
  for (int64_t i = 0; i < U * D; ++i) bad |= !(std::abs(acc[i]) <= largest);
  finite = !bad;
}

// Per table needing a gradient: its distinct rows [U] (int64, first-appearance order) then their
// summed gradients [U, D] (float32 for half tables, else the table's dtype), flattened as
// [rows_0, grads_0, rows_1, grads_1, ...], then one bool tensor [tables needing a gradient]:
// whether each table's sums are all finite. Tables run in parallel; each table's sums are in
// entry order, so the result is the same run to run and thread count to thread count.
TensorList backward_coalesced_cpu(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                                  const OptTensorList& offsets, const TensorList& weights,
                                  at::IntArrayRef weighted_features, at::IntArrayRef table_index,
                                  at::IntArrayRef combiners, at::IntArrayRef mask_ids, at::IntArrayRef max_lens,
                                  const std::vector<std::string>& names, at::IntArrayRef grad_padding_idx,
                                  at::IntArrayRef table_needs_grad) {
  PoolingPlan plan = backward_plan(grad_out, tables, ids, offsets, weights, weighted_features, table_index, combiners,
                                   mask_ids, max_lens, names, grad_padding_idx);
  check_offsets_cpu(plan, names);
  TORCH_CHECK_VALUE(table_needs_grad.size() == plan.tables.size(), "pooled_embedding backward: table_needs_grad has ",
                    table_needs_grad.size(), " entries for ", plan.tables.size(), " tables");
  // Rows may be strided (the pooled block of a wider gradient: the model concatenates the dense
  // features after it): read in place rather than copied ([2048, 464]: 0.36 ms a step).
  const bool unit_column_stride = grad_out.size(1) <= 1 || grad_out.stride(1) == 1;
  at::Tensor g = unit_column_stride ? grad_out : grad_out.contiguous();
  const int64_t grad_row_stride = g.size(0) > 1 ? g.stride(0) : plan.total_dim;
  std::vector<int64_t> wanted;
  for (size_t t = 0; t < plan.tables.size(); ++t)
    if (table_needs_grad[t]) wanted.push_back(static_cast<int64_t>(t));
  std::vector<at::Tensor> rows(wanted.size()), sums(wanted.size());
  at::Tensor finite = at::empty({static_cast<int64_t>(wanted.size())}, g.options().dtype(at::kBool));
  bool* ok = finite.data_ptr<bool>();
  // Tables go to threads largest first, each to the next free thread: a sequence feature's table
  // takes ~25x a single-id table's entries, and contiguous halves of the table list put all
  // three sequence tables of the default features on one thread (2 threads: 3.3 ms against
  // 0.6 ms, the other waiting). Which thread sums a table does not change its sums.
  std::vector<int64_t> order(wanted.size()), work(wanted.size(), 0);
  for (size_t i = 0; i < wanted.size(); ++i) {
    order[i] = static_cast<int64_t>(i);
    for (const FeatureMeta& f : plan.features)
      if (f.table_index == wanted[i]) work[i] += (f.offsets == nullptr ? plan.batch * f.seq_len : f.seq_len) * f.dim;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(order.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  NEXTREC_FAST_DISPATCH_FLOATING(plan.dtype, "pooled_embedding_backward_coalesced_cpu", [&] {
    const scalar_t* go = g.data_ptr<scalar_t>();
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (int64_t k = next.fetch_add(1); k < count; k = next.fetch_add(1)) {
        const int64_t i = order[k];
        coalesce_table<scalar_t>(plan, go, grad_row_stride, wanted[i], rows[i], sums[i], ok[i]);
      }
    });
  });
  TensorList out;
  for (size_t i = 0; i < wanted.size(); ++i) {
    out.push_back(rows[i]);
    out.push_back(sums[i]);
  }
  out.push_back(finite);
  return out;
}

// ---- backward: per-id weights --------------------------------------------------------------

template <typename scalar_t, typename index_t>
void weight_grad_feature(const FeatureMeta& f, const scalar_t* grad_out, int64_t out_stride, int64_t batch,
                         scalar_t* wgrad) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* ids = static_cast<const index_t*>(f.ids);
  at::parallel_for(0, batch, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin, end;
      bag_bounds(f, b, &begin, &end);
      const int64_t kept = kept_begin(begin, end, f.max_len);
      for (int64_t p = begin; p < kept; ++p) wgrad[p] = scalar_t(0);  // truncated away
      const int64_t count = pooled_count(f, kept, end);
      const acc_t denom = f.combiner == kMean ? mean_denominator<acc_t>(count) : acc_t(1);
      const scalar_t* g = grad_out + b * out_stride + f.out_offset;
      for (int64_t p = kept; p < end; ++p)
        wgrad[p] = static_cast<scalar_t>(position_weight_grad(f, g, static_cast<int64_t>(ids[p]), denom));
    }
  });
}

TensorList weight_backward_cpu(const at::Tensor& grad_out, const TensorList& tables, const TensorList& ids,
                               const OptTensorList& offsets, const TensorList& weights,
                               at::IntArrayRef weighted_features, at::IntArrayRef table_index, at::IntArrayRef combiners, at::IntArrayRef mask_ids,
                               at::IntArrayRef max_lens, const std::vector<std::string>& names) {
  PoolingPlan plan = backward_plan(grad_out, tables, ids, offsets, weights, weighted_features, table_index, combiners, mask_ids,
                                   max_lens, names, {});
  check_offsets_cpu(plan, names);
  at::Tensor g = grad_out.contiguous();
  TensorList out(weights.size());
  for (size_t i = 0; i < plan.features.size(); ++i) {
    const FeatureMeta& f = plan.features[i];
    if (plan.weight_slot[i] < 0) continue;  // (an empty weights tensor has a null data pointer)
    at::Tensor wgrad = at::empty(weights[plan.weight_slot[i]].sizes(), weights[plan.weight_slot[i]].options());
    NEXTREC_FAST_DISPATCH_FLOATING(plan.dtype, "pooled_embedding_weight_backward_cpu", [&] {
      if (f.ids_int64)
        weight_grad_feature<scalar_t, int64_t>(f, g.data_ptr<scalar_t>(), plan.total_dim, plan.batch,
                                               wgrad.data_ptr<scalar_t>());
      else
        weight_grad_feature<scalar_t, int32_t>(f, g.data_ptr<scalar_t>(), plan.total_dim, plan.batch,
                                               wgrad.data_ptr<scalar_t>());
    });
    out[plan.weight_slot[i]] = wgrad;
  }
  return out;
}

}  // namespace

}  // namespace nextrec_fast

// Fragment, not TORCH_LIBRARY: other parts of the package may define ops in this namespace.
NEXTREC_FAST_LIBRARY_FRAGMENT(NEXTREC_FAST_OP_NAMESPACE, m) {
  m.def(
      "pooled_embedding_forward(Tensor[] tables, Tensor[] ids, Tensor?[] offsets, Tensor[] per_id_weights, int[] weighted_features, "
      "int[] table_index, int[] combiners, int[] mask_ids, int[] max_lens, str[] feature_names, "
      "int[] grad_padding_idx, bool check_ids, bool deterministic, bool sparse_grad) -> Tensor");
  // Dense gradients of the tables with table_needs_grad[t] != 0, in table order.
  m.def(
      "pooled_embedding_backward(Tensor grad_out, Tensor[] tables, Tensor[] ids, Tensor?[] offsets, "
      "Tensor[] per_id_weights, int[] weighted_features, int[] table_index, int[] combiners, int[] mask_ids, int[] max_lens, "
      "str[] feature_names, int[] grad_padding_idx, int[] table_needs_grad, bool deterministic) -> Tensor[]");
  // The same, written into caller-provided buffers (overwritten, not accumulated): lets the
  // Python side reuse gradient buffers across steps.
  m.def(
      "pooled_embedding_backward_into(Tensor grad_out, Tensor(a!)[] grads, Tensor[] tables, Tensor[] ids, "
      "Tensor?[] offsets, Tensor[] per_id_weights, int[] weighted_features, int[] table_index, int[] combiners, int[] mask_ids, "
      "int[] max_lens, str[] feature_names, int[] grad_padding_idx, int[] table_needs_grad, "
      "bool deterministic) -> ()");
  // The same, except that a buffer with dirty_rows[i] given holds zeros outside those rows (int64
  // row ids, repeats allowed): only they are zeroed before the gradient is added in (the Python
  // side passes the rows its previous write touched). None: the buffer is zeroed whole.
  m.def(
      "pooled_embedding_backward_into_dirty(Tensor grad_out, Tensor(a!)[] grads, Tensor[] tables, Tensor[] ids, "
      "Tensor?[] offsets, Tensor[] per_id_weights, int[] weighted_features, int[] table_index, int[] combiners, int[] mask_ids, "
      "int[] max_lens, str[] feature_names, int[] grad_padding_idx, int[] table_needs_grad, "
      "bool deterministic, Tensor?[] dirty_rows) -> ()");
  // Sparse gradients (uncoalesced COO, like nn.Embedding(sparse=True)): per table that needs a
  // gradient, its int64 row indices [N] then values [N, D].
  m.def(
      "pooled_embedding_backward_sparse(Tensor grad_out, Tensor[] tables, Tensor[] ids, Tensor?[] offsets, "
      "Tensor[] per_id_weights, int[] weighted_features, int[] table_index, int[] combiners, int[] mask_ids, int[] max_lens, "
      "str[] feature_names, int[] grad_padding_idx, int[] table_needs_grad) -> Tensor[]");
  // Coalesced sparse gradients: per table that needs a gradient, its distinct int64 rows [U]
  // (first-appearance order on the CPU, ascending on CUDA; the sums are the same) then their summed gradients [U, D] (float32 for half tables); last,
  // a bool tensor: per such table, whether its sums are all finite.
  m.def(
      "pooled_embedding_backward_coalesced(Tensor grad_out, Tensor[] tables, Tensor[] ids, Tensor?[] offsets, "
      "Tensor[] per_id_weights, int[] weighted_features, int[] table_index, int[] combiners, int[] mask_ids, int[] max_lens, "
      "str[] feature_names, int[] grad_padding_idx, int[] table_needs_grad) -> Tensor[]");
  // Gradients of the per-id weights, in the order of per_id_weights.
  m.def(
      "pooled_embedding_weight_backward(Tensor grad_out, Tensor[] tables, Tensor[] ids, Tensor?[] offsets, "
      "Tensor[] per_id_weights, int[] weighted_features, int[] table_index, int[] combiners, int[] mask_ids, int[] max_lens, "
      "str[] feature_names) -> Tensor[]");
}

// The CUDA-emulation test build registers pooled_embedding_cuda.cu's host code for CPU tensors.
#ifndef NEXTREC_FAST_CUDA_EMULATION
NEXTREC_FAST_LIBRARY_IMPL(NEXTREC_FAST_OP_NAMESPACE, CPU, m) {
  m.impl("pooled_embedding_forward", &nextrec_fast::forward_cpu);
  m.impl("pooled_embedding_backward", &nextrec_fast::backward_cpu);
  m.impl("pooled_embedding_backward_into", &nextrec_fast::backward_into_cpu);
  m.impl("pooled_embedding_backward_into_dirty", &nextrec_fast::backward_into_dirty_cpu);
  m.impl("pooled_embedding_backward_sparse", &nextrec_fast::backward_sparse_cpu);
  m.impl("pooled_embedding_backward_coalesced", &nextrec_fast::backward_coalesced_cpu);
  m.impl("pooled_embedding_weight_backward", &nextrec_fast::weight_backward_cpu);
}
#endif

