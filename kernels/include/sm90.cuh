// sm90.cuh: what the Hopper (sm_90a) helpers share: shared-memory window addresses and the swizzle modes
// that wgmma descriptors (wgmma.cuh) and tensor maps (tma.cuh) must agree on.
//
// Swizzle (PTX ISA "Shared Memory Matrix Layout" / "Tensor Map" swizzle modes; CUTLASS cute Swizzle<B,4,3>):
// a function of the shared-memory address alone. Within every 128-byte line, the 16-byte chunk index (address
// bits 4..6) is XORed with the line index (address bits 7..9), masked to the mode's width:
//   none: identity        32B: bit 4 ^= bit 7 (pattern repeats every 256 bytes)
//   64B: bits 4-5 ^= bits 7-8 (512 bytes)    128B: bits 4-6 ^= bits 7-9 (1024 bytes)
// Because it depends only on the address, a tile written by TMA with a mode is read correctly by wgmma with
// the same mode, provided the tile starts on the pattern's boundary (the emulator checks this).
#pragma once

#if defined(__CUDA_ARCH__)
#define OU_SM90_SITE
#define OPENUNI_SM90_SITE_FIRST
#define OU_SM90_HERE
#elif defined(OPENUNI_EMU)
#define OU_SM90_SITE , OPENUNI_EMU_SITE
#define OPENUNI_SM90_SITE_FIRST OPENUNI_EMU_SITE
#define OU_SM90_HERE openuni_emu_file, openuni_emu_line
#else
#error "sm90.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

// The wgmma descriptor's encoding (bits 62-63); tma.cuh maps it to CUtensorMapSwizzle.
enum class Swizzle : unsigned { none = 0, b128 = 1, b64 = 2, b32 = 3 };

// Bytes per swizzled line (the row width of a swizzled K-major tile): 16 for none.
__device__ __forceinline__ constexpr unsigned swizzle_bytes(Swizzle s) {
  return s == Swizzle::b128 ? 128u : s == Swizzle::b64 ? 64u : s == Swizzle::b32 ? 32u : 16u;
}
// Lines in one repeat of the pattern minus one (the XOR mask): 7, 3, 1, 0.
__device__ __forceinline__ constexpr unsigned swizzle_mask(Swizzle s) { return swizzle_bytes(s) / 16u - 1u; }
// The physical shared address of logical shared address `a` under swizzle `s`.
__device__ __forceinline__ constexpr unsigned swizzle_addr(unsigned a, Swizzle s) {
  return a ^ (((a >> 7) & swizzle_mask(s)) << 4);
}

// The shared-window address of a pointer into shared memory (`cvta.to.shared`). On the emulated GPU only
// dynamic (`extern __shared__`) memory has one; other pointers fail the launch with a message.
__device__ __forceinline__ unsigned smem_addr(const void* p OU_SM90_SITE) {
#if defined(__CUDA_ARCH__)
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
#else
  return openuni_emu::smem_window_addr(p, "shared-memory address", OU_SM90_HERE);
#endif
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads of them (wgmma
// operands, TMA stores): `fence.proxy.async.shared::cta`. Nothing to do on the emulated GPU.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// `setmaxnreg.inc/.dec.sync.aligned.u32 R`: the warpgroup asks for (inc) or gives back (dec) registers, to
// R per thread. R is a multiple of 8 in [24, 256]; every warp of the warpgroup executes the same one. The
// emulator checks both (a warpgroup rendezvous whose threads must agree) and changes nothing else.
template <int R>
__device__ __forceinline__ void setmaxnreg_inc(OPENUNI_SM90_SITE_FIRST) {
  static_assert(R % 8 == 0 && R >= 24 && R <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
#if defined(__CUDA_ARCH__)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#else
  static __thread char what[40];
  if (!what[0]) snprintf(what, sizeof what, "setmaxnreg.inc %d", R);
  openuni_emu::warpgroup_sync(what, OU_SM90_HERE);
#endif
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec(OPENUNI_SM90_SITE_FIRST) {
  static_assert(R % 8 == 0 && R >= 24 && R <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
#if defined(__CUDA_ARCH__)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#else
  static __thread char what[40];
  if (!what[0]) snprintf(what, sizeof what, "setmaxnreg.dec %d", R);
  openuni_emu::warpgroup_sync(what, OU_SM90_HERE);
#endif
}

// Registers per thread of the warp-specialised kernels (a producer warpgroup and two consumer warpgroups,
// one block of 384 threads per SM: __launch_bounds__(384, 1)): every thread starts with BASE (65,536 / 384
// in the allocation's units of 8; tests/kernels_compile.rs checks that ptxas gives exactly that), the
// producer gives back down to PRODUCER and the consumers take what that frees. On hardware an inc that asks
// for more than the block freed waits forever, so the sum is checked here (the emulator does not model the
// register file). Used by the sm_90a attention, conv and MixFFN kernels.
struct WarpSpecializedRegs {
  static constexpr int BASE = 65536 / 384 / 8 * 8;
  static constexpr int PRODUCER = 40;
  static constexpr int CONSUMER = (384 * BASE - 128 * PRODUCER) / 256 / 8 * 8;
  static_assert(128 * PRODUCER + 256 * CONSUMER <= 384 * BASE, "setmaxnreg: the consumers take more than the producer gave back");
};

}  // namespace ou

#undef OU_SM90_SITE
#undef OPENUNI_SM90_SITE_FIRST
#undef OU_SM90_HERE
