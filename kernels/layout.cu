// Layout kernels: data movement between the NCHW tensors of the model interfaces and the token
// layout [B, h*w, C] every other kernel uses.
//
// transpose_<dtype>: [B, rows, cols] -> [B, cols, rows] through a 32x33 shared tile (the +1 column
//   avoids bank conflicts), so both the reads and the writes are coalesced. grid (col tiles *
//   row tiles, 1, B): the tiles are flattened into x because either side can exceed grid.y's
//   65535 tiles (H*W rows of a 2048^2 image are 131072 tiles); block (32, 8): 4 elements a thread.
#include "common.cuh"

#define TILE 32

template <typename T>
__device__ void transpose_tile(const T* __restrict__ x, T* __restrict__ y, int rows, int cols) {
    __shared__ T tile[TILE][TILE + 1];
    const long long base = (long long)blockIdx.z * rows * cols;
    const int col_tiles = (cols + TILE - 1) / TILE;
    const int c0 = (int)(blockIdx.x % col_tiles) * TILE, r0 = (int)(blockIdx.x / col_tiles) * TILE;
    for (int i = threadIdx.y; i < TILE; i += blockDim.y) {
        int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = x[base + (long long)r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < TILE; i += blockDim.y) {
        int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) y[base + (long long)c * rows + r] = tile[threadIdx.x][i];
    }
}

extern "C" __global__ void transpose_f32(const float* x, float* y, int rows, int cols) {
    transpose_tile<float>(x, y, rows, cols);
}

extern "C" __global__ void transpose_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int rows, int cols) {
    transpose_tile<__nv_bfloat16>(x, y, rows, cols);
}
