// Host stand-ins that let the .cu files compile as plain C++ and run on the CPU
// (NEXTREC_FAST_CUDA_EMULATION; tests/test_pooled_embedding_cuda_emulated.py builds them).
//
// The kernels keep every thread independent (no shared memory, no barriers, no warp
// shuffles; atomics only), so running each (block, thread) in turn executes exactly the code
// the GPU runs: index math, lane loops, range checks and error reports, the deterministic
// sort-and-reduce backward, and the host code around the launches (plans, buffers, sorting).
// Blocks run in reverse order: a kernel must not depend on the order the GPU schedules them in.
// What it cannot show: races between threads, memory coalescing, speed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>

#define __global__
#define __device__

struct NextrecFastEmulatedDim3 {
  unsigned int x = 0, y = 0, z = 0;
};
inline thread_local NextrecFastEmulatedDim3 blockIdx, blockDim, threadIdx;

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
  const unsigned long long old = *address;
  if (old == compare) *address = value;
  return old;
}

template <typename T>
inline void gpuAtomicAdd(T* address, T value) {
  using acc_t = at::opmath_type<T>;
  *address = static_cast<T>(static_cast<acc_t>(*address) + static_cast<acc_t>(value));
}

namespace nextrec_fast {

constexpr bool kCudaEmulation = true;

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

inline int current_stream() { return 0; }

template <typename Kernel, typename... Args>
void emulate_launch(Kernel kernel, int64_t blocks, int threads, const Args&... args) {
  blockDim.x = static_cast<unsigned int>(threads);
  for (int64_t block = blocks - 1; block >= 0; --block) {
    blockIdx.x = static_cast<unsigned int>(block);
    for (int t = 0; t < threads; ++t) {
      threadIdx.x = static_cast<unsigned int>(t);
      kernel(args...);
    }
  }
}

}  // namespace nextrec_fast

#define NEXTREC_FAST_LAUNCH(kernel, blocks, threads, stream, ...) \
  ((void)(stream), ::nextrec_fast::emulate_launch(kernel, blocks, threads, __VA_ARGS__))
#define NEXTREC_FAST_CUDA_DISPATCH_KEY CPU
