// elementwise.cu: pointwise kernels. CPU twins: openuni_cpu::ops::{unary (silu, gelu_tanh, gelu_erf,
// relu), add, gated_add} and the f32 <-> bf16 conversions of HostTensor::to_dtype.
//
//   silu_{f32,bf16}(x, y, n)           y = x / (1 + exp(-x))
//   gelu_tanh_{f32,bf16}(x, y, n)      y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (PyTorch approximate="tanh")
//   gelu_erf_{f32,bf16}(x, y, n)       y = 0.5 x (1 + erf(x / sqrt 2))                        (PyTorch exact GELU)
//   relu_{f32,bf16}(x, y, n)           y = max(x, 0)
//   add_{f32,bf16}(a, b, y, n)         y = a + b (residual add)
//   gated_add_{f32,bf16}(x, gate, v, y, n, tokens, cols)
//                                      y = x + gate[s, c] * v, for element (row, c) of a [rows, cols] view,
//                                      s = row / tokens the sample (adaLN gated residual, gate [B, C])
//   ada_gated_add_{f32,bf16}(x, gate, gate_tab, v, y, n, tokens, cols, gate_stride)
//                                      y = x + (gate[s * gate_stride + c] + gate_tab[c]) * v: the gate read
//                                      from adaLN-single's table where it is made (a row of the timestep
//                                      projection t plus a row of the [k, C] table, summed in f32), so the
//                                      table and its row copies are never stored
//   cast_f32_to_bf16(x, y, n)          round to nearest even
//   cast_bf16_to_f32(x, y, n)          exact
//   cast_{f32,bf16}_to_u8(x, y, n)     integer-valued 0..=255 (quantize_u8's output) -> bytes; saturating,
//                                      truncating, NaN -> 0 (the executor's uint8 read-back)
//
// Version 1 (this one):
// - Storage f32 or bf16, math in f32 with the accurate expf/tanhf/erff (no fast-math: these are
//   memory bound, the accurate functions cost nothing measurable).
// - Grid-stride loops over 16-byte vectors (8 bf16 or 4 f32 per load) when every pointer is
//   16-byte aligned, then a scalar tail; unaligned pointers take the scalar path for everything.
//   The launcher (openuni_cuda::families::elementwise) sizes the grid to a few waves and never launches
//   for n == 0.
// - gated_add vectorises only when cols is a multiple of the vector width, so that a vector never
//   straddles two rows (the gate row can change between rows).
// - No __restrict__: in-place calls (y == x or y == a) are allowed, since every element is read
//   by the thread that writes it, before it writes it.

#include "common.cuh"

