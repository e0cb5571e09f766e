// misc.cu: the small ops of SANA's adaLN-single and of the LLM. CPU twins: openuni_cpu::ops::{modulation_table,
// chunk, timestep_embedding, swiglu, slice_tokens (gather_tokens), concat}.
//
//   modulation_table_{f32,bf16}(t, table, out, n, kc, c, per_row)
//       out[b, j, i] = table[j, i] + t[b, j*c + i] (per_row, t [B, k*c]) or + t[b, i] (t [B, c]); n = B*k*c,
//       kc = k*c.
//   strided_copy_{f32,bf16}(src, dst, rows, cols, src_stride, dst_stride)
//       dst[r * dst_stride + i] = src[r * src_stride + i] for r < rows, i < cols. Op::Chunk (one row of
//       [B, k, C]), Op::GatherTokens (one launch per gathered token range) and Op::Concat (one launch per
//       input, into its column range of the output) are all this copy.
//   timestep_embedding_{f32,bf16}(t, freq, out, batch, half)          t in f32
//   timestep_embedding_bf16_tbf16(t, freq, out, batch, half)         t in bf16 (a timestep computed on the device)
//       out[b] = [cos(t_b * freq_i) for i < half, sin(t_b * freq_i) for i < half] (cos first:
//       flip_sin_to_cos=True). `freq` [half] is computed on the host by the launcher exactly as the CPU twin
//       does (f32 exp(-ln(10000) * i / half)), so that the f32 argument t * freq_i is bit-identical: at t ~ 1000
//       one ulp of freq moves the argument by ~1e-4.
//   swiglu_{f32,bf16}(gate, up, y, n)                   y = silu(gate) * up
//
// Version 1 (this one):
// - All math in f32 except the sinusoids: cos/sin of the f32 argument are computed in double and rounded
//   to f32, as the CPU twin does, so the two agree to the last bit in almost every case (sinf/cosf are
//   within 2 ulp). They are a few thousand values per call (timestep: B x 128), so double precision
//   costs nothing measurable.
// - Grid-stride loops; 16-byte vectors where the pointers, strides and widths allow it (checked at run
//   time), scalars otherwise. The launcher sizes the grid to a few waves and never launches for n == 0.
// - No __restrict__ on the elementwise kernels: y may alias an input (each element is read before it is
//   written by the same thread).

#include "common.cuh"

namespace ou {

__device__ __forceinline__ i64 misc_thread() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 misc_threads() { return (i64)gridDim.x * blockDim.x; }

__device__ __forceinline__ float misc_silu(float x) { return x / (1.f + expf(-x)); }

template <typename T>
__device__ __forceinline__ void modulation_table(const T* t, const T* table, T* out, i64 n, int kc, int c,
                                                 int per_row) {
    for (i64 e = misc_thread(); e < n; e += misc_threads()) {
        const i64 b = e / kc;
        const int r = (int)(e - b * kc);  // index into the table [k, c]
        const float tv = per_row ? to_f32(t[e]) : to_f32(t[b * c + r % c]);
        out[e] = from_f32<T>(to_f32(table[r]) + tv);
    }
}

template <typename T>
__device__ __forceinline__ void strided_copy(const T* src, T* dst, i64 rows, i64 cols, i64 ss, i64 ds) {
    constexpr int V = Vec16<T>::N;
    if (aligned16(src) && aligned16(dst) && cols % V == 0 && ss % V == 0 && ds % V == 0) {
        const i64 vc = cols / V, n = rows * vc;
        for (i64 i = misc_thread(); i < n; i += misc_threads()) {
            const i64 r = i / vc, c = (i - r * vc) * V;
            *reinterpret_cast<uint4*>(dst + r * ds + c) = *reinterpret_cast<const uint4*>(src + r * ss + c);
        }
        return;
    }
    const i64 n = rows * cols;
    for (i64 i = misc_thread(); i < n; i += misc_threads()) {
        const i64 r = i / cols, c = i - r * cols;
        dst[r * ds + c] = src[r * ss + c];
    }
}

template <typename TT, typename T>
__device__ __forceinline__ void timestep_embedding(const TT* t, const float* freq, T* out, int batch, int half) {
    const i64 n = (i64)batch * half;
    for (i64 e = misc_thread(); e < n; e += misc_threads()) {
        const int b = (int)(e / half), i = (int)(e - (i64)b * half);
        const float arg = to_f32(t[b]) * freq[i];  // one f32 product, as PyTorch and the CPU twin
        const double a = (double)arg;
        out[(i64)b * 2 * half + i] = from_f32<T>((float)cos(a));
        out[(i64)b * 2 * half + half + i] = from_f32<T>((float)sin(a));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu(const T* gate, const T* up, T* y, i64 n) {
    constexpr int V = Vec16<T>::N;
    const i64 nv = aligned16(gate) && aligned16(up) && aligned16(y) ? n / V : 0;
    for (i64 i = misc_thread(); i < nv; i += misc_threads()) {
        float g[V], u[V];
        load_vec<T>(gate + i * V, g);
        load_vec<T>(up + i * V, u);
#pragma unroll
        for (int j = 0; j < V; ++j) g[j] = misc_silu(g[j]) * u[j];
        store_vec<T>(y + i * V, g);
    }
    for (i64 i = nv * V + misc_thread(); i < n; i += misc_threads())
        y[i] = from_f32<T>(misc_silu(to_f32(gate[i])) * to_f32(up[i]));
}

}  // namespace ou

using ou::bf16;
using ou::i64;

// Entry points are written out one by one (no macros), so that openuni_cuda finds every kernel's file by
// scanning the sources for `extern "C" __global__ void NAME(`.
extern "C" __global__ void modulation_table_f32(const float* t, const float* table, float* out, i64 n, int kc, int c, int per_row) {
    ou::modulation_table<float>(t, table, out, n, kc, c, per_row);
}
extern "C" __global__ void modulation_table_bf16(const bf16* t, const bf16* table, bf16* out, i64 n, int kc, int c, int per_row) {
    ou::modulation_table<bf16>(t, table, out, n, kc, c, per_row);
}

extern "C" __global__ void strided_copy_f32(const float* src, float* dst, i64 rows, i64 cols, i64 src_stride, i64 dst_stride) {
    ou::strided_copy<float>(src, dst, rows, cols, src_stride, dst_stride);
}
extern "C" __global__ void strided_copy_bf16(const bf16* src, bf16* dst, i64 rows, i64 cols, i64 src_stride, i64 dst_stride) {
    ou::strided_copy<bf16>(src, dst, rows, cols, src_stride, dst_stride);
}

extern "C" __global__ void timestep_embedding_f32(const float* t, const float* freq, float* out, int batch, int half) {
    ou::timestep_embedding<float, float>(t, freq, out, batch, half);
}
extern "C" __global__ void timestep_embedding_bf16(const float* t, const float* freq, bf16* out, int batch, int half) {
    ou::timestep_embedding<float, bf16>(t, freq, out, batch, half);
}
extern "C" __global__ void timestep_embedding_bf16_tbf16(const bf16* t, const float* freq, bf16* out, int batch, int half) {
    ou::timestep_embedding<bf16, bf16>(t, freq, out, batch, half);
}

extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* y, i64 n) { ou::swiglu<float>(gate, up, y, n); }
extern "C" __global__ void swiglu_bf16(const bf16* gate, const bf16* up, bf16* y, i64 n) { ou::swiglu<bf16>(gate, up, y, n); }
