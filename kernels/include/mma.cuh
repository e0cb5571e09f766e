// mma.cuh: tensor-core helpers for kernels (mma.sync m16n8k16 bf16 -> f32, ldmatrix x1/x2/x4 [.trans]).
//
// Inline PTX lives only here, each helper with a CPU twin for the emulated GPU (crates/emu), written from
// the fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type",
// "Warp-level matrix load instruction: ldmatrix"). On the CPU every lane deposits its fragment registers
// (or its row address) in the warp exchange, the warp meets, and each lane computes its own part.
// All 32 lanes of the warp must call these together (the .aligned / .sync forms require it).
//
// Fragment layouts (lane = 4 * groupID + tq, groupID = lane / 4, tq = lane % 4; each .b32 register holds
// two bf16, the lower-indexed element in the low half):
//   A (16x16, row-major):  a[0] = A[g][2tq..2tq+1]      a[1] = A[g+8][2tq..2tq+1]
//                          a[2] = A[g][2tq+8..2tq+9]    a[3] = A[g+8][2tq+8..2tq+9]
//   B (16x8,  "col"):      b[0] = B[2tq..2tq+1][g]      b[1] = B[2tq+8..2tq+9][g]
//   C, D (16x8 f32):       c[0], c[1] = C[g][2tq], C[g][2tq+1];  c[2], c[3] = C[g+8][2tq], C[g+8][2tq+1]
// ldmatrix loads 1, 2 or 4 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of
// matrix i (16-byte aligned). Register i of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i;
// with .trans it receives column l/4, rows 2(l%4), 2(l%4)+1 instead.
// A file that defines OU_LDMATRIX_BANK_CHECK before including this header gets, on the emulated GPU,
// a failed launch for every ldmatrix whose matrix rows conflict in shared-memory banks.
#pragma once

#include <cuda_bf16.h>

#if defined(__CUDA_ARCH__)
#define OU_MMA_SITE
#define OU_MMA_HERE
#elif defined(OPENUNI_EMU)
// On the emulated GPU the call site (for deadlock and error reports) rides along as default arguments.
#define OU_MMA_SITE , OPENUNI_EMU_SITE
#define OU_MMA_HERE openuni_emu_file, openuni_emu_line
#else
#error "mma.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

#if !defined(__CUDA_ARCH__)
namespace mma_emu {
// bf16 element k (0: low half, 1: high half) of a packed register, as f32.
__device__ __forceinline__ float bf16_half(unsigned r, int k) {
  return __uint_as_float(k & 1 ? (r & 0xffff0000u) : (r << 16));
}
struct MmaIn {
  unsigned a[4];
  unsigned b[2];
};
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(unsigned* r, const void* row, const char* file, int line) {
  int lane = (int)openuni_emu::lane_id();
  if (lane < 8 * N && (reinterpret_cast<size_t>(row) & 15u) != 0)
    openuni_emu_fail(716, "ldmatrix: row address is not 16-byte aligned", file, line);
  openuni_emu::lanes all = openuni_emu::exchange(0xffffffffu, row, file, line);
#if defined(OU_LDMATRIX_BANK_CHECK)
  // Shared memory has 32 banks of 4 bytes: the 8 16-byte rows of one matrix are read without a
  // conflict when they lie in 8 distinct 16-byte bank groups, (address / 16) mod 8. Addresses in
  // dynamic shared memory count from its start (its offset on a GPU), others as they are.
  for (int m = 0; m < N; ++m) {
    unsigned seen = 0;
    for (int r = 0; r < 8; ++r) {
      const unsigned char* p = static_cast<const unsigned char*>(all.get<const void*>(m * 8 + r));
      const unsigned char* base = openuni_emu_dyn_smem_ptr();
      const size_t off = p >= base && p < base + openuni_emu_dyn_smem_size ? (size_t)(p - base) : (size_t)p;
      const unsigned unit = 1u << ((off >> 4) & 7);
      if (seen & unit)
        openuni_emu_fail(719, "ldmatrix: two rows of one 8x8 matrix fall in the same shared-memory bank group "
                              "(a bank conflict; OU_LDMATRIX_BANK_CHECK)", file, line);
      seen |= unit;
    }
  }
#endif
  for (int m = 0; m < N; ++m) {
    unsigned lo, hi;
    if (!TRANS) {
      const unsigned short* p = static_cast<const unsigned short*>(all.get<const void*>(m * 8 + lane / 4));
      lo = p[2 * (lane % 4)];
      hi = p[2 * (lane % 4) + 1];
    } else {
      const unsigned short* p0 = static_cast<const unsigned short*>(all.get<const void*>(m * 8 + 2 * (lane % 4)));
      const unsigned short* p1 = static_cast<const unsigned short*>(all.get<const void*>(m * 8 + 2 * (lane % 4) + 1));
      lo = p0[lane / 4];
      hi = p1[lane / 4];
    }
    r[m] = lo | (hi << 16);
  }
}
}  // namespace mma_emu
#endif

