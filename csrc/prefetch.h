// Software prefetch of a whole row, for loops whose next rows lie a large stride or a random row
// away: hardware prefetchers follow neither across pages. Shared by the BatchNorm kernels (a
// column block down the rows) and the pooling backward (scattered table rows).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace nextrec_fast {

// Prefetches every 64-byte line of the `width` elements at `row`, into every cache level, for a
// write if `kWrite` (the line arrives exclusive) else for a read.
template <bool kWrite, typename T>
C10_ALWAYS_INLINE void prefetch_row(const T* row, int64_t width) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < width * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(bytes + off, kWrite ? 1 : 0);
}

}  // namespace nextrec_fast
