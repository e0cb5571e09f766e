// tma.cuh: tensor-memory-accelerator loads (sm_90 `cp.async.bulk.tensor`, tiled mode) with a CPU twin for
// the emulated GPU (crates/emu). Facts from the PTX ISA ("cp.async.bulk.tensor", "Tensor Map") and the
// driver API (cuTensorMapEncodeTiled); docs/hopper.md says them in full.
//
//   TensorMap                  the 128-byte CUtensorMap the host encodes with cuTensorMapEncodeTiled; pass it
//                              to the kernel by value as `const __grid_constant__ ou::TensorMap`.
//   tma_load_2d/3d/4d(dst, map, bar, c0, c1, ...)   one box of the tensor, starting at element coordinates
//                              (c0 innermost; signed: a box may hang over any edge) -> shared memory at dst
//                              (128-byte aligned), `mbarrier::complete_tx::bytes` on bar with the box's size.
//                              Elements outside the tensor are zero (NaN with OOB fill NAN_REQUEST_ZERO_FMA)
//                              and count towards the bytes. Issued by one thread.
//   tma_prefetch_map(map)      `prefetch.tensormap` (nothing on the emulated GPU).
// In shared memory the box is dense, innermost dimension first (rows of boxDim[0] * element bytes), with
// the map's swizzle applied to the shared address (sm90.cuh): a 128B-swizzled box of 64 bf16 x R rows is
// exactly a K-major 128B wgmma operand with SBO = 1024.
//
// The CPU twin fills the destination with 0xFF (NaN) at issue and copies the box, then lowers the barrier's
// transaction count, at the first try_wait on that barrier: data read before the wait is NaN, and a load
// into a stage that other threads still read clobbers them.
#pragma once

#include "mbarrier.cuh"
#include "sm90.cuh"

#if defined(__CUDA_ARCH__)
#define OU_TMA_SITE
#elif defined(OPENUNI_EMU)
#define OU_TMA_SITE , OPENUNI_EMU_SITE
#define OU_TMA_HERE openuni_emu_file, openuni_emu_line
#else
#error "tma.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

