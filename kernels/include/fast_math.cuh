// fast_math.cuh: approximate f32 functions built on the SFU (MUFU) instructions, for kernels bound by
// instruction issue, with a CPU twin for the emulated GPU (crates/emu). Inline PTX lives here only
// (see mma.cuh for the convention).
//
//   silu_fast(v)  v / (1 + e^-v) from ex2.approx and rcp.approx: five instructions (FMUL, MUFU.EX2,
//                 FADD, MUFU.RCP, FMUL) where `__fdividef(v, 1 + __expf(-v))` compiles to about
//                 eight (its divisor range check) and `v / (1 + expf(-v))` to dozens. Relative
//                 error a few ulp of f32, far below bf16's rounding (2^-9). Large negative v: e^-v
//                 is +inf, its reciprocal 0, the result -0 (the limit); NaN stays NaN. The twin is
//                 the exact formula, which has the same limits.
#pragma once

#if !defined(__CUDA_ARCH__) && !defined(OPENUNI_EMU)
#error "fast_math.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

__device__ __forceinline__ float silu_fast(float v) {
#if defined(__CUDA_ARCH__)
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(v * -1.4426950408889634f));  // e^-v = 2^(-v log2 e)
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
  return v * r;
#else
  return v / (1.f + expf(-v));
#endif
}

}  // namespace ou
