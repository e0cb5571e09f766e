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
//   embedding_gather_{f32,bf16}(ids, table, extra, out, tokens, d, v, e)
//       out[t] = table[ids[t]] (ids[t] < v) or extra[ids[t] - v] (v <= ids[t] < v + e); `ids` is the f32 copy
//       of the input (integer-valued); an id that is not an integer in [0, v + e) gives a NaN row, never a
//       read outside the tables (the host refuses such ids first, naming them). CPU twin: embedding_gather.
//   quantize_u8_{f32,bf16}(x, out, batch, pixels)
//       [B, 3, H, W] -> [B, H, W, 3] pixel values trunc(clamp(127.5 * x + 128, 0, 255)) (NaN -> 0), with
//       __fmul_rn / __fadd_rn so that no fused multiply-add changes a rounding: bit-exact with the CPU
//       twin openuni_cpu::ops::quantize_u8 (the one definition of the rule). Held as integer-valued
//       numbers (exact in bf16) until the executor reads them back as bytes (cast_*_to_u8).
//   any_nonfinite_{f32,bf16}(x, n, flag)      atomicOr(flag, 1) if any x is NaN/Inf (flag: a zeroed u32 workspace)
//   any_nonfinite_finish_{f32,bf16}(flag, out)  out[0] = flag ? 1 : 0, and the workspace back to 0
//       CPU twin: any_nonfinite. The test is on the exponent bits (all ones), so no compiler flag can
//       fold it away.
//   guided_x0_{f32,bf16}(v, x, k, out, n)
//       out[i] = x[i] - k[SIGMA] * (u + k[GUIDANCE] * (c - u)), u = v[i], c = v[n + i] (the [uncond; cond]
//       halves of the transformer's output). CPU twin: guided_x0.
//   dpm_solver_update_{f32,bf16}(x, x0, prev, k, out, n)
//       by k[ORDER]: 0 out = x0; 1 out = ratio*x - c*x0; 2 out = (ratio*x - c*x0) - half_c*(inv_r0*(x0 - prev)).
//       CPU twin: dpm_solver_update.
//   div_scalar_{f32,bf16}(x, y, d, n)
//       y[i] = __fdiv_rn(x[i], d): one IEEE f32 division, correctly rounded (never x * (1/d), whatever the
//       compiler flags), so with f32 storage the result is the host's `x / d` bit for bit (the decoder's
//       input latents / scaling_factor, made where the sampler left the latents). With bf16 storage the
//       input is widened exactly and the quotient rounded once to bf16. CPU twin: div_scalar.
//   gaussian_noise_{f32,bf16}(seeds, out, n_seeds, per_seed)
//       out[i * per_seed + j] = value j of seed i (seeds: [n_seeds, 4] f32 16-bit limbs, lowest first,
//       openuni_graph::seed): Philox4x32-10 (Salmon et al., SC 2011; Random123's constants) of counter
//       (j / 4, 0, 0) under key (seed lo, seed hi), then Box-Muller of words (0, 1) -> values 0, 1 and
//       (2, 3) -> values 2, 3, with Cephes' logf and sinf/cosf polynomials. Every float operation is an
//       explicit __fmul_rn / __fadd_rn / __fmaf_rn / __fsqrt_rn, so no contraction changes a rounding:
//       the values equal the CPU twin's (gaussian_noise, noise_ln, noise_sincos_turn) bit for bit, on
//       every device. One thread per group of four values; a few hundred thousand values a batch.
//       Both (the sampler's two): `k` is the f32 coefficient input (openuni_graph::coeff: 0 guidance, 1 sigma, 2 ratio, 3 c,
//       4 half_c, 5 inv_r0, 6 order; the f32 staging copy under bf16 storage); every product and sum is
//       __fmul_rn / __fadd_rn / __fsub_rn, so no fused multiply-add changes a rounding: with f32 storage
//       the result equals the host solver (openuni_models::scheduler) bit for bit.
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

