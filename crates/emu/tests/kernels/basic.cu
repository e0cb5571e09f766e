// Kernels that exercise the emulated GPU's built-ins (tests/kernels.rs). Also compiled by NVRTC in the
// end-to-end test, so this is plain CUDA.
#include <cuda_bf16.h>

extern "C" __global__ void emu_test_saxpy(float* y, const float* x, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}

// Sum of each block's slice through static shared memory and a tree of barriers.
extern "C" __global__ void emu_test_block_sum(const float* x, float* out, int n) {
  __shared__ float buf[256];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

// Warp reductions with shuffles; one float per warp, plus ballot/any/all results.
extern "C" __global__ void emu_test_warp(const float* x, float* sums, unsigned* votes, float* bcast, float* up, float* down) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int lane = threadIdx.x & 31;
  float v = x[i];
  float s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) sums[i / 32] = s;
  unsigned b = __ballot_sync(0xffffffffu, v > 0.0f);
  int any = __any_sync(0xffffffffu, v > 100.0f);
  int all = __all_sync(0xffffffffu, v > -1000.0f);
  if (lane == 0) {
    votes[(i / 32) * 3 + 0] = b;
    votes[(i / 32) * 3 + 1] = any;
    votes[(i / 32) * 3 + 2] = all;
  }
  bcast[i] = __shfl_sync(0xffffffffu, v, 3);
  up[i] = __shfl_up_sync(0xffffffffu, v, 1);
  down[i] = __shfl_down_sync(0xffffffffu, v, 2, 16);
}

// Dynamic shared memory: reverse each block's slice.
extern "C" __global__ void emu_test_dyn_reverse(const float* x, float* y) {
  extern __shared__ float sm[];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  sm[threadIdx.x] = x[i];
  __syncthreads();
  y[i] = sm[blockDim.x - 1 - threadIdx.x];
}

// Atomics across blocks (which run on several workers).
extern "C" __global__ void emu_test_atomics(int* counter, float* fsum, unsigned* maxv) {
  atomicAdd(counter, 1);
  atomicAdd(fsum, 1.0f);
  atomicMax(maxv, blockIdx.x * blockDim.x + threadIdx.x);
}

__constant__ float emu_test_coeffs[4];

extern "C" __global__ void emu_test_constant(float* y) {
  y[threadIdx.x] = emu_test_coeffs[threadIdx.x % 4] * 2.0f;
}

// bf16 in, f32 math, bf16 out (round once).
extern "C" __global__ void emu_test_bf16_scale(const __nv_bfloat16* x, __nv_bfloat16* y, float s, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16(__bfloat162float(x[i]) * s);
}

// __syncthreads_count and a 3D block.
extern "C" __global__ void emu_test_sync_count(int* out) {
  int t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  int c = __syncthreads_count(t % 3 == 0);
  if (t == 0) out[0] = c;
}

// Reads static shared memory that only block 0 writes: later blocks must see the 0xFF poison (NaN), not
// block 0's values left behind on the same worker.
extern "C" __global__ void emu_test_stale_shared(float* out) {
  __shared__ float s[32];
  if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}

// Float -> integer intrinsics on values a C++ cast leaves undefined (NaN, out of range).
extern "C" __global__ void emu_test_float2int(const float* x, int* rn, int* rz, int* rd, unsigned* urn, long long* llrn, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    rn[i] = __float2int_rn(x[i]);
    rz[i] = __float2int_rz(x[i]);
    rd[i] = __float2int_rd(x[i]);
    urn[i] = __float2uint_rn(x[i]);
    llrn[i] = __float2ll_rn(x[i]);
  }
}
