// Deliberately broken kernels: the emulator's self-tests (tests/broken.rs) show that each bug is caught.
// They live only here, never in kernels/.
#include <cuda_bf16.h>

// BUG: no __syncthreads() between the shared-memory write and the read of a neighbour's element.
// Each thread reads the element its left neighbour wrote: in forward thread order the neighbour has
// always run already (no error), in reverse order it never has (every read is the 0xFF poison, NaN).
extern "C" __global__ void emu_test_missing_sync(const float* x, float* y) {
  __shared__ float sm[256];
  int t = threadIdx.x;
  sm[t] = x[t];
  // __syncthreads();   <- missing
  y[t] = t > 0 ? sm[t - 1] : x[0];
}

// The same kernel with its barrier, for comparison.
extern "C" __global__ void emu_test_with_sync(const float* x, float* y) {
  __shared__ float sm[256];
  int t = threadIdx.x;
  sm[t] = x[t];
  __syncthreads();
  y[t] = t > 0 ? sm[t - 1] : x[0];
}

// BUG: a barrier inside a branch taken by only half of the block (the others return early).
extern "C" __global__ void emu_test_partial_barrier(float* y) {
  int t = threadIdx.x;
  if (t >= 128) return;
  y[t] = 1.0f;
  __syncthreads();
  y[t] += 1.0f;
}

// BUG: the two halves of the block wait at two different barriers.
extern "C" __global__ void emu_test_divergent_barriers(float* y) {
  int t = threadIdx.x;
  if (t < 64) {
    y[t] = 1.0f;
    __syncthreads();
  } else {
    y[t] = 2.0f;
    __syncthreads();
  }
}

// BUG: lanes of the last warp exit early, then the rest shuffle with a full mask.
extern "C" __global__ void emu_test_shfl_after_exit(const float* x, float* y, int n) {
  int i = threadIdx.x;
  if (i >= n) return;
  float v = x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  y[i] = v;
}

// BUG: writes one element past the end (the bound check uses <=).
extern "C" __global__ void emu_test_oob_write(float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = 1.0f;
}

// A device-side assert that fails.
extern "C" __global__ void emu_test_assert(const int* x) {
  assert(x[threadIdx.x] >= 0);
}
