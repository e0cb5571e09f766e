// The emulator's benchmark kernel: 8 barriers and 5 shuffle rounds per thread (benches/fibers.rs).
extern "C" __global__ void emu_test_bench(float* out) {
  __shared__ float sm[2][256];  // double-buffered: one barrier per round is enough
  int t = threadIdx.x;
  float v = (float)(blockIdx.x * blockDim.x + t);
  for (int r = 0; r < 8; r++) {
    sm[r & 1][t] = v;
    __syncthreads();
    v += sm[r & 1][(t + 1) % blockDim.x];
    if (r < 5) v += __shfl_xor_sync(0xffffffffu, v, 1 << r);
  }
  out[blockIdx.x * blockDim.x + t] = v;
}