template <typename T>
__device__ __forceinline__ void embedding_gather(const float* ids, const T* table, const T* extra, T* out, i64 tokens, int d,
                                                 i64 v, i64 e) {
    const i64 n = tokens * d;
    for (i64 k = misc_thread(); k < n; k += misc_threads()) {
        const i64 t = k / d;
        const int j = (int)(k - t * d);
        const float f = ids[t];
        const bool ok = f >= 0.f && f < (float)(v + e) && f == floorf(f);
        const i64 id = ok ? (i64)f : 0;
        out[k] = !ok ? from_f32<T>(__uint_as_float(0x7fc00000u)) : id < v ? table[id * d + j] : extra[(id - v) * d + j];
    }
}

template <typename T>
__device__ __forceinline__ void quantize_u8(const T* x, T* out, int batch, i64 pixels) {
    const i64 n = (i64)batch * 3 * pixels;
    for (i64 k = misc_thread(); k < n; k += misc_threads()) {
        // k indexes the output [B, H·W, 3]: read the planar input [B, 3, H·W].
        const i64 b = k / (3 * pixels), r = k - b * 3 * pixels, p = r / 3;
        const int c = (int)(r - p * 3);
        const float y = __fadd_rn(__fmul_rn(127.5f, to_f32(x[(b * 3 + c) * pixels + p])), 128.f);
        // fmaxf(NaN, 0) = 0: NaN -> 0 as the CPU twin's saturating cast.
        out[k] = from_f32<T>(truncf(fminf(fmaxf(y, 0.f), 255.f)));
    }
}

__device__ __forceinline__ bool misc_nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }

template <typename T>
__device__ __forceinline__ void any_nonfinite(const T* x, i64 n, unsigned* flag) {
    bool bad = false;
    for (i64 k = misc_thread(); k < n; k += misc_threads()) bad |= misc_nonfinite(to_f32(x[k]));
    if (bad) atomicOr(flag, 1u);
}

template <typename T>
__device__ __forceinline__ void any_nonfinite_finish(unsigned* flag, T* out) {
    if (misc_thread() == 0) {
        out[0] = from_f32<T>(*flag ? 1.f : 0.f);
        *flag = 0u;
    }
}

template <typename T>
__device__ __forceinline__ void guided_x0(const T* v, const T* x, const float* k, T* out, i64 n) {
    const float g = k[0], sigma = k[1];
    for (i64 e = misc_thread(); e < n; e += misc_threads()) {
        const float u = to_f32(v[e]), c = to_f32(v[n + e]);
        const float guided = __fadd_rn(u, __fmul_rn(g, __fsub_rn(c, u)));
        out[e] = from_f32<T>(__fsub_rn(to_f32(x[e]), __fmul_rn(sigma, guided)));
    }
}

template <typename T>
__device__ __forceinline__ void dpm_solver_update(const T* x, const T* x0, const T* prev, const float* k, T* out, i64 n) {
    const float ratio = k[2], c = k[3], half_c = k[4], inv_r0 = k[5];
    const int order = (int)k[6];
    for (i64 e = misc_thread(); e < n; e += misc_threads()) {
        const float d0 = to_f32(x0[e]);
        float y = d0;
        if (order >= 1) y = __fsub_rn(__fmul_rn(ratio, to_f32(x[e])), __fmul_rn(c, d0));
        if (order >= 2) y = __fsub_rn(y, __fmul_rn(half_c, __fmul_rn(inv_r0, __fsub_rn(d0, to_f32(prev[e])))));
        out[e] = from_f32<T>(y);
    }
}

template <typename T>
__device__ __forceinline__ void div_scalar(const T* x, T* y, float d, i64 n) {
    for (i64 e = misc_thread(); e < n; e += misc_threads()) y[e] = from_f32<T>(__fdiv_rn(to_f32(x[e]), d));
}

// Philox4x32-10: four 32-bit words from a 128-bit counter and a 64-bit key.
__device__ __forceinline__ void philox4x32_10(unsigned c[4], unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned long long p0 = 0xD2511F53ull * c[0];
        const unsigned long long p1 = 0xCD9E8D57ull * c[2];
        const unsigned n0 = (unsigned)(p1 >> 32) ^ c[1] ^ k0, n2 = (unsigned)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (unsigned)p1;
        c[2] = n2;
        c[3] = (unsigned)p0;
    }
}

