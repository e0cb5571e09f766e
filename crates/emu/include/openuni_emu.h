// openuni_emu.h: compiles CUDA kernel sources as ordinary C++ (g++ -std=c++17) for the emulated GPU.
//
// Force-included (-include) into every kernel translation unit by crates/emu/build.rs, and into nothing
// else: the built-in variables below are macros (threadIdx, blockDim, ...) that would clash with any other
// code's fields of the same names.
//
// How CUDA maps onto the CPU here:
//  * Each block runs on one worker thread; each CUDA thread is a fiber (Rust scheduler, src/fiber.rs).
//  * threadIdx/blockIdx/blockDim/gridDim read the running fiber's state through a thread-local pointer.
//  * __syncthreads and the warp intrinsics call the scheduler through openuni_emu_hooks_table; warp
//    intrinsics deposit each lane's value in a per-warp exchange buffer, meet, then read.
//  * __global__, __shared__ and __constant__ expand to marker identifiers that build.rs rewrites in the
//    preprocessed source: __shared__ -> static __thread (poisoned with 0xFF before every block),
//    extern __shared__ -> the per-worker dynamic shared memory buffer, __constant__ -> a global that
//    cuModuleGetGlobal finds by name. This header therefore only works through build.rs.
#ifndef OPENUNI_EMU_H
#define OPENUNI_EMU_H
#define OPENUNI_EMU 1

// Standard headers first: libstdc++ uses the attribute name __noinline__, which we define further down.
#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/time.h>

// The real CUDA 13 headers compile on the host with g++ (bf16/f16 types, conversions, most operators).
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "openuni_emu_abi.h"

// ---- execution-space and storage keywords -------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __align__
#undef __cluster_dims__
#undef __maxnreg__
#define __global__ __openuni_emu_global__
#define __shared__ __openuni_emu_shared__
#define __constant__ __openuni_emu_constant__
#define __device__
#define __host__
#define __forceinline__ __attribute__((always_inline)) inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __cluster_dims__(...)
#define __maxnreg__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

// ---- built-in variables ---------------------------------------------------------------------------------
extern "C" __thread openuni_emu_thread* openuni_emu_cur;
#define threadIdx (reinterpret_cast<const uint3&>(openuni_emu_cur->tid))
#define blockIdx (reinterpret_cast<const uint3&>(openuni_emu_cur->bid))
#define blockDim (reinterpret_cast<const uint3&>(openuni_emu_cur->bdim))
#define gridDim (reinterpret_cast<const uint3&>(openuni_emu_cur->gdim))
#define warpSize 32

#define OPENUNI_EMU_SITE const char *openuni_emu_file = __builtin_FILE(), int openuni_emu_line = __builtin_LINE()
#define OPENUNI_EMU_HERE openuni_emu_file, openuni_emu_line

// ---- errors: assert and __trap end the launch with the GPU's error code --------------------------------
[[noreturn]] inline void openuni_emu_fail(int code, const char* msg, const char* file, int line) {
  openuni_emu_hooks_table.fail(openuni_emu_cur, code, msg, file, line);
  __builtin_unreachable();
}
#undef assert
#define assert(e) ((e) ? (void)0 : openuni_emu_fail(710, "device-side assert failed: " #e, __FILE__, __LINE__))
inline void __trap(OPENUNI_EMU_SITE) { openuni_emu_fail(715, "__trap() called", OPENUNI_EMU_HERE); }
inline void __brkpt(OPENUNI_EMU_SITE) { openuni_emu_fail(715, "__brkpt() called", OPENUNI_EMU_HERE); }

// ---- block barriers ------------------------------------------------------------------------------------
inline void __syncthreads(OPENUNI_EMU_SITE) {
  openuni_emu_hooks_table.block_sync(openuni_emu_cur, 0, 0, OPENUNI_EMU_HERE);
}
inline int __syncthreads_count(int pred, OPENUNI_EMU_SITE) {
  openuni_emu_thread* t = openuni_emu_cur;
  openuni_emu_hooks_table.block_sync(t, 1, pred != 0, OPENUNI_EMU_HERE);
  return t->sync_result;
}
inline int __syncthreads_and(int pred, OPENUNI_EMU_SITE) {
  openuni_emu_thread* t = openuni_emu_cur;
  openuni_emu_hooks_table.block_sync(t, 2, pred != 0, OPENUNI_EMU_HERE);
  return t->sync_result;
}
inline int __syncthreads_or(int pred, OPENUNI_EMU_SITE) {
  openuni_emu_thread* t = openuni_emu_cur;
  openuni_emu_hooks_table.block_sync(t, 3, pred != 0, OPENUNI_EMU_HERE);
  return t->sync_result;
}
// Blocks run concurrently on several workers: fences must be real.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { openuni_emu_hooks_table.yield_now(openuni_emu_cur); }
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
inline int clock() { return (int)__builtin_ia32_rdtsc(); }

