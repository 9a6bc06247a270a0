// Inner loops compiled for AVX-512 and AVX2 besides the baseline and picked at load time (the
// extension is built without -march flags): NEXTREC_FAST_CPU_CLONES on the entry function of a
// loop nest. Everything a clone runs must be inlined into it, hence NEXTREC_FAST_INLINE
// (always_inline) on the helpers it calls. Shared by the BatchNorm and gate-mixture kernels.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NEXTREC_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NEXTREC_FAST_CPU_CLONES
#endif
#define NEXTREC_FAST_INLINE inline __attribute__((always_inline))