namespace ou {

struct Silu {
    __device__ __forceinline__ float operator()(float x) const { return x / (1.f + expf(-x)); }
};
struct GeluTanh {
    __device__ __forceinline__ float operator()(float x) const {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
};
struct GeluErf {
    __device__ __forceinline__ float operator()(float x) const { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }
};
struct Relu {
    __device__ __forceinline__ float operator()(float x) const { return x > 0.f ? x : 0.f; }
};

__device__ __forceinline__ i64 global_thread() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 grid_threads() { return (i64)gridDim.x * blockDim.x; }

template <typename T, typename F>
__device__ __forceinline__ void unary(const T* x, T* y, i64 n, F f) {
    constexpr int V = Vec16<T>::N;
    const i64 nv = aligned16(x) && aligned16(y) ? n / V : 0;
    for (i64 i = global_thread(); i < nv; i += grid_threads()) {
        float v[V];
        load_vec<T>(x + i * V, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = f(v[j]);
        store_vec<T>(y + i * V, v);
    }
    for (i64 i = nv * V + global_thread(); i < n; i += grid_threads()) y[i] = from_f32<T>(f(to_f32(x[i])));
}

template <typename T>
__device__ __forceinline__ void add(const T* a, const T* b, T* y, i64 n) {
    constexpr int V = Vec16<T>::N;
    const i64 nv = aligned16(a) && aligned16(b) && aligned16(y) ? n / V : 0;
    for (i64 i = global_thread(); i < nv; i += grid_threads()) {
        float u[V], v[V];
        load_vec<T>(a + i * V, u);
        load_vec<T>(b + i * V, v);
#pragma unroll
        for (int j = 0; j < V; ++j) u[j] += v[j];
        store_vec<T>(y + i * V, u);
    }
    for (i64 i = nv * V + global_thread(); i < n; i += grid_threads())
        y[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

// gate_tab may be null (plain gated_add: gate_stride == cols).
template <typename T>
__device__ __forceinline__ void gated_add(const T* x, const T* gate, const T* gate_tab, const T* v, T* y, i64 n,
                                          int tokens, int cols, i64 gate_stride) {
    constexpr int V = Vec16<T>::N;
    const i64 sample_elems = (i64)tokens * cols;
    const i64 nv = cols % V == 0 && gate_stride % V == 0 && aligned16(x) && aligned16(gate) &&
                           (!gate_tab || aligned16(gate_tab)) && aligned16(v) && aligned16(y)
                       ? n / V
                       : 0;
    for (i64 i = global_thread(); i < nv; i += grid_threads()) {
        const i64 e = i * V;
        const T* g = gate + (e / sample_elems) * gate_stride + (e % cols);
        float a[V], gv[V], b[V];
        load_vec<T>(x + e, a);
        load_vec<T>(g, gv);
        if (gate_tab) {
            float tv[V];
            load_vec<T>(gate_tab + (e % cols), tv);
#pragma unroll
            for (int j = 0; j < V; ++j) gv[j] += tv[j];
        }
        load_vec<T>(v + e, b);
#pragma unroll
        for (int j = 0; j < V; ++j) a[j] += gv[j] * b[j];
        store_vec<T>(y + e, a);
    }
    for (i64 e = nv * V + global_thread(); e < n; e += grid_threads()) {
        float g = to_f32(gate[(e / sample_elems) * gate_stride + (e % cols)]);
        if (gate_tab) g += to_f32(gate_tab[e % cols]);
        y[e] = from_f32<T>(to_f32(x[e]) + g * to_f32(v[e]));
    }
}

template <typename S>
__device__ __forceinline__ void cast_to_u8(const S* x, unsigned char* y, i64 n) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) y[i] = (unsigned char)fminf(fmaxf(to_f32(x[i]), 0.f), 255.f);
}

// Casts 8 elements per step: two float4 loads against one 16-byte bf16 store (or the reverse).
template <typename S, typename D>
__device__ __forceinline__ void cast(const S* x, D* y, i64 n) {
    const i64 nv = aligned16(x) && aligned16(y) ? n / 8 : 0;
    for (i64 i = global_thread(); i < nv; i += grid_threads()) {
        float v[8];
        if constexpr (sizeof(S) == 4) {
            float lo[4], hi[4];
            load_vec<S>(x + i * 8, lo);
            load_vec<S>(x + i * 8 + 4, hi);
#pragma unroll
            for (int j = 0; j < 4; ++j) v[j] = lo[j], v[j + 4] = hi[j];
        } else {
            load_vec<S>(x + i * 8, v);
        }
        if constexpr (sizeof(D) == 4) {
            float lo[4], hi[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) lo[j] = v[j], hi[j] = v[j + 4];
            store_vec<D>(y + i * 8, lo);
            store_vec<D>(y + i * 8 + 4, hi);
        } else {
            store_vec<D>(y + i * 8, v);
        }
    }
    for (i64 i = nv * 8 + global_thread(); i < n; i += grid_threads()) y[i] = from_f32<D>(to_f32(x[i]));
}

}  // namespace ou

using ou::bf16;
using ou::i64;

// Entry points are written out one by one (no macros), so that openuni_cuda finds every kernel's
// file by scanning the sources for `extern "C" __global__ void NAME(`.
extern "C" __global__ void silu_f32(const float* x, float* y, i64 n) { ou::unary<float>(x, y, n, ou::Silu()); }
extern "C" __global__ void silu_bf16(const bf16* x, bf16* y, i64 n) { ou::unary<bf16>(x, y, n, ou::Silu()); }
extern "C" __global__ void gelu_tanh_f32(const float* x, float* y, i64 n) { ou::unary<float>(x, y, n, ou::GeluTanh()); }
extern "C" __global__ void gelu_tanh_bf16(const bf16* x, bf16* y, i64 n) { ou::unary<bf16>(x, y, n, ou::GeluTanh()); }
extern "C" __global__ void gelu_erf_f32(const float* x, float* y, i64 n) { ou::unary<float>(x, y, n, ou::GeluErf()); }
extern "C" __global__ void gelu_erf_bf16(const bf16* x, bf16* y, i64 n) { ou::unary<bf16>(x, y, n, ou::GeluErf()); }
extern "C" __global__ void relu_f32(const float* x, float* y, i64 n) { ou::unary<float>(x, y, n, ou::Relu()); }
extern "C" __global__ void relu_bf16(const bf16* x, bf16* y, i64 n) { ou::unary<bf16>(x, y, n, ou::Relu()); }

extern "C" __global__ void add_f32(const float* a, const float* b, float* y, i64 n) { ou::add<float>(a, b, y, n); }
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* y, i64 n) { ou::add<bf16>(a, b, y, n); }

extern "C" __global__ void gated_add_f32(const float* x, const float* gate, const float* v, float* y, i64 n, int tokens,
                                         int cols) {
    ou::gated_add<float>(x, gate, nullptr, v, y, n, tokens, cols, cols);
}
extern "C" __global__ void gated_add_bf16(const bf16* x, const bf16* gate, const bf16* v, bf16* y, i64 n, int tokens,
                                          int cols) {
    ou::gated_add<bf16>(x, gate, nullptr, v, y, n, tokens, cols, cols);
}

extern "C" __global__ void ada_gated_add_f32(const float* x, const float* gate, const float* gate_tab, const float* v,
                                             float* y, i64 n, int tokens, int cols, i64 gate_stride) {
    ou::gated_add<float>(x, gate, gate_tab, v, y, n, tokens, cols, gate_stride);
}
extern "C" __global__ void ada_gated_add_bf16(const bf16* x, const bf16* gate, const bf16* gate_tab, const bf16* v,
                                              bf16* y, i64 n, int tokens, int cols, i64 gate_stride) {
    ou::gated_add<bf16>(x, gate, gate_tab, v, y, n, tokens, cols, gate_stride);
}

extern "C" __global__ void cast_f32_to_bf16(const float* x, bf16* y, i64 n) { ou::cast<float, bf16>(x, y, n); }
extern "C" __global__ void cast_bf16_to_f32(const bf16* x, float* y, i64 n) { ou::cast<bf16, float>(x, y, n); }
extern "C" __global__ void cast_f32_to_u8(const float* x, unsigned char* y, i64 n) { ou::cast_to_u8<float>(x, y, n); }
extern "C" __global__ void cast_bf16_to_u8(const bf16* x, unsigned char* y, i64 n) { ou::cast_to_u8<bf16>(x, y, n); }
