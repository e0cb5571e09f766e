// decode_attention.cu: the decode phase of an LLM over a KV cache. CPU twins:
// openuni_cpu::ops::{decode_attention, kv_cache_append, kv_cache_rows}.
//
//   decode_attention_{f32,bf16}(q, k_cache, v_cache, positions, rope_cs, partial, B, heads, kv_heads,
//       max_len, hd, scale, smem_bytes)
//   decode_attention_merge_{f32,bf16}(partial, positions, out, B, heads, max_len, hd)
//   kv_cache_append_{f32,bf16}(x, positions, rope_cs, cache, B, kv_heads, max_len, hd)
//   kv_cache_rows_{f32,bf16}(x, rope_cs, out, B, tokens, kv_heads, hd)
//
//   q [B, heads*hd], caches [B, kv_heads, max_len, hd], out [B, heads*hd] in the storage type;
//   positions [B] f32 (the f32 copy of the graph input, so positions above 256 are exact in bf16
//   storage): p_b, the new token's position, read as (int) and clamped to [0, max_len) exactly as
//   openuni_cpu::ops::decode_position. Query head h of sequence b attends keys [0, p_b] of KV head
//   h / (heads / kv_heads); softmax in f32 with `scale`. rope_cs (or null): the (cos, sin) table of
//   attention.cu's fused RoPE, [max_len][hd/2][2], built on the host as the CPU twin computes it;
//   with it q is rotated (rotate_half) at position p_b.
//
// Flash-decoding (split-K): one query row per (sequence, head) is far too little work for one CTA
// per head on a GPU with 132 SMs, and a single CTA streaming a long cache is latency-bound. So the
// keys are split into chunks of CHUNK keys:
//   pass 1, decode_attention_*: grid (ceil(max_len / CHUNK), B * kv_heads), 128 threads. A CTA
//     takes one chunk of one (sequence, KV head) and all G = heads / kv_heads query heads that
//     share it (GQA without repeating K/V: each K and V row is read from DRAM once per step).
//     Chunks past p_b exit at once (the grid is fixed by max_len, so the launch is the same every
//     step and can be replayed as a CUDA graph). It writes, per query head, the chunk's running
//     maximum m_c, its sum l_c = sum exp(s - m_c) and the unnormalised O_c = sum exp(s - m_c) v to
//     the f32 workspace `partial` [B, heads, n_chunks, hd + 2].
//   pass 2, decode_attention_merge_*: grid (B * heads), 128 threads: the log-sum-exp merge over the
//     ceil((p_b + 1) / CHUNK) chunks of the sequence: M = max m_c, out = sum e^(m_c - M) O_c /
//     sum e^(m_c - M) l_c.
// Pass 1 inside a CTA: q (G rows, rotated) goes to shared memory as f32. Scores: each warp takes
// keys warp, warp + 4, ...; a lane holds dims lane, lane + 32, ... of the key (coalesced across the
// warp) and the G dot products are reduced by warp shuffles into the shared score rows S [G][CHUNK]
// (scaled; the chunk's keys past p_b are never computed). Then one warp per query head turns its
// score row into exp(s - m_c) and l_c. Then O_c: thread t owns dims t and t + 128 and walks the
// chunk's V rows (coalesced across threads), G accumulators per dim.
// Limits (checked by the launcher): hd <= 256, G <= 16. Dynamic shared memory = (G * hd + G * CHUNK)
// floats (smem_bytes in crates/cuda/src/families/decode_attention.rs), checked here.
//
// kv_cache_append_*: one thread per (b, KV head, dim) of the new rows, grid-stride: writes x (rotated
// at p_b with rope_cs: out[i] = x1 c - x2 s, out[i + hd/2] = x2 c + x1 s, the CPU twin's rope_at)
// into row p_b of the cache, in place. The graph op (`Op::KvCacheAppend`, a new value) first copies
// the cache with misc.cu's strided_copy_*; a decoder that owns its cache launches the append alone.
//
// History: version 1 (this one), SIMT f32, scalar loads. Not yet done (measure on a GPU first):
// 16-byte K/V loads with cp.async double buffering, splitting the O_c pass over key halves for
// hd 64 (half the threads are idle there), a chunk size picked from B * kv_heads and the SM count.

#include "common.cuh"