// ln x, x in (0, 1]: CPU twin noise_ln.
__device__ __forceinline__ float noise_ln(float x) {
    const unsigned bits = __float_as_uint(x);
    int e = (int)((bits >> 23) & 0xFFu) - 126;
    float m = __uint_as_float((bits & 0x007FFFFFu) | 0x3F000000u);
    if (m < 0.70710677f) {
        e -= 1;
        m = __fadd_rn(__fadd_rn(m, m), -1.f);
    } else {
        m = __fadd_rn(m, -1.f);
    }
    const float z = __fmul_rn(m, m);
    float p = 7.0376836e-2f;
    p = __fmaf_rn(p, m, -1.151461e-1f);
    p = __fmaf_rn(p, m, 1.16769984e-1f);
    p = __fmaf_rn(p, m, -1.2420141e-1f);
    p = __fmaf_rn(p, m, 1.4249323e-1f);
    p = __fmaf_rn(p, m, -1.6668057e-1f);
    p = __fmaf_rn(p, m, 2.0000714e-1f);
    p = __fmaf_rn(p, m, -2.4999994e-1f);
    p = __fmaf_rn(p, m, 3.333333e-1f);
    const float fe = (float)e;
    float y = __fmul_rn(__fmul_rn(p, m), z);
    y = __fmaf_rn(fe, -2.1219444e-4f, y);
    y = __fmaf_rn(-0.5f, z, y);
    return __fadd_rn(__fadd_rn(m, y), __fmul_rn(fe, 0.693359375f));
}

// (sin, cos) of 2 pi t / 2^24, t < 2^24: CPU twin noise_sincos_turn.
__device__ __forceinline__ void noise_sincos_turn(unsigned t, float* sin_out, float* cos_out) {
    const unsigned k = (t + (1u << 21)) >> 22;
    const int f = (int)t - (int)(k << 22);
    const float x = __fmul_rn((float)f, 3.14159265358979323846f / 8388608.f);
    const float z = __fmul_rn(x, x);
    const float ps = __fmaf_rn(__fmaf_rn(-1.9515296e-4f, z, 8.332161e-3f), z, -1.6666655e-1f);
    const float s = __fmaf_rn(__fmul_rn(ps, z), x, x);
    const float pc = __fmaf_rn(__fmaf_rn(2.4433157e-5f, z, -1.3887316e-3f), z, 4.1666646e-2f);
    const float c = __fmaf_rn(pc, __fmul_rn(z, z), __fmaf_rn(-0.5f, z, 1.f));
    switch (k & 3u) {
        case 0: *sin_out = s; *cos_out = c; break;
        case 1: *sin_out = c; *cos_out = -s; break;
        case 2: *sin_out = -s; *cos_out = -c; break;
        default: *sin_out = -c; *cos_out = s; break;
    }
}

// (r cos, r sin) from two words: CPU twin box_muller.
__device__ __forceinline__ void box_muller(unsigned a, unsigned b, float* z0, float* z1) {
    const float u1 = __fmul_rn((float)((a >> 8) + 1u), 1.f / 16777216.f);
    const float r = __fsqrt_rn(__fmul_rn(-2.f, noise_ln(u1)));
    float s, c;
    noise_sincos_turn(b >> 8, &s, &c);
    *z0 = __fmul_rn(r, c);
    *z1 = __fmul_rn(r, s);
}

// A limb: truncated to an integer, clamped to 0..=65535, NaN as 0 (openuni_graph::seed::from_limbs).
__device__ __forceinline__ unsigned seed_limb(float v) { return (unsigned)fminf(fmaxf(v, 0.f), 65535.f); }

