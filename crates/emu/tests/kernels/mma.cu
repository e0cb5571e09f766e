// Tensor-core helpers (kernels/include/mma.cuh) on one warp: tests/mma.rs compares with a naive matmul.
#include <cuda_bf16.h>
#include "mma.cuh"

// Each lane writes the registers it received from ldmatrix x1/x2/x4 (plain and .trans) of a 32x8 bf16
// matrix M stored row-major in shared memory (matrix i = rows 8i..8i+7).
extern "C" __global__ void emu_test_ldmatrix(const __nv_bfloat16* m, unsigned* out) {
  __shared__ __align__(16) __nv_bfloat16 sm[32 * 8];
  int lane = threadIdx.x;
  for (int i = lane; i < 32 * 8; i += 32) sm[i] = m[i];
  __syncwarp();
  const void* row = &sm[lane * 8];
  unsigned r1, r2[2], r4[4], t1, t2[2], t4[4];
  ou::ldmatrix_x1(r1, row);
  ou::ldmatrix_x2(r2, row);
  ou::ldmatrix_x4(r4, row);
  ou::ldmatrix_x1_trans(t1, row);
  ou::ldmatrix_x2_trans(t2, row);
  ou::ldmatrix_x4_trans(t4, row);
  unsigned* o = out + lane * 14;
  o[0] = r1; o[1] = r2[0]; o[2] = r2[1];
  for (int i = 0; i < 4; i++) o[3 + i] = r4[i];
  o[7] = t1; o[8] = t2[0]; o[9] = t2[1];
  for (int i = 0; i < 4; i++) o[10 + i] = t4[i];
}

// D (16x8, f32, row-major) = A (16xK bf16 row-major) * B (Kx8 bf16 row-major), K a multiple of 16, one
// warp. A fragments by ldmatrix_x4, B fragments by ldmatrix_x2_trans; when `bt` is non-null, B is also
// given transposed (8xK row-major, i.e. column-major B) and loaded with plain ldmatrix_x2 into D2.
template <bool WRONG_FRAGMENT>
__device__ void mma_gemm(const __nv_bfloat16* A, const __nv_bfloat16* B, const __nv_bfloat16* Bt, float* D, float* D2, int K) {
  __shared__ __align__(16) __nv_bfloat16 As[16 * 16];
  __shared__ __align__(16) __nv_bfloat16 Bs[16 * 8];
  __shared__ __align__(16) __nv_bfloat16 Bts[8 * 16];
  int lane = threadIdx.x;
  float acc[4] = {0, 0, 0, 0}, acc2[4] = {0, 0, 0, 0};
  for (int k0 = 0; k0 < K; k0 += 16) {
    for (int i = lane; i < 256; i += 32) As[i] = A[(i / 16) * K + k0 + i % 16];
    for (int i = lane; i < 128; i += 32) Bs[i] = B[(k0 + i / 8) * 8 + i % 8];
    for (int i = lane; i < 128; i += 32) Bts[i] = Bt[(i / 16) * K + k0 + i % 16];
    __syncwarp();
    unsigned a[4], b[2], b2[2];
    // Matrix m = lane / 8: rows (m & 1) * 8 .., columns (m >> 1) * 8 .. of the A tile.
    ou::ldmatrix_x4(a, &As[(((lane >> 3) & 1) * 8 + (lane & 7)) * 16 + (lane >> 4) * 8]);
    ou::ldmatrix_x2_trans(b, &Bs[(lane & 15) * 8]);
    ou::ldmatrix_x2(b2, &Bts[(lane & 7) * 16 + ((lane >> 3) & 1) * 8]);
    if (WRONG_FRAGMENT) {
      // BUG: a[1] and a[2] swapped (rows 8-15 / k 8-15 mixed up).
      unsigned t = a[1]; a[1] = a[2]; a[2] = t;
    }
    ou::mma_m16n8k16_bf16_f32(acc, a, b, acc);
    ou::mma_m16n8k16_bf16_f32(acc2, a, b2, acc2);
    __syncwarp();
  }
  int g = lane >> 2, tq = lane & 3;
  for (int i = 0; i < 4; i++) {
    int row = g + (i >= 2 ? 8 : 0), col = 2 * tq + (i & 1);
    D[row * 8 + col] = acc[i];
    D2[row * 8 + col] = acc2[i];
  }
}

extern "C" __global__ void emu_test_mma_gemm(const __nv_bfloat16* A, const __nv_bfloat16* B, const __nv_bfloat16* Bt, float* D, float* D2, int K) {
  mma_gemm<false>(A, B, Bt, D, D2, K);
}

// BUG (tests/mma.rs shows it is caught): a wrong fragment register index.
extern "C" __global__ void emu_test_mma_wrong_fragment(const __nv_bfloat16* A, const __nv_bfloat16* B, const __nv_bfloat16* Bt, float* D, float* D2, int K) {
  mma_gemm<true>(A, B, Bt, D, D2, K);
}