namespace ou {
namespace dec {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
constexpr int CHUNK = 256;     // keys per CTA of pass 1 (CHUNK in the launcher)
constexpr int MAX_HD = 256;    // dims per lane: MAX_HD / 32
constexpr int MAX_GROUP = 16;  // query heads per KV head
#define NEG_INF __uint_as_float(0xff800000u)

__device__ __forceinline__ int position(const float* positions, int b, int max_len) {
    const float p = positions[b];
    if (!(p >= 0.f)) return 0;  // negative or NaN
    return p >= (float)(max_len - 1) ? max_len - 1 : (int)p;
}

__device__ __forceinline__ float* dyn_smem() {
    extern __shared__ __align__(16) unsigned char ou_dec_smem[];
    return reinterpret_cast<float*>(ou_dec_smem);
}

template <typename T>
__device__ void decode_pass1(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                             const float* __restrict__ positions, const float* __restrict__ rope_cs,
                             float* __restrict__ partial, int heads, int kv_heads, int max_len, int hd,
                             float scale, int smem_bytes) {
    const int G = heads / kv_heads;
    if (smem_bytes < (G * hd + G * CHUNK) * (int)sizeof(float)) __trap();
    const int chunk = blockIdx.x;
    const int b = blockIdx.y / kv_heads, kvh = blockIdx.y % kv_heads;
    const int p = position(positions, b, max_len);
    const int j0 = chunk * CHUNK;
    if (j0 > p) return;  // the whole CTA: no barrier is reached by anyone
    const int n = min(CHUNK, p + 1 - j0);
    const int n_chunks = (max_len + CHUNK - 1) / CHUNK;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float* qs = dyn_smem();       // [G][hd]
    float* S = qs + G * hd;       // [G][CHUNK]

    // q of the group's heads, rotated at p (rotate_half: dims i and i + hd/2 with angle i).
    const int half = hd / 2;
    for (int e = tid; e < G * hd; e += THREADS) {
        const int g = e / hd, d = e % hd;
        const T* qh = q + ((i64)b * heads + (i64)kvh * G + g) * hd;
        float v = to_f32(qh[d]);
        if (rope_cs) {
            const int i = d < half ? d : d - half;
            const float c = rope_cs[((i64)p * half + i) * 2], s = rope_cs[((i64)p * half + i) * 2 + 1];
            v = d < half ? v * c - to_f32(qh[d + half]) * s : v * c + to_f32(qh[i]) * s;
        }
        qs[e] = v;
    }
    __syncthreads();

    const i64 cache_base = ((i64)b * kv_heads + kvh) * max_len * hd;
    // Scores: one key per warp at a time, dims split over the lanes.
    for (int j = warp; j < n; j += WARPS) {
        const T* kr = kc + cache_base + (i64)(j0 + j) * hd;
        float kv[MAX_HD / 32];
#pragma unroll
        for (int r = 0; r < MAX_HD / 32; ++r) {
            const int d = lane + 32 * r;
            kv[r] = d < hd ? to_f32(kr[d]) : 0.f;
        }
        for (int g = 0; g < G; ++g) {
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < MAX_HD / 32; ++r) {
                const int d = lane + 32 * r;
                if (d < hd) acc += qs[g * hd + d] * kv[r];
            }
            acc = warp_sum(acc, 32);
            if (lane == 0) S[g * CHUNK + j] = acc * scale;
        }
    }
    __syncthreads();

    // Per query head: chunk maximum, exp(s - m) in place, sum.
    float* part_b = partial + ((i64)b * heads + (i64)kvh * G) * n_chunks * (hd + 2);
    for (int g = warp; g < G; g += WARPS) {
        float m = NEG_INF;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, S[g * CHUNK + j]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        float l = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float e = expf(S[g * CHUNK + j] - m);
            S[g * CHUNK + j] = e;
            l += e;
        }
        l = warp_sum(l, 32);
        if (lane == 0) {
            float* rec = part_b + ((i64)g * n_chunks + chunk) * (hd + 2);
            rec[hd] = m;
            rec[hd + 1] = l;
        }
    }
    __syncthreads();

    // O_c = sum_j e_j v_j: thread t owns dims t and t + 128.
    float acc[2][MAX_GROUP];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) acc[r][g] = 0.f;
    for (int j = 0; j < n; ++j) {
        const T* vr = vc + cache_base + (i64)(j0 + j) * hd;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int d = tid + THREADS * r;
            if (d < hd) {
                const float vv = to_f32(vr[d]);
#pragma unroll
                for (int g = 0; g < MAX_GROUP; ++g)
                    if (g < G) acc[r][g] += S[g * CHUNK + j] * vv;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int d = tid + THREADS * r;
        if (d < hd) {
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g)
                if (g < G) part_b[((i64)g * n_chunks + chunk) * (hd + 2) + d] = acc[r][g];
        }
    }
}

template <typename T>
__device__ void decode_merge(const float* __restrict__ partial, const float* __restrict__ positions,
                             T* __restrict__ out, int heads, int max_len, int hd) {
    const int b = blockIdx.x / heads;
    const int p = position(positions, b, max_len);
    const int n_chunks = (max_len + CHUNK - 1) / CHUNK;
    const int used = p / CHUNK + 1;
    const float* rec = partial + (i64)blockIdx.x * n_chunks * (hd + 2);
    // Every thread computes M and the denominator itself (used is small): no shared memory.
    float M = NEG_INF;
    for (int c = 0; c < used; ++c) M = fmaxf(M, rec[(i64)c * (hd + 2) + hd]);
    float den = 0.f;
    for (int c = 0; c < used; ++c) den += expf(rec[(i64)c * (hd + 2) + hd] - M) * rec[(i64)c * (hd + 2) + hd + 1];
    for (int d = threadIdx.x; d < hd; d += THREADS) {
        float num = 0.f;
        for (int c = 0; c < used; ++c) num += expf(rec[(i64)c * (hd + 2) + hd] - M) * rec[(i64)c * (hd + 2) + d];
        out[(i64)blockIdx.x * hd + d] = from_f32<T>(num / den);
    }
}

