// nextrec_fast::reusable_empty: an uninitialised CPU tensor from the same pool of freed outputs
// as the ops' own (output_cache.h), for outputs that Python code writes with out= (the expert
// GEMMs of nextrec_fast.layers.experts). Without it, each training step page-faults those
// buffers in afresh: glibc returns the step's freed activations to the OS, and the kernel
// zero-fills every 4 KiB page on the next first touch (PLE at batch 2048: ~24 MB a step).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "output_cache.h"

namespace nextrec_fast {

at::Tensor reusable_empty_cpu(const at::Tensor& like, at::IntArrayRef size) {
  return OutputCache::instance().empty(size, like.options());
}

int64_t release_cached_buffers() { return OutputCache::instance().clear(); }

}  // namespace nextrec_fast

TORCH_LIBRARY_FRAGMENT(nextrec_fast, m) {
  // A contiguous tensor of `size` with `like`'s dtype and device; contents undefined.
  m.def("reusable_empty(Tensor like, int[] size) -> Tensor");
  // Empties the pool (nextrec_fast.empty_cache); returns the bytes let go of. No tensor argument:
  // one kernel for every dispatch key.
  m.def("release_cached_buffers() -> int", &nextrec_fast::release_cached_buffers);
}

TORCH_LIBRARY_IMPL(nextrec_fast, CPU, m) {
  m.impl("reusable_empty", &nextrec_fast::reusable_empty_cpu);
}
