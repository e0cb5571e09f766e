// norm.cu: row normalisations over the last dimension. CPU twins: openuni_cpu::ops::{rmsnorm, layernorm}.
//
//   rmsnorm_{f32,bf16}(x, w, b, y, rows, cols, eps)
//       y = x / sqrt(mean(x^2) + eps) * w (+ b). `b` may be null: it is there for DC-AE's channel
//       RMSNorm (weight and bias); the LLM's and SANA's RMSNorms pass null.
//   rmsnorm_residual_{f32,bf16}(x, w, b, r, y, rows, cols, eps)
//       y = r + rmsnorm(x) (DC-AE's `x + norm(block(x))`): the residual is added in f32 to the
//       normalised value before the one rounding, and the normalised tensor is never stored.
//       CPU twin: openuni_cpu::ops::rmsnorm_residual.
//   layernorm_{f32,bf16}(x, w, b, scale, shift, y, rows, cols, tokens, eps)
//       y = (x - mean) / sqrt(var + eps) (* w) (+ b), biased variance as PyTorch; `w`, `b` may be
//       null (SANA's norm1/norm2 have no affine). When `scale` and `shift` are non-null, the fused
//       adaLN modulation y = y * (1 + scale[s]) + shift[s] follows, where s = row / tokens is the
//       sample the row belongs to and scale/shift hold one row of `cols` per sample ([B, C]).
//   ada_layernorm_{f32,bf16}(x, scale, shift, scale_tab, shift_tab, y, rows, cols, tokens, mod_stride, eps)
//       layernorm without affine, modulated by adaLN-single's table read where it is made: the
//       modulation of sample s is scale[s * mod_stride + c] + scale_tab[c] (shift alike), i.e. the
//       caller points scale/shift at rows of the timestep projection t ([B, k*C], mod_stride k*C, or
//       [B, C], mod_stride C) and scale_tab/shift_tab at rows of the [k, C] table: the sum is
//       made in f32 here, so the [B, k, C] table and its row copies are never stored.
//
// Launch layout (chosen by openuni_cuda::families::norm::norm_launch): blockDim = (tx, ty), each row is
// handled by the tx threads that share threadIdx.y, ty rows per block, gridDim.x = ceil(rows / ty).
// tx is a power of two <= 32 (rows of a few hundred columns: a sub-warp per row, reductions by
// shuffles only) or a multiple of 32 (wide rows: warp shuffles, then one shared-memory step).
// Any tx, ty and cols are correct; the launcher's choice only affects speed. Blocks have at most
// NORM_MAX_THREADS threads (norm_geometry.cuh: why). __launch_bounds__(512) would tell ptxas the
// same, but it then made layernorm_bf16 spill at 64 registers.
//
// Version 1 (this one):
// - Statistics in f32, computed in two passes over values held in registers: mean first, then
//   the sum of squared deviations (no E[x^2] - mean^2 cancellation). Each thread keeps up to
//   NORM_CACHE items of its row in registers, in the storage type (CachedItem), so the row is read
//   from memory once (a norm is a pure streaming kernel: the target is the device-to-device copy
//   bandwidth). Rows longer than CACHE * tx items fall back to re-reading the row, which then comes
//   from L1/L2.
// - An item is one 16-byte vector (8 bf16 or 4 f32) when cols is a multiple of the vector width
//   and every pointer is 16-byte aligned (always true inside the planner's arena, whose offsets
//   are multiples of 64 elements), else one element. The check is made in the kernel, so any
//   caller gets a correct result.
// - Invalid rows of the last block still take part in the reductions (they contain barriers)
//   but neither load nor store.
// - In-place use (y == x) is allowed: each element is read before it is written by the same
//   thread, and the final pass is the only one that writes.

#include "common.cuh"
#include "norm_geometry.cuh"