// D = A * B + C for one warp: A 16x16 bf16 (row), B 16x8 bf16 (col), C and D 16x8 f32. d may alias c.
__device__ __forceinline__ void mma_m16n8k16_bf16_f32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                      const float (&c)[4] OU_MMA_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  mma_emu::MmaIn mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  openuni_emu::lanes all = openuni_emu::exchange(0xffffffffu, mine, OU_MMA_HERE);
  int lane = (int)openuni_emu::lane_id(), g = lane >> 2, tq = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    int row = g + (i >= 2 ? 8 : 0), col = 2 * tq + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      // A[row][k] is in lane (row % 8) * 4 + (k % 8) / 2, register row / 8 + 2 * (k / 8);
      // B[k][col] is in lane col * 4 + (k % 8) / 2, register k / 8.
      mma_emu::MmaIn la = all.get<mma_emu::MmaIn>((row & 7) * 4 + ((k & 7) >> 1));
      mma_emu::MmaIn lb = all.get<mma_emu::MmaIn>(col * 4 + ((k & 7) >> 1));
      acc += mma_emu::bf16_half(la.a[(row >> 3) + 2 * (k >> 3)], k) * mma_emu::bf16_half(lb.b[k >> 3], k);
    }
    out[i] = acc;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
#endif
}

#if defined(__CUDA_ARCH__)
#define OU_LDMATRIX_PTX(N, TRANS, ...)                                                                    \
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));                                     \
  asm volatile("ldmatrix.sync.aligned.m8n8.x" #N TRANS ".shared.b16 " __VA_ARGS__);
#endif

// One 8x8 b16 matrix: lanes 0-7 give its row addresses (shared memory, 16-byte aligned).
__device__ __forceinline__ void ldmatrix_x1(unsigned& r, const void* row OU_MMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_LDMATRIX_PTX(1, "", "{%0}, [%1];\n" : "=r"(r) : "r"(s))
#else
  mma_emu::ldmatrix<1, false>(&r, row, OU_MMA_HERE);
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(unsigned& r, const void* row OU_MMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_LDMATRIX_PTX(1, ".trans", "{%0}, [%1];\n" : "=r"(r) : "r"(s))
#else
  mma_emu::ldmatrix<1, true>(&r, row, OU_MMA_HERE);
#endif
}
// Two matrices: lanes 0-15 give the row addresses.
__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* row OU_MMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_LDMATRIX_PTX(2, "", "{%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s))
#else
  mma_emu::ldmatrix<2, false>(r, row, OU_MMA_HERE);
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned (&r)[2], const void* row OU_MMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_LDMATRIX_PTX(2, ".trans", "{%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s))
#else
  mma_emu::ldmatrix<2, true>(r, row, OU_MMA_HERE);
#endif
}
// Four matrices: lanes 0-31 give the row addresses.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row OU_MMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_LDMATRIX_PTX(4, "", "{%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s))
#else
  mma_emu::ldmatrix<4, false>(r, row, OU_MMA_HERE);
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row OU_MMA_SITE) {
#if defined(__CUDA_ARCH__)
  OU_LDMATRIX_PTX(4, ".trans", "{%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s))
#else
  mma_emu::ldmatrix<4, true>(r, row, OU_MMA_HERE);
#endif
}

}  // namespace ou

#undef OU_MMA_SITE
#undef OU_MMA_HERE
#if defined(__CUDA_ARCH__)
#undef OU_LDMATRIX_PTX
#endif