// ---- warp exchange: every warp intrinsic is deposit, meet, read ----------------------------------------
namespace openuni_emu {
// What the lanes of one exchange deposited; lane(j) is valid for lanes named in the exchange's mask.
struct lanes {
  const unsigned char* base;
  uint32_t parity;
  const void* lane(int j) const {
    return base + ((size_t)j * 2 + ((parity >> j) & 1u)) * OPENUNI_EMU_XCHG_SLOT;
  }
  template <class T> T get(int j) const {
    T v;
    std::memcpy(&v, lane(j), sizeof(T));
    return v;
  }
};
template <class T>
inline lanes exchange(uint32_t mask, const T& mine, const char* file, int line) {
  static_assert(sizeof(T) <= OPENUNI_EMU_XCHG_SLOT, "warp exchange payload too large");
  static_assert(std::is_trivially_copyable<T>::value, "warp exchange payload must be trivially copyable");
  openuni_emu_thread* t = openuni_emu_cur;
  uint32_t p = t->ops & 1u;
  t->ops++;
  std::memcpy(t->xchg + ((size_t)t->lane * 2 + p) * OPENUNI_EMU_XCHG_SLOT, &mine, sizeof(T));
  openuni_emu_hooks_table.warp_sync(t, mask, file, line);
  return lanes{t->xchg, t->parity};
}
inline uint32_t lane_id() { return openuni_emu_cur->lane; }
// Lanes that exist in this warp (a partial last warp has fewer than 32).
inline uint32_t existing_lanes() {
  const openuni_emu_thread* t = openuni_emu_cur;
  uint32_t n = t->bdim[0] * t->bdim[1] * t->bdim[2];
  uint32_t first = t->warp * 32u, cnt = n - first >= 32u ? 32u : n - first;
  return cnt == 32u ? 0xffffffffu : ((1u << cnt) - 1u);
}
// shfl.sync source-lane rule from the PTX ISA: c packs the segment mask (bits 12:8) and clamp (bits 4:0).
enum class shfl_mode { idx, up, down, bfly };
inline int shfl_src(shfl_mode mode, int lane, int b, int width) {
  uint32_t segmask = (uint32_t)(32 - width) & 31u;
  uint32_t clamp = mode == shfl_mode::up ? 0u : 31u;
  int max_lane = (int)(((uint32_t)lane & segmask) | (clamp & ~segmask));
  int min_lane = (int)((uint32_t)lane & segmask);
  int j;
  bool ok;
  switch (mode) {
    case shfl_mode::up: j = lane - b; ok = j >= max_lane; break;
    case shfl_mode::down: j = lane + b; ok = j <= max_lane; break;
    case shfl_mode::bfly: j = lane ^ b; ok = j <= max_lane; break;
    default: j = min_lane | (b & 31 & (int)~segmask); ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}
template <class T>
inline T shfl(shfl_mode mode, uint32_t mask, T v, int b, int width, const char* file, int line) {
  if (width <= 0 || width > 32 || (width & (width - 1)))
    openuni_emu_fail(1, "__shfl*_sync: width must be a power of two in [1, 32]", file, line);
  lanes all = exchange(mask, v, file, line);
  return all.get<T>(shfl_src(mode, (int)lane_id(), b, width));
}
}  // namespace openuni_emu

template <class T> inline T __shfl_sync(unsigned mask, T var, int src, int width = 32, OPENUNI_EMU_SITE) {
  return openuni_emu::shfl(openuni_emu::shfl_mode::idx, mask, var, src, width, OPENUNI_EMU_HERE);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, OPENUNI_EMU_SITE) {
  return openuni_emu::shfl(openuni_emu::shfl_mode::up, mask, var, (int)delta, width, OPENUNI_EMU_HERE);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, OPENUNI_EMU_SITE) {
  return openuni_emu::shfl(openuni_emu::shfl_mode::down, mask, var, (int)delta, width, OPENUNI_EMU_HERE);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, OPENUNI_EMU_SITE) {
  return openuni_emu::shfl(openuni_emu::shfl_mode::bfly, mask, var, lane_mask, width, OPENUNI_EMU_HERE);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, OPENUNI_EMU_SITE) {
  openuni_emu::exchange(mask, 0, OPENUNI_EMU_HERE);
}
inline unsigned __ballot_sync(unsigned mask, int pred, OPENUNI_EMU_SITE) {
  openuni_emu::lanes all = openuni_emu::exchange(mask, (int)(pred != 0), OPENUNI_EMU_HERE);
  unsigned r = 0;
  unsigned m = mask & openuni_emu::existing_lanes();
  for (int j = 0; j < 32; j++)
    if (((m >> j) & 1u) && all.get<int>(j)) r |= 1u << j;
  return r;
}
inline int __any_sync(unsigned mask, int pred, OPENUNI_EMU_SITE) { return __ballot_sync(mask, pred, OPENUNI_EMU_HERE) != 0; }
inline int __all_sync(unsigned mask, int pred, OPENUNI_EMU_SITE) {
  return __ballot_sync(mask, pred, OPENUNI_EMU_HERE) == (mask & openuni_emu::existing_lanes());
}
inline int __uni_sync(unsigned mask, int pred, OPENUNI_EMU_SITE) {
  unsigned b = __ballot_sync(mask, pred, OPENUNI_EMU_HERE);
  return b == 0 || b == (mask & openuni_emu::existing_lanes());
}
// Fibers of a warp never diverge in lock-step, so this cannot see divergence: it names the warp's lanes.
inline unsigned __activemask() { return openuni_emu::existing_lanes(); }
namespace openuni_emu {
template <class T, class F> inline T warp_reduce(unsigned mask, T v, F f, const char* file, int line) {
  lanes all = exchange(mask, v, file, line);
  unsigned m = mask & existing_lanes();
  bool first = true;
  T r{};
  for (int j = 0; j < 32; j++)
    if ((m >> j) & 1u) { T x = all.get<T>(j); r = first ? x : f(r, x); first = false; }
  return r;
}
}  // namespace openuni_emu
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a + b; }, OPENUNI_EMU_HERE); }
inline int __reduce_add_sync(unsigned mask, int v, OPENUNI_EMU_SITE) { return (int)__reduce_add_sync(mask, (unsigned)v, OPENUNI_EMU_HERE); }
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a < b ? a : b; }, OPENUNI_EMU_HERE); }
inline int __reduce_min_sync(unsigned mask, int v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](int a, int b) { return a < b ? a : b; }, OPENUNI_EMU_HERE); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a > b ? a : b; }, OPENUNI_EMU_HERE); }
inline int __reduce_max_sync(unsigned mask, int v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](int a, int b) { return a > b ? a : b; }, OPENUNI_EMU_HERE); }
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a & b; }, OPENUNI_EMU_HERE); }
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a | b; }, OPENUNI_EMU_HERE); }
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, OPENUNI_EMU_SITE) { return openuni_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a ^ b; }, OPENUNI_EMU_HERE); }
template <class T> inline unsigned __match_any_sync(unsigned mask, T v, OPENUNI_EMU_SITE) {
  openuni_emu::lanes all = openuni_emu::exchange(mask, v, OPENUNI_EMU_HERE);
  unsigned m = mask & openuni_emu::existing_lanes(), r = 0;
  for (int j = 0; j < 32; j++)
    if (((m >> j) & 1u) && std::memcmp(all.lane(j), &v, sizeof(T)) == 0) r |= 1u << j;
  return r;
}