template <typename T>
__device__ __forceinline__ void gaussian_noise(const float* seeds, T* out, i64 n_seeds, i64 per_seed) {
    const i64 groups = (per_seed + 3) / 4;
    for (i64 e = misc_thread(); e < n_seeds * groups; e += misc_threads()) {
        const i64 i = e / groups, g = e - i * groups;
        const float* l = seeds + 4 * i;
        const unsigned k0 = seed_limb(l[0]) | (seed_limb(l[1]) << 16), k1 = seed_limb(l[2]) | (seed_limb(l[3]) << 16);
        unsigned c[4] = {(unsigned)g, (unsigned)((unsigned long long)g >> 32), 0u, 0u};
        philox4x32_10(c, k0, k1);
        float z[4];
        box_muller(c[0], c[1], &z[0], &z[1]);
        box_muller(c[2], c[3], &z[2], &z[3]);
        T* o = out + i * per_seed + 4 * g;
        const i64 left = per_seed - 4 * g;
        for (int q = 0; q < 4 && q < left; ++q) o[q] = from_f32<T>(z[q]);
    }
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

extern "C" __global__ void embedding_gather_f32(const float* ids, const float* table, const float* extra, float* out, i64 tokens, int d,
                                                i64 v, i64 e) {
    ou::embedding_gather<float>(ids, table, extra, out, tokens, d, v, e);
}
extern "C" __global__ void embedding_gather_bf16(const float* ids, const bf16* table, const bf16* extra, bf16* out, i64 tokens, int d,
                                                 i64 v, i64 e) {
    ou::embedding_gather<bf16>(ids, table, extra, out, tokens, d, v, e);
}

extern "C" __global__ void quantize_u8_f32(const float* x, float* out, int batch, i64 pixels) { ou::quantize_u8<float>(x, out, batch, pixels); }
extern "C" __global__ void quantize_u8_bf16(const bf16* x, bf16* out, int batch, i64 pixels) { ou::quantize_u8<bf16>(x, out, batch, pixels); }

extern "C" __global__ void any_nonfinite_f32(const float* x, i64 n, unsigned* flag) { ou::any_nonfinite<float>(x, n, flag); }
extern "C" __global__ void any_nonfinite_bf16(const bf16* x, i64 n, unsigned* flag) { ou::any_nonfinite<bf16>(x, n, flag); }
extern "C" __global__ void any_nonfinite_finish_f32(unsigned* flag, float* out) { ou::any_nonfinite_finish<float>(flag, out); }
extern "C" __global__ void any_nonfinite_finish_bf16(unsigned* flag, bf16* out) { ou::any_nonfinite_finish<bf16>(flag, out); }

extern "C" __global__ void guided_x0_f32(const float* v, const float* x, const float* k, float* out, i64 n) { ou::guided_x0<float>(v, x, k, out, n); }
extern "C" __global__ void guided_x0_bf16(const bf16* v, const bf16* x, const float* k, bf16* out, i64 n) { ou::guided_x0<bf16>(v, x, k, out, n); }
extern "C" __global__ void dpm_solver_update_f32(const float* x, const float* x0, const float* prev, const float* k, float* out, i64 n) {
    ou::dpm_solver_update<float>(x, x0, prev, k, out, n);
}
extern "C" __global__ void dpm_solver_update_bf16(const bf16* x, const bf16* x0, const bf16* prev, const float* k, bf16* out, i64 n) {
    ou::dpm_solver_update<bf16>(x, x0, prev, k, out, n);
}
extern "C" __global__ void div_scalar_f32(const float* x, float* y, float d, i64 n) { ou::div_scalar<float>(x, y, d, n); }
extern "C" __global__ void div_scalar_bf16(const bf16* x, bf16* y, float d, i64 n) { ou::div_scalar<bf16>(x, y, d, n); }
extern "C" __global__ void gaussian_noise_f32(const float* seeds, float* out, i64 n_seeds, i64 per_seed) {
    ou::gaussian_noise<float>(seeds, out, n_seeds, per_seed);
}
extern "C" __global__ void gaussian_noise_bf16(const float* seeds, bf16* out, i64 n_seeds, i64 per_seed) {
    ou::gaussian_noise<bf16>(seeds, out, n_seeds, per_seed);
}