#if !defined(__CUDA_ARCH__)
namespace tma_emu {
struct Load {
  openuni_emu_tensor_map map;
  unsigned long long* bar;
  unsigned dst;  // shared window address
  int c[5];
};
// CUtensorMapSwizzle (0 none, 1 32B, 2 64B, 3 128B) -> the wgmma encoding of sm90.cuh.
inline Swizzle swizzle_of(const openuni_emu_tensor_map& m) {
  return m.swizzle == 1 ? Swizzle::b32 : m.swizzle == 2 ? Swizzle::b64 : m.swizzle == 3 ? Swizzle::b128 : Swizzle::none;
}
inline unsigned box_bytes(const openuni_emu_tensor_map& m) {
  unsigned n = m.elem_bytes;
  for (int i = 0; i < m.rank; ++i) n *= m.box[i];
  return n;
}
inline void complete(const unsigned char* ctx) {
  Load l;
  std::memcpy(&l, ctx, sizeof l);
  const openuni_emu_tensor_map& m = l.map;
  const Swizzle sw = swizzle_of(m);
  const unsigned row_bytes = m.box[0] * m.elem_bytes, rows = box_bytes(m) / row_bytes;
  unsigned char* smem = openuni_emu_dyn_smem_ptr();
  for (unsigned r = 0; r < rows; ++r) {
    // Coordinates of this row's first element; the row is in bounds in dims 1.. or entirely out.
    long long idx[5] = {0, 0, 0, 0, 0};
    unsigned rr = r;
    bool inside = true;
    for (int d = 1; d < m.rank; ++d) {
      idx[d] = (long long)l.c[d] + rr % m.box[d];
      rr /= m.box[d];
      inside &= idx[d] >= 0 && idx[d] < (long long)m.dims[d];
    }
    for (unsigned i = 0; i < m.box[0]; ++i) {
      const long long x = (long long)l.c[0] + i;
      unsigned char* out = smem + swizzle_addr(l.dst + r * row_bytes + i * m.elem_bytes, sw);
      if (inside && x >= 0 && x < (long long)m.dims[0]) {
        unsigned long long g = m.global_address + (unsigned long long)x * m.elem_bytes;
        for (int d = 1; d < m.rank; ++d) g += (unsigned long long)idx[d] * m.strides[d];
        std::memcpy(out, reinterpret_cast<const void*>(g), m.elem_bytes);
      } else if (m.oob_nan) {
        const unsigned long long nan = m.elem_bytes == 2 ? 0x7FFFull : m.elem_bytes == 4 ? 0x7FFFFFFFull : 0x7FFFFFFFFFFFFFFFull;
        std::memcpy(out, &nan, m.elem_bytes);
      } else {
        std::memset(out, 0, m.elem_bytes);
      }
    }
  }
  mbarrier_emu::update(l.bar, -(int)box_bytes(m), 0, "cp.async.bulk.tensor (complete_tx)", __FILE__, __LINE__);
}
template <int RANK>
inline void issue(void* dst, const TensorMap& tmap, unsigned long long* bar, const int (&c)[RANK], const char* file,
                  int line) {
  Load l{};
  std::memcpy(&l.map, &tmap, sizeof l.map);
  const openuni_emu_tensor_map& m = l.map;
  char msg[200];
  if (m.magic != OPENUNI_EMU_TMAP_MAGIC) openuni_emu_fail(715, "cp.async.bulk.tensor: the tensor map was not made by cuTensorMapEncodeTiled", file, line);
  if (m.rank != RANK) {
    snprintf(msg, sizeof msg, "cp.async.bulk.tensor.%dd on a tensor map of rank %d", RANK, m.rank);
    openuni_emu_fail(715, msg, file, line);
  }
  l.dst = openuni_emu::smem_window_addr(dst, "cp.async.bulk.tensor destination", file, line);
  if (l.dst % 128u) openuni_emu_fail(716, "cp.async.bulk.tensor: shared-memory destination is not 128-byte aligned", file, line);
  const unsigned n = box_bytes(m);
  openuni_emu::smem_window_ptr(l.dst, (n + 127u) & ~127u, "cp.async.bulk.tensor destination", file, line);  // bounds
  // The swizzle moves 16-byte chunks within 128-byte lines: poison exactly the bytes the copy will write.
  for (unsigned o = 0; o < n; o += 16) std::memset(openuni_emu_dyn_smem_ptr() + swizzle_addr(l.dst + o, swizzle_of(m)), 0xFF, 16);
  mbarrier_emu::load(bar, "cp.async.bulk.tensor", file, line);
  l.bar = bar;
  for (int i = 0; i < RANK; ++i) l.c[i] = c[i];
  openuni_emu::async_push(bar, &complete, &l, sizeof l, file, line);
}
}  // namespace tma_emu
#endif

#if defined(__CUDA_ARCH__)
#define OU_TMA_PTX(D, COORDS, ...)                                                                             \
  asm volatile("cp.async.bulk.tensor." #D "d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {" COORDS \
               "}], [%2];\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(dst))),                      \
               "l"(reinterpret_cast<unsigned long long>(&map)),                                               \
               "r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))), __VA_ARGS__ : "memory")
#endif

__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap& map, unsigned long long* bar, int c0,
                                            int c1 OU_TMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_TMA_PTX(2, "%3, %4", "r"(c0), "r"(c1));
#else
  tma_emu::issue<2>(dst, map, bar, {c0, c1}, OU_TMA_HERE);
#endif
}
__device__ __forceinline__ void tma_load_3d(void* dst, const TensorMap& map, unsigned long long* bar, int c0, int c1,
                                            int c2 OU_TMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_TMA_PTX(3, "%3, %4, %5", "r"(c0), "r"(c1), "r"(c2));
#else
  tma_emu::issue<3>(dst, map, bar, {c0, c1, c2}, OU_TMA_HERE);
#endif
}
__device__ __forceinline__ void tma_load_4d(void* dst, const TensorMap& map, unsigned long long* bar, int c0, int c1,
                                            int c2, int c3 OU_TMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_TMA_PTX(4, "%3, %4, %5, %6", "r"(c0), "r"(c1), "r"(c2), "r"(c3));
#else
  tma_emu::issue<4>(dst, map, bar, {c0, c1, c2, c3}, OU_TMA_HERE);
#endif
}

__device__ __forceinline__ void tma_prefetch_map(const TensorMap& map) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
#else
  (void)map;
#endif
}

}  // namespace ou

#undef OU_TMA_SITE
#undef OU_TMA_HERE
#if defined(__CUDA_ARCH__)
#undef OU_TMA_PTX
#endif