namespace ou {

// NORM_CACHE (items a thread holds) and NORM_MAX_THREADS: norm_geometry.cuh.

// One row group: the tx threads with the same threadIdx.y normalise row `row`.
// K = elements per item (vector width or 1).
template <typename T, int K, bool RMS>
__device__ __forceinline__ void norm_row(const T* x, const T* w, const T* b, const T* scale, const T* shift,
                                         const T* scale_tab, const T* shift_tab, i64 mod_stride, const T* res, T* y,
                                         i64 rows, int cols, int tokens, float eps, float* red) {
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    const bool valid = row < rows;
    const int tx = blockDim.x;
    const int items = cols / K;
    const T* xr = x + (valid ? row : 0) * (i64)cols;
    T* yr = y + (valid ? row : 0) * (i64)cols;
    const T* rr = res ? res + (valid ? row : 0) * (i64)cols : nullptr;
    const bool cached = items <= NORM_CACHE * tx;  // the same for every thread of the block

    CachedItem<T, K> c[NORM_CACHE];
    float sum = 0.f;
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_CACHE; ++k) {
            const int it = threadIdx.x + k * tx;
            if (valid && it < items) {
                c[k].load(xr + (i64)it * K);
#pragma unroll
                for (int j = 0; j < K; ++j) sum += RMS ? c[k][j] * c[k][j] : c[k][j];
            }
        }
    } else {
        for (int it = threadIdx.x; valid && it < items; it += tx) {
            float t[K];
            load_k<T, K>(xr + (i64)it * K, t);
#pragma unroll
            for (int j = 0; j < K; ++j) sum += RMS ? t[j] * t[j] : t[j];
        }
    }
    const float inv_cols = 1.f / (float)cols;
    float mean = 0.f, rstd;
    if (RMS) {
        rstd = 1.f / sqrtf(row_group_sum(sum, red) * inv_cols + eps);
    } else {
        mean = row_group_sum(sum, red) * inv_cols;
        float sq = 0.f;
        if (cached) {
#pragma unroll
            for (int k = 0; k < NORM_CACHE; ++k) {
                const int it = threadIdx.x + k * tx;
                if (valid && it < items) {
#pragma unroll
                    for (int j = 0; j < K; ++j) {
                        const float d = c[k][j] - mean;
                        sq += d * d;
                    }
                }
            }
        } else {
            for (int it = threadIdx.x; valid && it < items; it += tx) {
                float t[K];
                load_k<T, K>(xr + (i64)it * K, t);
#pragma unroll
                for (int j = 0; j < K; ++j) {
                    const float d = t[j] - mean;
                    sq += d * d;
                }
            }
        }
        rstd = 1.f / sqrtf(row_group_sum(sq, red) * inv_cols + eps);
    }
    if (!valid) return;  // no barrier follows

    const T* sc = scale ? scale + (row / tokens) * mod_stride : nullptr;
    const T* sh = shift ? shift + (row / tokens) * mod_stride : nullptr;
    // Writes one item: normalise, affine, modulation.
    auto emit = [&](int it, float (&v)[K]) {
        const i64 o = (i64)it * K;
#pragma unroll
        for (int j = 0; j < K; ++j) v[j] = RMS ? v[j] * rstd : (v[j] - mean) * rstd;
        if (w) {
            float t[K];
            load_k<T, K>(w + o, t);
#pragma unroll
            for (int j = 0; j < K; ++j) v[j] *= t[j];
        }
        if (b) {
            float t[K];
            load_k<T, K>(b + o, t);
#pragma unroll
            for (int j = 0; j < K; ++j) v[j] += t[j];
        }
        if (sc) {
            float s[K], h[K];
            load_k<T, K>(sc + o, s);
            load_k<T, K>(sh + o, h);
            if (scale_tab) {
                float ts[K], th[K];
                load_k<T, K>(scale_tab + o, ts);
                load_k<T, K>(shift_tab + o, th);
#pragma unroll
                for (int j = 0; j < K; ++j) s[j] += ts[j], h[j] += th[j];
            }
#pragma unroll
            for (int j = 0; j < K; ++j) v[j] = v[j] * (1.f + s[j]) + h[j];
        }
        if (rr) {
            float t[K];
            load_k<T, K>(rr + o, t);
#pragma unroll
            for (int j = 0; j < K; ++j) v[j] = t[j] + v[j];
        }
        store_k<T, K>(yr + o, v);
    };
    if (cached) {
#pragma unroll
        for (int k = 0; k < NORM_CACHE; ++k) {
            const int it = threadIdx.x + k * tx;
            if (it < items) {
                float v[K];
#pragma unroll
                for (int j = 0; j < K; ++j) v[j] = c[k][j];
                emit(it, v);
            }
        }
    } else {
        for (int it = threadIdx.x; it < items; it += tx) {
            float t[K];
            load_k<T, K>(xr + (i64)it * K, t);
            emit(it, t);
        }
    }
}