template <typename T>
__device__ void append(const T* __restrict__ x, const float* __restrict__ positions, const float* __restrict__ rope_cs,
                       T* __restrict__ cache, int B, int kv_heads, int max_len, int hd) {
    const i64 total = (i64)B * kv_heads * hd;
    const int half = hd / 2;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 row = e / hd;  // b * kv_heads + h
        const int d = (int)(e % hd);
        const int b = (int)(row / kv_heads);
        const int p = position(positions, b, max_len);
        const T* xr = x + row * hd;
        float v = to_f32(xr[d]);
        if (rope_cs) {
            const int i = d < half ? d : d - half;
            const float c = rope_cs[((i64)p * half + i) * 2], s = rope_cs[((i64)p * half + i) * 2 + 1];
            v = d < half ? v * c - to_f32(xr[d + half]) * s : v * c + to_f32(xr[i]) * s;
        }
        cache[(row * max_len + p) * hd + d] = from_f32<T>(v);
    }
}

// kv_cache_rows_*: one thread per element of the prompt x [B, T, kv_heads, hd], grid-stride in x's
// order (coalesced reads), written to out [B, kv_heads, T, hd] (runs of hd contiguous), token t
// rotated at position t with rope_cs (T positions) exactly as append rotates the token at p = t.
template <typename T>
__device__ void cache_rows(const T* __restrict__ x, const float* __restrict__ rope_cs, T* __restrict__ out,
                           int B, int tokens, int kv_heads, int hd) {
    const i64 total = (i64)B * tokens * kv_heads * hd;
    const int half = hd / 2;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 row = e / hd;  // (b * tokens + t) * kv_heads + h
        const int d = (int)(e % hd);
        const int h = (int)(row % kv_heads);
        const i64 bt = row / kv_heads;
        const int t = (int)(bt % tokens);
        const i64 b = bt / tokens;
        const T* xr = x + row * hd;
        float v = to_f32(xr[d]);
        if (rope_cs) {
            const int i = d < half ? d : d - half;
            const float c = rope_cs[((i64)t * half + i) * 2], s = rope_cs[((i64)t * half + i) * 2 + 1];
            v = d < half ? v * c - to_f32(xr[d + half]) * s : v * c + to_f32(xr[i]) * s;
        }
        out[((b * kv_heads + h) * tokens + t) * hd + d] = from_f32<T>(v);
    }
}

}  // namespace dec
}  // namespace ou

using ou::bf16;

extern "C" __global__ void decode_attention_f32(const float* q, const float* k_cache, const float* v_cache, const float* positions, const float* rope_cs, float* partial, int B, int heads, int kv_heads, int max_len, int hd, float scale, int smem_bytes) {
    (void)B;
    ou::dec::decode_pass1<float>(q, k_cache, v_cache, positions, rope_cs, partial, heads, kv_heads, max_len, hd, scale, smem_bytes);
}
extern "C" __global__ void decode_attention_merge_f32(const float* partial, const float* positions, float* out, int B, int heads, int max_len, int hd) {
    (void)B;
    ou::dec::decode_merge<float>(partial, positions, out, heads, max_len, hd);
}
extern "C" __global__ void kv_cache_append_f32(const float* x, const float* positions, const float* rope_cs, float* cache, int B, int kv_heads, int max_len, int hd) {
    ou::dec::append<float>(x, positions, rope_cs, cache, B, kv_heads, max_len, hd);
}

extern "C" __global__ void decode_attention_bf16(const bf16* q, const bf16* k_cache, const bf16* v_cache, const float* positions, const float* rope_cs, float* partial, int B, int heads, int kv_heads, int max_len, int hd, float scale, int smem_bytes) {
    (void)B;
    ou::dec::decode_pass1<bf16>(q, k_cache, v_cache, positions, rope_cs, partial, heads, kv_heads, max_len, hd, scale, smem_bytes);
}
extern "C" __global__ void decode_attention_merge_bf16(const float* partial, const float* positions, bf16* out, int B, int heads, int max_len, int hd) {
    (void)B;
    ou::dec::decode_merge<bf16>(partial, positions, out, heads, max_len, hd);
}
extern "C" __global__ void kv_cache_append_bf16(const bf16* x, const float* positions, const float* rope_cs, bf16* cache, int B, int kv_heads, int max_len, int hd) {
    ou::dec::append<bf16>(x, positions, rope_cs, cache, B, kv_heads, max_len, hd);
}
extern "C" __global__ void kv_cache_rows_f32(const float* x, const float* rope_cs, float* out, int B, int tokens, int kv_heads, int hd) {
    ou::dec::cache_rows<float>(x, rope_cs, out, B, tokens, kv_heads, hd);
}
extern "C" __global__ void kv_cache_rows_bf16(const bf16* x, const float* rope_cs, bf16* out, int B, int tokens, int kv_heads, int hd) {
    ou::dec::cache_rows<bf16>(x, rope_cs, out, B, tokens, kv_heads, hd);
}
