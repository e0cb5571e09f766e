// atomics.cuh: ordered atomics of the PTX memory model, for cross-CTA hand-offs (a CTA publishes a
// result in global memory, another one consumes it), with a CPU twin for the emulated GPU (crates/emu).
//
//   atomic_add_acq_rel_gpu(p, v)  `atom.acq_rel.gpu.global.add.u32`: adds v to the global *p and
//                                  returns the old value. Release: this thread's earlier writes (and,
//                                  after a __syncthreads, its CTA's) are visible to whoever acquires
//                                  the new value; acquire: writes released by earlier adds to *p are
//                                  visible to this thread (and, after a __syncthreads, to its CTA).
//                                  Replaces the `__threadfence(); atomicAdd(); __threadfence();`
//                                  idiom, whose relaxed atomic orders nothing by itself.
//
// The CPU twin is a real acquire-release read-modify-write (__atomic_fetch_add, __ATOMIC_ACQ_REL):
// blocks run on several worker threads. Inline PTX lives here only (see mma.cuh for the convention).
#pragma once

#if !defined(__CUDA_ARCH__) && !defined(OPENUNI_EMU)
#error "atomics.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

__device__ __forceinline__ unsigned atomic_add_acq_rel_gpu(unsigned* p, unsigned v) {
#if defined(__CUDA_ARCH__)
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
#else
  return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL);
#endif
}

}  // namespace ou
