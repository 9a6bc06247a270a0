// nextrec_fast::onednn_gemm_out: out = a @ b (+ out), float32 on CPU, through oneDNN's GEMM
// (PyTorch's own at::native::mkldnn_matmul, the kernel its bf16 matmuls use) instead of the
// BLAS that torch.mm calls for float32 (MKL in the PyPI wheels).
//
// Why: on the AMD EPYC (AVX-512) the benchmarks run on, MKL's sgemm takes ~2.1x oneDNN's time
// for the expert GEMMs and their input gradients (same shapes, same threads, both libraries
// inside the torch wheel; docs/benchmarks.md). The result differs from mm's by float32
// rounding only (tests/test_onednn_gemm.py holds it to float64 against mm's own error).
//
// mkldnn_matmul is exported by libtorch_cpu but not declared in the installed headers, so it
// is declared here as a weak symbol: a libtorch without it (or with another signature) leaves
// the address null and the op falls back to at::mm_out / bmm_out; so does a CPU whose oneDNN
// refuses float32 (mkldnn_matmul's own device check: AVX-512 or avx_ne_convert, probed once).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <atomic>

namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                                         float beta, float alpha);
}  // namespace at::native

namespace nextrec_fast {
namespace {

std::atomic<int> onednn_state{0};       // 0: not probed, 1: oneDNN runs float32 here, -1: it does not
std::atomic<int64_t> onednn_calls{0};   // GEMMs that reached oneDNN (the tests read it)

bool onednn_linked() { return &at::native::mkldnn_matmul != nullptr; }

// Whether this CPU's oneDNN runs float32 matmuls: one tiny call of mkldnn_matmul itself (its
// device check raises on CPUs without AVX-512 / avx_ne_convert). Once per process.
bool onednn_runs_float32() {
  int state = onednn_state.load();
  if (state == 0) {
    state = -1;
    if (onednn_linked()) {
      try {
        auto a = at::ones({2, 2});
        auto out = at::empty({2, 2});
        at::native::mkldnn_matmul(a, a, out, 0.0f, 1.0f);
        state = out.equal(at::full({2, 2}, 2.0)) ? 1 : -1;
      } catch (const std::exception&) {
        state = -1;
      }
    }
    onednn_state.store(state);
  }
  return state == 1;
}

void fallback_gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  if (a.dim() == 2) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  } else if (accumulate) {
    out.baddbmm_(a, b);
  } else {
    at::bmm_out(out, a, b);
  }
}

}  // namespace

void onednn_gemm_out(const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool accumulate) {
  TORCH_CHECK(a.dim() == b.dim() && (a.dim() == 2 || a.dim() == 3) && out.dim() == a.dim(),
              "onednn_gemm_out: a, b and out must all be 2-D or all 3-D, got ", a.dim(), ", ", b.dim(), ", ",
              out.dim());
  const int64_t k = a.dim() - 1;
  TORCH_CHECK(a.size(k) == b.size(k - 1) && out.size(k - 1) == a.size(k - 1) && out.size(k) == b.size(k) &&
                  (a.dim() == 2 || (a.size(0) == b.size(0) && a.size(0) == out.size(0))),
              "onednn_gemm_out: shapes do not multiply: ", a.sizes(), " @ ", b.sizes(), " into ", out.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == out.scalar_type(),
              "onednn_gemm_out: a, b and out must share a dtype");
  // A column-major output (unit stride between rows) sends oneDNN to its reference matmul
  // (ref:any, ~100x slower): such outputs take the BLAS path (dense_gemm.gemm_into transposes
  // the product instead, C^T = B^T A^T).
  const bool usable = a.scalar_type() == at::kFloat && (out.size(-1) <= 1 || out.stride(-1) == 1) &&
                      a.numel() > 0 && b.numel() > 0 && out.numel() > 0 &&
                      at::globalContext().userEnabledMkldnn() &&  // torch.backends.mkldnn.enabled
                      onednn_runs_float32();
  if (usable) {
    try {
      at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
      onednn_calls.fetch_add(1);
      return;
    } catch (const std::exception&) {
      // mkldnn_matmul checks before it writes; whatever it refused (or failed to allocate),
      // this call takes the BLAS path. The next call tries oneDNN again.
    }
  }
  fallback_gemm(a, b, out, accumulate);
}

bool onednn_gemm_available() { return onednn_runs_float32(); }

int64_t onednn_gemm_calls() { return onednn_calls.load(); }

}  // namespace nextrec_fast

TORCH_LIBRARY_FRAGMENT(nextrec_fast, m) {
  // out = a @ b (accumulate: out += a @ b); 2-D (mm) or 3-D (bmm); any strides. float32 through
  // oneDNN when this libtorch has it, otherwise (and for other dtypes) at::mm_out / bmm_out.
  m.def("onednn_gemm_out(Tensor a, Tensor b, Tensor(a!) out, bool accumulate=False) -> ()");
  // Whether onednn_gemm_out reaches oneDNN for float32 on this machine, and how many of its calls
  // have (the tests check a GEMM did not fall back). No tensor argument.
  m.def("onednn_gemm_available() -> bool", &nextrec_fast::onednn_gemm_available);
  m.def("onednn_gemm_calls() -> int", &nextrec_fast::onednn_gemm_calls);
}

TORCH_LIBRARY_IMPL(nextrec_fast, CPU, m) { m.impl("onednn_gemm_out", &nextrec_fast::onednn_gemm_out); }
