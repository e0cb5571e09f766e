// pixel_shuffle.cu: InternVL's pixel shuffle (v2, scale 0.5) read through its index map by mlp1's
// LayerNorm, so the shuffled tensor is never stored. CPU twin:
// openuni_cpu::ops::pixel_shuffle_layernorm (= ops::pixel_shuffle, then ops::layernorm).
//
//   pixel_shuffle_layernorm_{f32,bf16}(x, w, b, y, rows, c, grid, skip, eps)
//       x [B, skip + grid^2, c] (the ViT's last layer; `skip` leading tokens, the class token,
//       are never read), y [B, (grid/2)^2, 4c] = rows rows of 4c. Output row (b, r, q) reads the
//       2x2 block of tokens skip + (2r + dy) * grid + 2q + dx as channels (2dy + dx) * c + ch and
//       normalises the 4c values: y = (v - mean) / sqrt(var + eps) * w + b (biased variance).
//
// Launch layout: norm.cu's (openuni_cuda::families::norm::norm_launch over rows of 4c): blockDim
// (tx, ty), the tx threads sharing threadIdx.y own one output row, up to NORM_CACHE items each
// held in registers (one read of x), statistics in f32 in two passes (mean, then the squared
// deviations) reduced by `row_group_sum`. An item is a 16-byte vector when c is a multiple of the
// vector width and x, y, w, b are 16-byte aligned (a vector then never straddles two source
// tokens), else one element. Rows past the end take part in the reductions but neither load nor
// store.
//
// Version 1 (this one). The ViT's output is read once, mlp1's normalised input written once: the
// drop-CLS slice and the two transposes that stood here before (three full copies) are gone.

#include "common.cuh"
#include "norm_geometry.cuh"

namespace ou {
namespace ps {

template <typename T, int K>
__device__ __forceinline__ void shuffle_norm_row(const T* x, const T* w, const T* b, T* y, i64 rows, int c, int grid,
                                                 int skip, float eps, float* red) {
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    const bool valid = row < rows;
    const int tx = blockDim.x;
    const int cols = 4 * c, items = cols / K;
    const int h = grid / 2;
    // The 2x2 block of source tokens of this output row.
    const i64 r0 = valid ? row : 0;
    const i64 img = r0 / ((i64)h * h);
    const int cell = (int)(r0 % ((i64)h * h)), r = cell / h, q = cell % h;
    const T* base = x + (img * (skip + (i64)grid * grid) + skip + (i64)(2 * r) * grid + 2 * q) * c;
    // Element e of the 4c row: segment e / c = 2dy + dx.
    auto src = [&](int it) -> const T* {
        const int e = it * K, seg = e / c;
        return base + ((i64)(seg >> 1) * grid + (seg & 1)) * c + (e - seg * c);
    };
    T* yr = y + r0 * (i64)cols;
    const bool cached = items <= NORM_CACHE * tx;

    CachedItem<T, K> v[NORM_CACHE];  // the row in its storage type (common.cuh: why)
    float sum = 0.f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_CACHE; ++k) {
            const int it = threadIdx.x + k * tx;
            if (valid && it < items) {
                v[k].load(src(it));
#pragma unroll
                for (int j = 0; j < K; ++j) sum += v[k][j];
            }
        }
    } else {
        for (int it = threadIdx.x; valid && it < items; it += tx) {
            float t[K];
            load_k<T, K>(src(it), t);
#pragma unroll
            for (int j = 0; j < K; ++j) sum += t[j];
        }
    }
    const float mean = row_group_sum(sum, red) / (float)cols;
    float sq = 0.f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_CACHE; ++k) {
            const int it = threadIdx.x + k * tx;
            if (valid && it < items) {
#pragma unroll
                for (int j = 0; j < K; ++j) sq += (v[k][j] - mean) * (v[k][j] - mean);
            }
        }
    } else {
        for (int it = threadIdx.x; valid && it < items; it += tx) {
            float t[K];
            load_k<T, K>(src(it), t);
#pragma unroll
            for (int j = 0; j < K; ++j) sq += (t[j] - mean) * (t[j] - mean);
        }
    }
    const float rstd = 1.f / sqrtf(row_group_sum(sq, red) / (float)cols + eps);
    if (!valid) return;  // no barrier follows

    auto emit = [&](int it, float (&t)[K]) {
        const i64 o = (i64)it * K;
        float wk[K], bk[K];
        load_k<T, K>(w + o, wk);
        load_k<T, K>(b + o, bk);
#pragma unroll
        for (int j = 0; j < K; ++j) t[j] = (t[j] - mean) * rstd * wk[j] + bk[j];
        store_k<T, K>(yr + o, t);
    };
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_CACHE; ++k) {
            const int it = threadIdx.x + k * tx;
            if (it < items) {
                float t[K];
#pragma unroll
                for (int j = 0; j < K; ++j) t[j] = v[k][j];
                emit(it, t);
            }
        }
    } else {
        for (int it = threadIdx.x; it < items; it += tx) {
            float t[K];
            load_k<T, K>(src(it), t);
            emit(it, t);
        }
    }
}

template <typename T>
__device__ __forceinline__ void shuffle_norm(const T* x, const T* w, const T* b, T* y, i64 rows, int c, int grid, int skip,
                                             float eps) {
    __shared__ float red[32];
    constexpr int V = Vec16<T>::N;
    if (c % V == 0 && aligned16(x) && aligned16(y) && aligned16(w) && aligned16(b))
        shuffle_norm_row<T, V>(x, w, b, y, rows, c, grid, skip, eps, red);
    else
        shuffle_norm_row<T, 1>(x, w, b, y, rows, c, grid, skip, eps, red);
}

}  // namespace ps
}  // namespace ou

using ou::bf16;
using ou::i64;

extern "C" __global__ void pixel_shuffle_layernorm_f32(const float* x, const float* w, const float* b, float* y, i64 rows,
                                                       int c, int grid, int skip, float eps) {
    ou::ps::shuffle_norm<float>(x, w, b, y, rows, c, grid, skip, eps);
}

extern "C" __global__ void pixel_shuffle_layernorm_bf16(const bf16* x, const bf16* w, const bf16* b, bf16* y, i64 rows,
                                                        int c, int grid, int skip, float eps) {
    ou::ps::shuffle_norm<bf16>(x, w, b, y, rows, c, grid, skip, eps);
}