template <typename T, bool RMS>
__device__ __forceinline__ void norm(const T* x, const T* w, const T* b, const T* scale, const T* shift,
                                     const T* scale_tab, const T* shift_tab, i64 mod_stride, const T* res, T* y,
                                     i64 rows, int cols, int tokens, float eps) {
    __shared__ float red[32];
    constexpr int V = Vec16<T>::N;
    const bool vec = cols % V == 0 && mod_stride % V == 0 && aligned16(x) && aligned16(y) && (!w || aligned16(w)) &&
                     (!b || aligned16(b)) && (!scale || aligned16(scale)) && (!shift || aligned16(shift)) &&
                     (!scale_tab || aligned16(scale_tab)) && (!shift_tab || aligned16(shift_tab)) && (!res || aligned16(res));
    if (vec)
        norm_row<T, V, RMS>(x, w, b, scale, shift, scale_tab, shift_tab, mod_stride, res, y, rows, cols, tokens, eps, red);
    else
        norm_row<T, 1, RMS>(x, w, b, scale, shift, scale_tab, shift_tab, mod_stride, res, y, rows, cols, tokens, eps, red);
}

}  // namespace ou

using ou::bf16;
using ou::i64;

extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, const float* b, float* y, i64 rows, int cols,
                                       float eps) {
    ou::norm<float, true>(x, w, b, nullptr, nullptr, nullptr, nullptr, cols, nullptr, y, rows, cols, 1, eps);
}

extern "C" __global__ void rmsnorm_bf16(const bf16* x, const bf16* w, const bf16* b, bf16* y, i64 rows, int cols,
                                        float eps) {
    ou::norm<bf16, true>(x, w, b, nullptr, nullptr, nullptr, nullptr, cols, nullptr, y, rows, cols, 1, eps);
}

extern "C" __global__ void rmsnorm_residual_f32(const float* x, const float* w, const float* b, const float* r,
                                                float* y, i64 rows, int cols, float eps) {
    ou::norm<float, true>(x, w, b, nullptr, nullptr, nullptr, nullptr, cols, r, y, rows, cols, 1, eps);
}

extern "C" __global__ void rmsnorm_residual_bf16(const bf16* x, const bf16* w, const bf16* b, const bf16* r, bf16* y,
                                                 i64 rows, int cols, float eps) {
    ou::norm<bf16, true>(x, w, b, nullptr, nullptr, nullptr, nullptr, cols, r, y, rows, cols, 1, eps);
}

extern "C" __global__ void layernorm_f32(const float* x, const float* w, const float* b, const float* scale,
                                         const float* shift, float* y, i64 rows, int cols, int tokens, float eps) {
    ou::norm<float, false>(x, w, b, scale, shift, nullptr, nullptr, cols, nullptr, y, rows, cols, tokens, eps);
}

extern "C" __global__ void layernorm_bf16(const bf16* x, const bf16* w, const bf16* b, const bf16* scale,
                                          const bf16* shift, bf16* y, i64 rows, int cols, int tokens, float eps) {
    ou::norm<bf16, false>(x, w, b, scale, shift, nullptr, nullptr, cols, nullptr, y, rows, cols, tokens, eps);
}

extern "C" __global__ void ada_layernorm_f32(const float* x, const float* scale, const float* shift, const float* scale_tab,
                                             const float* shift_tab, float* y, i64 rows, int cols, int tokens,
                                             i64 mod_stride, float eps) {
    ou::norm<float, false>(x, nullptr, nullptr, scale, shift, scale_tab, shift_tab, mod_stride, nullptr, y, rows, cols, tokens, eps);
}

extern "C" __global__ void ada_layernorm_bf16(const bf16* x, const bf16* scale, const bf16* shift, const bf16* scale_tab,
                                              const bf16* shift_tab, bf16* y, i64 rows, int cols, int tokens,
                                              i64 mod_stride, float eps) {
    ou::norm<bf16, false>(x, nullptr, nullptr, scale, shift, scale_tab, shift_tab, mod_stride, nullptr, y, rows, cols, tokens, eps);
}