// ---- atomics: blocks run on several workers, so these are real atomic read-modify-writes ---------------
namespace openuni_emu {
template <class T, class F> inline T atomic_update(T* addr, F f) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "atomic size");
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  U* p = reinterpret_cast<U*>(addr);
  U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED), new_bits;
  T old_v;
  do {
    std::memcpy(&old_v, &old_bits, sizeof(T));
    T n = f(old_v);
    std::memcpy(&new_bits, &n, sizeof(T));
  } while (!__atomic_compare_exchange_n(p, &old_bits, new_bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old_v;
}
}  // namespace openuni_emu
#define OPENUNI_EMU_ATOMIC_INT(T)                                                                             \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }                      \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }                      \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }                    \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }                      \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }                        \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }                      \
  inline T atomicMin(T* a, T v) { return openuni_emu::atomic_update(a, [v](T o) { return o < v ? o : v; }); } \
  inline T atomicMax(T* a, T v) { return openuni_emu::atomic_update(a, [v](T o) { return o > v ? o : v; }); } \
  inline T atomicCAS(T* a, T cmp, T v) {                                                                    \
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);                     \
    return cmp;                                                                                             \
  }
OPENUNI_EMU_ATOMIC_INT(int)
OPENUNI_EMU_ATOMIC_INT(unsigned int)
OPENUNI_EMU_ATOMIC_INT(unsigned long long)
OPENUNI_EMU_ATOMIC_INT(long long)
#undef OPENUNI_EMU_ATOMIC_INT
inline unsigned short atomicCAS(unsigned short* a, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
inline unsigned atomicInc(unsigned* a, unsigned lim) { return openuni_emu::atomic_update(a, [lim](unsigned o) { return o >= lim ? 0u : o + 1u; }); }
inline unsigned atomicDec(unsigned* a, unsigned lim) { return openuni_emu::atomic_update(a, [lim](unsigned o) { return (o == 0u || o > lim) ? lim : o - 1u; }); }
inline float atomicAdd(float* a, float v) { return openuni_emu::atomic_update(a, [v](float o) { return o + v; }); }
inline double atomicAdd(double* a, double v) { return openuni_emu::atomic_update(a, [v](double o) { return o + v; }); }
inline float atomicExch(float* a, float v) { return openuni_emu::atomic_update(a, [v](float) { return v; }); }
inline float atomicMax(float* a, float v) { return openuni_emu::atomic_update(a, [v](float o) { return fmaxf(o, v); }); }
inline float atomicMin(float* a, float v) { return openuni_emu::atomic_update(a, [v](float o) { return fminf(o, v); }); }
inline __half atomicAdd(__half* a, __half v) { return openuni_emu::atomic_update(a, [v](__half o) { return __float2half(__half2float(o) + __half2float(v)); }); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) { return openuni_emu::atomic_update(a, [v](__nv_bfloat16 o) { return __float2bfloat16(__bfloat162float(o) + __bfloat162float(v)); }); }
inline __half2 atomicAdd(__half2* a, __half2 v) { return openuni_emu::atomic_update(a, [v](__half2 o) { return __hadd2(o, v); }); }
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* a, __nv_bfloat162 v) { return openuni_emu::atomic_update(a, [v](__nv_bfloat162 o) { return __hadd2(o, v); }); }
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch

