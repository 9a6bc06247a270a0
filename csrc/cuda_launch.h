// What the .cu files launch kernels with: real CUDA, or (NEXTREC_FAST_CUDA_EMULATION, the
// tests' build) the host stand-ins of cuda_emulation.h that run every (block, thread) on the CPU.
#pragma once

#ifdef NEXTREC_FAST_CUDA_EMULATION
#include "cuda_emulation.h"  // plain C++ on the CPU, for the tests
#else
#include <ATen/cuda/Atomic.cuh>
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuSPARSE/cuBLAS headers that a
// bare CUDA toolkit (nvcc + runtime only) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace nextrec_fast {
constexpr bool kCudaEmulation = false;
using DeviceGuard = c10::cuda::CUDAGuard;
inline c10::cuda::CUDAStream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace nextrec_fast

#define NEXTREC_FAST_LAUNCH(kernel, blocks, threads, stream, ...) \
  do {                                                             \
    kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__);           \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                \
  } while (0)
#define NEXTREC_FAST_CUDA_DISPATCH_KEY CUDA
#endif
