// ldmatrix's shared-memory bank check (OU_LDMATRIX_BANK_CHECK, kernels/include/mma.cuh), which
// kernels/conv.cu turns on: tests/mma.rs launches this with row strides that do and do not conflict.
#include <cuda_bf16.h>
#define OU_LDMATRIX_BANK_CHECK 1
#include "mma.cuh"

__device__ __forceinline__ unsigned char* banks_smem() {
  extern __shared__ __align__(128) unsigned char emu_test_banks_smem[];
  return emu_test_banks_smem;
}

// One ldmatrix.x4 whose matrix i has rows at i * 8 * stride + r * stride (r = 0..7) bytes into dynamic
// shared memory (zeroed first); writes each lane's 4 registers to out.
extern "C" __global__ void emu_test_ldmatrix_banks(int stride, unsigned* out) {
  unsigned char* sm = banks_smem();
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * stride; i += 32) sm[i] = 0;
  __syncwarp();
  unsigned r[4];
  ou::ldmatrix_x4(r, sm + (lane / 8) * 8 * stride + (lane % 8) * stride);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}
