// The op namespace (torch.ops.<ns>) and registration macros through one indirection, so that
// the namespace can be a macro: the CUDA-emulation test build registers its ops elsewhere.
#pragma once

#include <torch/library.h>

#ifndef NEXTREC_FAST_OP_NAMESPACE
#define NEXTREC_FAST_OP_NAMESPACE nextrec_fast
#endif
#define NEXTREC_FAST_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define NEXTREC_FAST_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
