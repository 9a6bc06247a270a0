// Reuse of large CPU output buffers across calls, for ops that fully overwrite their outputs.
//
// A training step frees its activations and gradients and allocates the same shapes again
// next step. glibc hands large blocks back to the OS on free, so every fresh [B, C] buffer is
// page-faulted in again (zero-filled by the kernel): for PLE's expert layers at batch 2048 that
// is tens of MB per step, several ms. Here an op takes its output from a small pool of tensors
// it returned before, once nothing else references them. The pool holds storages, not tensors:
// a tensor still referenced from C++ keeps its Python object alive (and so a reference), while
// a storage referenced by the pool alone has no tensor, view or saved variable left. Each call
// gets a fresh tensor on the reused storage; contents are undefined, as with at::empty. NEXTREC_FAST_OUTPUT_CACHE=0 turns it off.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace nextrec_fast {

class OutputCache {
 public:
  static constexpr int64_t kMinBytes = 1 << 20;  // smaller buffers come from malloc's free lists anyway
  static constexpr size_t kMaxEntries = 32;
  static constexpr int64_t kMaxBytes = int64_t{1} << 30;  // what the pool may keep alive in all

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t nbytes = c10::multiply_integers(sizes) *
                           static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
    if (!enabled() || !options.device().is_cpu() || nbytes < kMinBytes) return at::empty(sizes, options);
    c10::Storage storage;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const c10::Storage& s : entries_) {
        if (s.use_count() == 1 && static_cast<int64_t>(s.nbytes()) == nbytes) {
          storage = s;
          break;
        }
      }
    }
    if (storage) {
      at::Tensor t = at::empty({0}, options);
      t.set_(storage, /*storage_offset=*/0, sizes, c10::contiguous_strides(sizes));
      return t;
    }
    at::Tensor fresh = at::empty(sizes, options);
    std::lock_guard<std::mutex> lock(mutex_);
    if (nbytes > kMaxBytes) return fresh;
    // Full: the oldest entries make room, whether in use or not (dropping the pool's reference
    // never affects a tensor; it bounds what the pool keeps, e.g. a storage whose Python object
    // was created once and now keeps the use count up for good).
    while (!entries_.empty() && (entries_.size() >= kMaxEntries || bytes_ + nbytes > kMaxBytes)) {
      bytes_ -= static_cast<int64_t>(entries_.front().nbytes());
      entries_.erase(entries_.begin());
    }
    entries_.push_back(fresh.storage());
    bytes_ += nbytes;
    return fresh;
  }

  // Drops every entry (a buffer still in use stays with its tensors) and returns the bytes of
  // those nothing else referenced: they go back to the allocator now.
  int64_t clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t released = 0;
    for (const c10::Storage& s : entries_)
      if (s.use_count() == 1) released += static_cast<int64_t>(s.nbytes());
    entries_.clear();
    bytes_ = 0;
    return released;
  }

  static OutputCache& instance() {
    static OutputCache cache;
    return cache;
  }

 private:
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("NEXTREC_FAST_OUTPUT_CACHE");
      return v == nullptr || std::strcmp(v, "0") != 0;
    }();
    return on;
  }

  std::mutex mutex_;
  std::vector<c10::Storage> entries_;  // oldest first; free when referenced by the pool alone
  int64_t bytes_ = 0;
};

}  // namespace nextrec_fast