// ---- loads/stores with cache hints are plain accesses ---------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
template <class T> inline size_t __cvta_generic_to_shared(const T* p) { return (size_t)p; }

// ---- float intrinsics (the host compiler does not contract FMAs: x86-64 baseline has none) -------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }
inline float __fmaf_sat(float a, float b, float c) { return __saturatef(fmaf(a, b, c)); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }
inline float sinpif(float x) { return sinf(x * 3.14159265358979323846f); }
inline float cospif(float x) { return cosf(x * 3.14159265358979323846f); }
inline void sincospif(float x, float* s, float* c) { *s = sinpif(x); *c = cospif(x); }
inline float __tanf(float x) { return tanf(x); }
// The hardware __expf is approximate (ex2.approx of x·log2 e, a few ulp); here it is exact.
inline float __expf(float x) { return expf(x); }
inline float erfinvf(float y) {
  // Newton iterations on erf from a closed-form start (Giles' approximation); device erfinvf is ~2 ulp.
  if (y <= -1.0f) return y == -1.0f ? -INFINITY : NAN;
  if (y >= 1.0f) return y == 1.0f ? INFINITY : NAN;
  double w = -log((1.0 - y) * (1.0 + y)), x;
  if (w < 5.0) { w -= 2.5; x = 2.81022636e-08; x = 3.43273939e-07 + x * w; x = -3.5233877e-06 + x * w; x = -4.39150654e-06 + x * w; x = 0.00021858087 + x * w; x = -0.00125372503 + x * w; x = -0.00417768164 + x * w; x = 0.246640727 + x * w; x = 1.50140941 + x * w; }
  else { w = sqrt(w) - 3.0; x = -0.000200214257; x = 0.000100950558 + x * w; x = 0.00134934322 + x * w; x = -0.00367342844 + x * w; x = 0.00573950773 + x * w; x = -0.0076224613 + x * w; x = 0.00943887047 + x * w; x = 1.00167406 + x * w; x = 2.83297682 + x * w; }
  x *= y;
  for (int i = 0; i < 2; i++) x -= (erf(x) - y) / (1.1283791670955126 * exp(-x * x));
  return (float)x;
}
// Float -> integer as the GPU's cvt does it: "the result is clamped to the destination range by
// default" (PTX ISA, cvt), and NaN gives 0 (NVIDIA's documented behaviour for cvt to integer as we
// read it; not yet checked on our H200). A C++ cast of an out-of-range or NaN value is undefined (x86
// gives INT_MIN). Plain casts in kernel code stay C++ casts here: our kernels clamp before casting.
// `r` is already rounded to an integral value (or NaN, or infinite).
namespace openuni_emu {
template <typename I, typename F>
inline I saturate_to(F r) {
  if (r != r) return 0;
  if (r <= (F)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
  if (r >= (F)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();  // max rounds up: exact at the edge
  return (I)r;
}
}  // namespace openuni_emu
inline int __float2int_rn(float x) { return openuni_emu::saturate_to<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return openuni_emu::saturate_to<int>(truncf(x)); }
inline int __float2int_rd(float x) { return openuni_emu::saturate_to<int>(floorf(x)); }
inline int __float2int_ru(float x) { return openuni_emu::saturate_to<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return openuni_emu::saturate_to<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return openuni_emu::saturate_to<unsigned>(truncf(x)); }
inline long long __float2ll_rn(float x) { return openuni_emu::saturate_to<long long>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __double2float_rn(double x) { return (float)x; }
inline int __double2int_rn(double x) { return openuni_emu::saturate_to<int>(nearbyint(x)); }
inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }

// ---- integer intrinsics ----------------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) { return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32)); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (((s >> (4 * i)) & 7u) * 8)) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) { unsigned long long v = ((unsigned long long)hi << 32) | lo; return (unsigned)((v << (s & 31)) >> 32); }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) { unsigned long long v = ((unsigned long long)hi << 32) | lo; return (unsigned)(v >> (s & 31)); }
inline int __mul24(int a, int b) { return (int)((long long)((a << 8) >> 8) * ((b << 8) >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) { return (unsigned long long)(((unsigned __int128)a * b) >> 64); }
inline unsigned __sad(int a, int b, unsigned c) { return (unsigned)(a > b ? a - b : b - a) + c; }
inline unsigned __usad(unsigned a, unsigned b, unsigned c) { return (a > b ? a - b : b - a) + c; }

// CUDA's global min/max overloads (the device math library has them for every integer and float type).
#define OPENUNI_EMU_MINMAX(A, B, R)                    \
  inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; } \
  inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
OPENUNI_EMU_MINMAX(int, int, int)
OPENUNI_EMU_MINMAX(unsigned, unsigned, unsigned)
OPENUNI_EMU_MINMAX(int, unsigned, unsigned)
OPENUNI_EMU_MINMAX(unsigned, int, unsigned)
OPENUNI_EMU_MINMAX(long, long, long)
OPENUNI_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
OPENUNI_EMU_MINMAX(long long, long long, long long)
OPENUNI_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
#undef OPENUNI_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// ---- half / bfloat16: what cuda_fp16.h / cuda_bf16.h only define for device code ------------------------
// Computed in f32 and rounded once, as the device's f32-based paths do.
#define OPENUNI_EMU_H1(T, TO_F, FROM_F)                                                                     \
  inline T __hfma(T a, T b, T c) { return FROM_F(fmaf(TO_F(a), TO_F(b), TO_F(c))); }                         \
  inline T __hfma_relu(T a, T b, T c) { float r = fmaf(TO_F(a), TO_F(b), TO_F(c)); return FROM_F(r > 0.f ? r : (r != r ? r : 0.f)); } \
  inline T __hfma_sat(T a, T b, T c) { return FROM_F(__saturatef(fmaf(TO_F(a), TO_F(b), TO_F(c)))); }       \
  inline T hexp(T a) { return FROM_F(expf(TO_F(a))); }                                                      \
  inline T hexp2(T a) { return FROM_F(exp2f(TO_F(a))); }                                                    \
  inline T hexp10(T a) { return FROM_F(exp10f(TO_F(a))); }                                                  \
  inline T hlog(T a) { return FROM_F(logf(TO_F(a))); }                                                      \
  inline T hlog2(T a) { return FROM_F(log2f(TO_F(a))); }                                                    \
  inline T hlog10(T a) { return FROM_F(log10f(TO_F(a))); }                                                  \
  inline T hsqrt(T a) { return FROM_F(sqrtf(TO_F(a))); }                                                    \
  inline T hrsqrt(T a) { return FROM_F(1.0f / sqrtf(TO_F(a))); }                                            \
  inline T hrcp(T a) { return FROM_F(1.0f / TO_F(a)); }                                                    \
  inline T hsin(T a) { return FROM_F(sinf(TO_F(a))); }                                                      \
  inline T hcos(T a) { return FROM_F(cosf(TO_F(a))); }                                                      \
  inline T htanh(T a) { return FROM_F(tanhf(TO_F(a))); }                                                    \
  inline T htanh_approx(T a) { return FROM_F(tanhf(TO_F(a))); }                                             \
  inline T hfloor(T a) { return FROM_F(floorf(TO_F(a))); }                                                  \
  inline T hceil(T a) { return FROM_F(ceilf(TO_F(a))); }                                                    \
  inline T htrunc(T a) { return FROM_F(truncf(TO_F(a))); }                                                  \
  inline T hrint(T a) { return FROM_F(nearbyintf(TO_F(a))); }
#define OPENUNI_EMU_H2(T2, T, LO, HI, MAKE)                                                                 \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return MAKE(__hfma(LO(a), LO(b), LO(c)), __hfma(HI(a), HI(b), HI(c))); } \
  inline T2 __hfma2_relu(T2 a, T2 b, T2 c) { return MAKE(__hfma_relu(LO(a), LO(b), LO(c)), __hfma_relu(HI(a), HI(b), HI(c))); } \
  inline T2 h2exp(T2 a) { return MAKE(hexp(LO(a)), hexp(HI(a))); }                                          \
  inline T2 h2exp2(T2 a) { return MAKE(hexp2(LO(a)), hexp2(HI(a))); }                                       \
  inline T2 h2exp10(T2 a) { return MAKE(hexp10(LO(a)), hexp10(HI(a))); }                                    \
  inline T2 h2log(T2 a) { return MAKE(hlog(LO(a)), hlog(HI(a))); }                                          \
  inline T2 h2log2(T2 a) { return MAKE(hlog2(LO(a)), hlog2(HI(a))); }                                       \
  inline T2 h2log10(T2 a) { return MAKE(hlog10(LO(a)), hlog10(HI(a))); }                                    \
  inline T2 h2sqrt(T2 a) { return MAKE(hsqrt(LO(a)), hsqrt(HI(a))); }                                       \
  inline T2 h2rsqrt(T2 a) { return MAKE(hrsqrt(LO(a)), hrsqrt(HI(a))); }                                    \
  inline T2 h2rcp(T2 a) { return MAKE(hrcp(LO(a)), hrcp(HI(a))); }                                          \
  inline T2 h2sin(T2 a) { return MAKE(hsin(LO(a)), hsin(HI(a))); }                                          \
  inline T2 h2cos(T2 a) { return MAKE(hcos(LO(a)), hcos(HI(a))); }                                          \
  inline T2 h2tanh(T2 a) { return MAKE(htanh(LO(a)), htanh(HI(a))); }                                       \
  inline T2 h2floor(T2 a) { return MAKE(hfloor(LO(a)), hfloor(HI(a))); }                                    \
  inline T2 h2ceil(T2 a) { return MAKE(hceil(LO(a)), hceil(HI(a))); }                                       \
  inline T2 h2trunc(T2 a) { return MAKE(htrunc(LO(a)), htrunc(HI(a))); }                                    \
  inline T2 h2rint(T2 a) { return MAKE(hrint(LO(a)), hrint(HI(a))); }
OPENUNI_EMU_H1(__nv_bfloat16, __bfloat162float, __float2bfloat16)
OPENUNI_EMU_H1(__half, __half2float, __float2half)
OPENUNI_EMU_H2(__nv_bfloat162, __nv_bfloat16, __low2bfloat16, __high2bfloat16, __halves2bfloat162)
OPENUNI_EMU_H2(__half2, __half, __low2half, __high2half, __halves2half2)
#undef OPENUNI_EMU_H1
#undef OPENUNI_EMU_H2
inline int __bfloat162int_rn(__nv_bfloat16 a) { return (int)nearbyintf(__bfloat162float(a)); }
inline int __half2int_rn(__half a) { return (int)nearbyintf(__half2float(a)); }

// ---- odds and ends ---------------------------------------------------------------------------------------
inline void __prof_trigger(int) {}

// ---- sm_90 support: what kernels/include/{wgmma,mbarrier,tma}.cuh build their CPU twins on ------------
namespace openuni_emu {
inline uint32_t linear_tid() {
  const openuni_emu_thread* t = openuni_emu_cur;
  return t->tid[0] + t->bdim[0] * (t->tid[1] + t->bdim[1] * t->tid[2]);
}
inline uint32_t block_threads() {
  const openuni_emu_thread* t = openuni_emu_cur;
  return t->bdim[0] * t->bdim[1] * t->bdim[2];
}
// The shared-memory window address (what `cvta.to.shared` gives on a GPU) of a pointer into dynamic shared
// memory: its offset from the start of the block's dynamic shared memory. Static `__shared__` arrays live in
// thread-local storage here and have no window address: descriptors and TMA destinations must point into
// `extern __shared__` memory. Fails the launch (715) for any other pointer.
inline uint32_t smem_window_addr(const void* p, const char* what, const char* file, int line) {
  size_t off = (size_t)((const unsigned char*)p - openuni_emu_dyn_smem_ptr());
  if ((const unsigned char*)p < openuni_emu_dyn_smem_ptr() || off >= openuni_emu_dyn_smem_size) {
    char msg[256];
    snprintf(msg, sizeof msg,
             "%s: %p is not in the block's dynamic shared memory (%u bytes; the emulator gives window addresses "
             "only to extern __shared__ memory)", what, p, openuni_emu_dyn_smem_size);
    openuni_emu_fail(715, msg, file, line);
  }
  return (uint32_t)off;
}
// Checks that [addr, addr + n) lies in the block's dynamic shared memory; returns the host pointer.
inline unsigned char* smem_window_ptr(uint32_t addr, uint32_t n, const char* what, const char* file, int line) {
  if ((uint64_t)addr + n > openuni_emu_dyn_smem_size) {
    char msg[256];
    snprintf(msg, sizeof msg, "%s: shared address 0x%x + %u bytes is outside the block's %u bytes of dynamic shared memory",
             what, addr, n, openuni_emu_dyn_smem_size);
    openuni_emu_fail(715, msg, file, line);
  }
  return openuni_emu_dyn_smem_ptr() + addr;
}
// Spin-waits on emulated hardware state (warpgroup rendezvous, mbarrier phases) yield to the block's other
// threads; one that sees the watched state unchanged for OPENUNI_EMU_HANG_MS (default 5000) ms of wall time
// and 10000 spins is a hang, reported as CUDA_ERROR_LAUNCH_FAILED (719) instead of spinning forever.
inline uint64_t hang_limit_ns() {
  static const uint64_t ms = [] {
    const char* e = getenv("OPENUNI_EMU_HANG_MS");
    return e && *e ? strtoull(e, nullptr, 10) : 5000ull;
  }();
  return ms * 1000000ull;
}
inline uint64_t now_ns() {
  timeval tv;  // <time.h> would clash with the device clock() below
  gettimeofday(&tv, nullptr);
  return (uint64_t)tv.tv_sec * 1000000000ull + (uint64_t)tv.tv_usec * 1000ull;
}
struct hang_guard {
  uint64_t watched;
  uint64_t since = 0;
  unsigned spins = 0;
  explicit hang_guard(uint64_t w) : watched(w) {}
  // Call once per spin with the watched state's current value; true once it has not changed for too long.
  bool stuck(uint64_t now_watched) {
    if (now_watched != watched) { watched = now_watched; since = 0; spins = 0; return false; }
    if (++spins < 64) return false;
    uint64_t t = now_ns();
    if (since == 0) since = t;
    // Both many spins and the wall time: one long preemption of the worker is not a hang.
    return spins > 10000 && t - since > hang_limit_ns();
  }
};
// Warpgroup rendezvous (4 consecutive warps, threads 128w..128w+127 of the block): every thread of the
// warpgroup must arrive at the same kind of instruction (`what`); the last one releases the others.
struct warpgroup_rv {
  uint64_t serial;
  uint32_t arrived;
  uint32_t generation;
  const char* what;
  const char* file;
  int line;
};
inline warpgroup_rv* warpgroup_state() {
  static __thread warpgroup_rv table[8];
  warpgroup_rv* g = &table[linear_tid() / 128u];
  if (g->serial != openuni_emu_block_serial) *g = warpgroup_rv{openuni_emu_block_serial, 0, 0, nullptr, nullptr, 0};
  return g;
}
inline void warpgroup_sync(const char* what, const char* file, int line) {
  uint32_t wg = linear_tid() / 128u, n = block_threads();
  if (n < 128u * (wg + 1)) {
    char msg[200];
    snprintf(msg, sizeof msg, "%s: warpgroup %u is incomplete (block of %u threads): a warpgroup is 128 threads", what, wg, n);
    openuni_emu_fail(719, msg, file, line);
  }
  warpgroup_rv* g = warpgroup_state();
  if (g->arrived == 0) {
    g->what = what;
    g->file = file;
    g->line = line;
  } else if (strcmp(g->what, what) != 0) {
    char msg[300];
    snprintf(msg, sizeof msg, "warpgroup %u diverged: this thread is at %s while others wait at %s (%s:%d)", wg, what,
             g->what, g->file, g->line);
    openuni_emu_fail(719, msg, file, line);
  }
  uint32_t gen = g->generation;
  if (++g->arrived == 128u) {
    g->arrived = 0;
    g->generation++;
    return;
  }
  hang_guard guard(g->arrived);
  while (g->generation == gen) {
    openuni_emu_hooks_table.yield_now(openuni_emu_cur);
    if (g->generation != gen) break;
    if (guard.stuck(g->arrived)) {
      char msg[300];
      snprintf(msg, sizeof msg,
               "%s: warpgroup %u never completed its rendezvous (%u of 128 threads arrived; the others exited or wait "
               "elsewhere)", what, wg, g->arrived);
      openuni_emu_fail(719, msg, file, line);
    }
  }
}
// Asynchronous-proxy operations that complete on an mbarrier (TMA loads): queued at issue, carried out by
// the first try_wait on their barrier (in issue order), so that nothing lands before a wait could see it.
struct async_op {
  const void* bar;
  void (*complete)(const unsigned char* ctx);
  alignas(64) unsigned char ctx[192];
};
struct async_queue {
  uint64_t serial;
  int count;
  async_op ops[256];
};
inline async_queue* async_ops() {
  static __thread async_queue* q = nullptr;
  if (!q) q = static_cast<async_queue*>(calloc(1, sizeof(async_queue)));
  if (q->serial != openuni_emu_block_serial) {
    q->serial = openuni_emu_block_serial;
    q->count = 0;
  }
  return q;
}
inline void async_push(const void* bar, void (*complete)(const unsigned char*), const void* ctx, size_t n,
                       const char* file, int line) {
  async_queue* q = async_ops();
  if (q->count == 256 || n > sizeof q->ops[0].ctx)
    openuni_emu_fail(719, "more than 256 asynchronous copies pending on mbarriers in one block", file, line);
  async_op& op = q->ops[q->count++];
  op.bar = bar;
  op.complete = complete;
  std::memcpy(op.ctx, ctx, n);
}
inline void async_flush(const void* bar) {
  async_queue* q = async_ops();
  int kept = 0;
  for (int i = 0; i < q->count; ++i) {
    if (q->ops[i].bar == bar) {
      async_op op = q->ops[i];
      op.complete(op.ctx);
    } else {
      if (kept != i) q->ops[kept] = q->ops[i];
      kept++;
    }
  }
  q->count = kept;
}
}  // namespace openuni_emu

// ---- kernel registration (build.rs appends one descriptor per extern "C" __global__ function) ----------
namespace openuni_emu {
template <class... A> struct param_info {
  static constexpr uint32_t sizes[sizeof...(A) + 1] = {(uint32_t)sizeof(A)..., 0u};
  static constexpr uint32_t aligns[sizeof...(A) + 1] = {(uint32_t)alignof(A)..., 0u};
};
template <class... A> constexpr size_t arity(void (*)(A...)) { return sizeof...(A); }
// kernelParams[i] points at argument i's value, exactly as cuLaunchKernel receives it.
template <class... A, size_t... I> inline void invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
  f(*static_cast<A*>(p[I])...);
}
template <auto F> void launch_tramp(void** p) { invoke(F, p, std::make_index_sequence<arity(F)>{}); }
template <class... A>
constexpr openuni_emu_kernel_desc make_desc(void (*)(A...), const char* name, void (*tramp)(void**)) {
  return openuni_emu_kernel_desc{name, (uint32_t)sizeof...(A), param_info<A...>::sizes, param_info<A...>::aligns, tramp};
}
}  // namespace openuni_emu

#endif  // OPENUNI_EMU_H
