// linear_attention.cu: SANA's ReLU linear attention (Op::LinearAttention) and DC-AE's packed variant
// (Op::PackedLinearAttention). CPU twins: openuni_cpu::ops::{linear_attention, packed_linear_attention}.
//
// Per batch b and head h (head_dim HD), all in f32:
//     KV   = sum_m relu(k_m) v_m^T      (HD x HD, KV[i][j] = sum_m relu(k_m[i]) v_m[j])
//     ksum = sum_m relu(k_m)            (HD)
//     out_n = (KV^T relu(q_n)) / (ksum . relu(q_n) + 1e-15)
// which is diffusers' "pad v with a row of ones, (v_pad k^T) q, divide by the last row + 1e-15".
//
// Both ops use the same kernels: element (b, n, head h, channel i) of q, k, v is at
// ptr[(b * N + n) * row_stride + h * head_stride + i], so SANA passes three tensors with row_stride = heads * HD,
// head_stride = HD, and DC-AE passes qkv, qkv + HD, qkv + 2 HD with row_stride = groups * 3 HD,
// head_stride = 3 HD. The output is [B, N, heads * HD] (out_row_stride = heads * HD, head stride HD).
//
// Two kernels per (dtype, HD), launched back to back (openuni_cuda::families::linear_attention):
//
//   linear_attention_state_<dtype>_hd<HD>(k, v, partial, state, counters, n_tokens, row_stride, head_stride,
//                                         chunk_len, chunks)
//       grid (chunks, heads, B), 128 threads. CTA (c, h, b) reduces tokens [c * chunk_len, (c+1) * chunk_len)
//       of head (b, h) to S = HD*HD + HD floats (KV row-major, then ksum). With one chunk it writes `state`
//       [B*heads][S] directly. With several, each CTA writes its slot of `partial` [B*heads][chunks][S], and
//       the last CTA of the head to finish (counted with an acquire-release atomic on `counters` [B*heads],
//       kernels/include/atomics.cuh; zero before the launch, reset to zero by that CTA) sums the chunks'
//       partials in chunk order into `state`: the result
//       is deterministic, and k and v are read once.
//   linear_attention_apply_<dtype>_hd<HD>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride)
//       grid (ceil(N / 128), heads, B), 128 threads: each CTA applies its head's state to 128 tokens of q.
//       q is read once and out written once.
//
// Key norm (Op::PackedLinearAttention's key_norm, SANA1.5's norm_k, CPU twin
// openuni_cpu::ops::packed_linear_attention_key_norm): the keys are RMS-normalised across all heads,
// k_hat = k * rstd_n * w[h * HD + i] with rstd_n = 1 / sqrt(mean over the token's heads * HD channels + eps),
// applied where the state kernel loads k (rounded to the storage type as the unfused norm's output is,
// then relu), so the normalised keys are never stored. rstd needs the whole row, which no state CTA (one
// head) sees, so a third launch comes first:
//   linear_attention_key_rms_<dtype>(k, rstd, rows, heads, head_dim, row_stride, head_stride, eps)
//       one warp per token row (B * N rows, 4 per CTA of 128 threads) writes rstd[row] (f32). It reads k
//       once; the state kernel then reads k and rstd instead of a stored normalised copy.
// The state kernels take key_w (the norm weight, heads * HD) and key_rstd; both null: no key norm.
//
// HD is a template parameter: 2, 8, 16 and 32 are compiled (32 is every real model; 8 and 2 appear in the
// test fixtures). The launcher refuses other head dims with a message naming this file.
//
// Version 1 (this one):
// - bf16, HD = 32 (SANA and the real DC-AE): tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate).
//   State: per 16-token step a warp computes KV^T's 32x32 block as Kt(32x16) * V(16x32) plus ksum as
//   Kt * (a column of ones): 10 mma. relu(k) and v are bf16, so every product is exact and the sums are f32
//   as in the FMA version. Apply: out = Q(16x32) * [KV | ksum] with the f32 state split into two bf16
//   terms (hi = bf16(x), lo = bf16(x - hi), 16 significant bits, relative error < 2^-16, far below the bf16
//   rounding of the output), 20 mma per 16 tokens; the denominator is the 33rd column. This keeps the
//   kernel memory bound: with FMAs the 2 x 1024 multiply-adds per token and head cost about as much time as
//   the H100 needs to stream the bf16 tensors.
// - f32 storage and HD < 32: CUDA-core FMAs. State: each thread owns a 4x4 (HD 2: 2x2) block of KV for a
//   group of tokens, reading relu(k) and v rows from shared memory; the groups' blocks are summed in shared
//   memory. Apply: HD threads per token, thread j keeps column j of KV in registers, q rows are broadcast
//   from shared memory, the denominator is a shuffle sum over the HD threads.
// - Tokens are staged through shared memory in tiles of 64 (state) / 128 (apply) rows; rows past N are
//   zero (they add nothing to the state) and are not stored. Global accesses are 16-byte vectors when the
//   pointers and strides allow it (always in the planner's arena), else scalars (checked at run time).
// - The state kernel prefetches the next tile into registers while the tensor cores work on the current
//   one (bf16 HD 32 path).
// - chunk_len and chunks are chosen by the launcher from the SM count (enough CTAs to fill the GPU without
//   making the partial states a noticeable share of the traffic); any values with chunks * chunk_len >= N
//   and chunk_len a multiple of 64 are correct.

#include "atomics.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace ou {

constexpr int LA_THREADS = 128;
constexpr int LA_STATE_TILE = 64;   // tokens per shared-memory tile in the state kernels
constexpr int LA_APPLY_TILE = 128;  // tokens per CTA in the apply kernels
constexpr float LA_EPS = 1e-15f;

template <int HD> struct LaState {
    static constexpr int S = HD * HD + HD;  // KV row-major, then ksum
};

// ---- shared helpers ----------------------------------------------------------------------------------------

// The CTA's state is the sum of `parts` partial states of S floats in shared memory (`red`). Writes it to
// `state` (one chunk) or to this chunk's slot of `partial`; with several chunks the last CTA of the head sums
// every chunk's partial, in chunk order, into `state` and resets the head's counter. Every thread calls it.
template <int S>
__device__ __forceinline__ void la_finish(const float* red, int parts, float* partial, float* state,
                                          unsigned* counters, int chunks) {
    __shared__ unsigned la_last;
    const i64 head = (i64)blockIdx.z * gridDim.y + blockIdx.y;
    float* dst = chunks == 1 ? state + head * S : partial + (head * chunks + blockIdx.x) * S;
    for (int e = threadIdx.x; e < S; e += blockDim.x) {
        float s = 0.f;
        for (int p = 0; p < parts; ++p) s += red[p * S + e];
        dst[e] = s;
    }
    if (chunks == 1) return;  // the same for the whole grid
    // Hand-off between CTAs: every thread's partial writes come before the barrier, thread 0's
    // acquire-release add comes after it (release: the CTA's partial is visible to the CTA that
    // acquires a later count); the last CTA's add acquires every earlier release, and the barrier
    // after it extends that to all its threads (the PTX memory model's causality order is transitive
    // through bar.sync). The partials are then read through L2 (__ldcg), never from a stale L1 line.
    __syncthreads();
    if (threadIdx.x == 0)
        la_last = atomic_add_acq_rel_gpu(counters + head, 1u) == (unsigned)(chunks - 1) ? 1u : 0u;
    __syncthreads();
    if (!la_last) return;
    const float* src = partial + head * chunks * S;
    for (int e = threadIdx.x; e < S; e += blockDim.x) {
        float s = 0.f;
        for (int c = 0; c < chunks; ++c) s += __ldcg(src + (i64)c * S + e);
        state[head * S + e] = s;
    }
    if (threadIdx.x == 0) counters[head] = 0u;  // ready for the next launch (and graph replays)
}

// Loads rows [0, rows) of one head (HD elements each, row r at base + r * rs) into tile[rows][HD] as f32,
// relu'd if RELU; rows at or past `valid` are zero. `vec`: 16-byte vectors are allowed (base and rs aligned).
template <typename T, int HD, bool RELU>
__device__ __forceinline__ void la_load_tile(const T* base, i64 rs, int valid, int rows, float* tile, bool vec) {
    constexpr int V = Vec16<T>::N;
    if constexpr (HD % V == 0) {
        if (vec) {
            constexpr int PER_ROW = HD / V;
            for (int idx = threadIdx.x; idx < rows * PER_ROW; idx += blockDim.x) {
                const int r = idx / PER_ROW, c = (idx % PER_ROW) * V;
                float x[V];
                if (r < valid) {
                    load_vec<T>(base + r * rs + c, x);
                } else {
#pragma unroll
                    for (int j = 0; j < V; ++j) x[j] = 0.f;
                }
#pragma unroll
                for (int j = 0; j < V; ++j) tile[r * HD + c + j] = RELU ? fmaxf(x[j], 0.f) : x[j];
            }
            return;
        }
    }
    for (int idx = threadIdx.x; idx < rows * HD; idx += blockDim.x) {
        const int r = idx / HD, c = idx % HD;
        const float x = r < valid ? to_f32(base[r * rs + c]) : 0.f;
        tile[idx] = RELU ? fmaxf(x, 0.f) : x;
    }
}

// The key norm on a tile loaded without relu: tile[r][c] = relu(round_T(tile[r][c] * rstd[r] * w[c])) for
// the `valid` rows (the others stay zero), `w` this head's HD weights, `rstd` the tile's first token's.
template <typename T, int HD>
__device__ __forceinline__ void la_norm_keys(float* tile, int valid, const T* w, const float* rstd) {
    for (int idx = threadIdx.x; idx < valid * HD; idx += blockDim.x) {
        const int r = idx / HD, c = idx % HD;
        tile[idx] = fmaxf(to_f32(from_f32<T>(tile[idx] * rstd[r] * to_f32(w[c]))), 0.f);
    }
}

// R consecutive floats of shared memory (16-byte aligned when R == 4).
template <int R>
__device__ __forceinline__ void la_row(const float* p, float (&v)[R]) {
    if constexpr (R == 4) {
        const float4 f = *reinterpret_cast<const float4*>(p);
        v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
#pragma unroll
        for (int i = 0; i < R; ++i) v[i] = p[i];
    }
}

// ---- FMA version (f32 storage, any HD) -----------------------------------------------------------------------

template <typename T, int HD>
__device__ __forceinline__ void la_state_fma(const T* k, const T* v, float* partial, float* state, unsigned* counters,
                                             int n_tokens, int rs, int hs, int chunk_len, int chunks, const T* key_w,
                                             const float* key_rstd) {
    constexpr int S = LaState<HD>::S;
    constexpr int RB = HD >= 4 ? 4 : HD;  // each thread owns an RB x RB block of KV
    constexpr int NB = HD / RB;
    constexpr int TPG = NB * NB;          // threads per token group
    constexpr int G = LA_THREADS / TPG;   // token groups
    constexpr int TILE = LA_STATE_TILE;
    static_assert(HD % RB == 0 && LA_THREADS % TPG == 0, "head dim");
    __shared__ __align__(16) float ks[TILE * HD];
    __shared__ __align__(16) float vs[TILE * HD];
    __shared__ float red[G * S];

    const int t = threadIdx.x, grp = t / TPG, e = t % TPG, ib = e / NB, jb = e % NB;
    const int n0 = blockIdx.x * chunk_len, n1 = min(n_tokens, n0 + chunk_len);
    const i64 head0 = (i64)blockIdx.z * n_tokens * rs + (i64)blockIdx.y * hs;
    constexpr int V = Vec16<T>::N;
    const bool vec = aligned16(k) && aligned16(v) && rs % V == 0 && hs % V == 0;

    float acc[RB][RB], ksum[RB];
#pragma unroll
    for (int a = 0; a < RB; ++a) {
        ksum[a] = 0.f;
#pragma unroll
        for (int c = 0; c < RB; ++c) acc[a][c] = 0.f;
    }
    for (int m0 = n0; m0 < n1; m0 += TILE) {
        const int rows = min(TILE, n1 - m0);
        __syncthreads();  // the previous tile has been consumed
        if (key_rstd) {
            la_load_tile<T, HD, false>(k + head0 + (i64)m0 * rs, rs, rows, TILE, ks, vec);
            __syncthreads();  // the loader's thread-to-element map is not the norm's
            la_norm_keys<T, HD>(ks, rows, key_w + blockIdx.y * HD, key_rstd + (i64)blockIdx.z * n_tokens + m0);
        } else {
            la_load_tile<T, HD, true>(k + head0 + (i64)m0 * rs, rs, rows, TILE, ks, vec);
        }
        la_load_tile<T, HD, false>(v + head0 + (i64)m0 * rs, rs, rows, TILE, vs, vec);
        __syncthreads();
        for (int m = grp; m < rows; m += G) {
            float kr[RB], vr[RB];
            la_row<RB>(ks + m * HD + ib * RB, kr);
            la_row<RB>(vs + m * HD + jb * RB, vr);
#pragma unroll
            for (int a = 0; a < RB; ++a) {
                ksum[a] += kr[a];
#pragma unroll
                for (int c = 0; c < RB; ++c) acc[a][c] += kr[a] * vr[c];
            }
        }
    }
    float* mine = red + grp * S;
#pragma unroll
    for (int a = 0; a < RB; ++a) {
#pragma unroll
        for (int c = 0; c < RB; ++c) mine[(ib * RB + a) * HD + jb * RB + c] = acc[a][c];
        if (jb == 0) mine[HD * HD + ib * RB + a] = ksum[a];
    }
    __syncthreads();
    la_finish<S>(red, G, partial, state, counters, chunks);
}

template <typename T, int HD>
__device__ __forceinline__ void la_apply_fma(const T* q, const float* state, T* out, int n_tokens, int rs, int hs,
                                             int ors) {
    constexpr int S = LaState<HD>::S;
    constexpr int TILE = LA_APPLY_TILE;
    constexpr int P = LA_THREADS / HD;  // tokens per pass
    static_assert(TILE % P == 0, "every thread makes the same number of passes (shuffles inside)");
    __shared__ float st[S];
    __shared__ __align__(16) float qs[TILE * HD];

    const int b = blockIdx.z, h = blockIdx.y, n0 = blockIdx.x * TILE;
    const i64 head = (i64)b * gridDim.y + h;
    constexpr int V = Vec16<T>::N;
    const bool vec = aligned16(q) && rs % V == 0 && hs % V == 0;
    for (int e = threadIdx.x; e < S; e += blockDim.x) st[e] = state[head * S + e];
    const T* qb = q + ((i64)b * n_tokens + n0) * rs + (i64)h * hs;
    la_load_tile<T, HD, true>(qb, rs, min(TILE, n_tokens - n0), TILE, qs, vec);
    __syncthreads();

    const int j = threadIdx.x % HD, slot = threadIdx.x / HD;
    float col[HD];
#pragma unroll
    for (int i = 0; i < HD; ++i) col[i] = st[i * HD + j];
    const float kj = st[HD * HD + j];
    T* ob = out + ((i64)b * n_tokens + n0) * ors + (i64)h * HD + j;
    for (int n = slot; n < TILE; n += P) {
        const float* qr = qs + n * HD;
        float num = 0.f;
        if constexpr (HD % 4 == 0) {
#pragma unroll
            for (int i = 0; i < HD; i += 4) {
                float x[4];
                la_row<4>(qr + i, x);
                num += x[0] * col[i] + x[1] * col[i + 1] + x[2] * col[i + 2] + x[3] * col[i + 3];
            }
        } else {
#pragma unroll
            for (int i = 0; i < HD; ++i) num += qr[i] * col[i];
        }
        const float den = warp_sum(qr[j] * kj, HD);
        if (n0 + n < n_tokens) ob[(i64)n * ors] = from_f32<T>(num / (den + LA_EPS));
    }
}

// ---- tensor-core version (bf16, HD = 32) -----------------------------------------------------------------------

constexpr int LA_LD = 40;  // shared-memory row pitch in bf16 (80 bytes): the 8 rows of an ldmatrix hit distinct banks

union LaPack2 {
    unsigned u;
    unsigned short s[2];
};

__device__ __forceinline__ unsigned short la_bits(bf16 x) {
    union {
        bf16 h;
        unsigned short s;
    } c;
    c.h = x;
    return c.s;
}

// Two f32 values as a bf16x2 register (lo in the low half), rounded to nearest even.
__device__ __forceinline__ unsigned la_pack(float lo, float hi) {
    LaPack2 p;
    p.s[0] = la_bits(__float2bfloat16_rn(lo));
    p.s[1] = la_bits(__float2bfloat16_rn(hi));
    return p.u;
}

// x ~= hi + lo with hi = bf16(x), lo = bf16(x - hi), for a pair of values packed as two bf16x2 registers.
__device__ __forceinline__ void la_split(float x0, float x1, unsigned& hi, unsigned& lo) {
    const bf16 h0 = __float2bfloat16_rn(x0), h1 = __float2bfloat16_rn(x1);
    LaPack2 p;
    p.s[0] = la_bits(h0);
    p.s[1] = la_bits(h1);
    hi = p.u;
    lo = la_pack(x0 - __bfloat162float(h0), x1 - __bfloat162float(h1));
}

// relu on both bf16 halves of a register: clear the halves whose sign bit is set.
__device__ __forceinline__ unsigned la_relu2(unsigned w) {
    const unsigned m = ((w >> 15) & 0x00010001u) * 0xFFFFu;
    return w & ~m;
}

__device__ __forceinline__ uint4 la_relu8(uint4 x) {
    x.x = la_relu2(x.x), x.y = la_relu2(x.y), x.z = la_relu2(x.z), x.w = la_relu2(x.w);
    return x;
}

// 8 consecutive bf16 (one 16-byte vector when `vec`, else 8 scalar loads); zero when !valid.
__device__ __forceinline__ uint4 la_load8(const bf16* p, bool valid, bool vec) {
    if (!valid) return make_uint4(0u, 0u, 0u, 0u);
    if (vec) return *reinterpret_cast<const uint4*>(p);
    Pack16<bf16> pk;
#pragma unroll
    for (int i = 0; i < 8; ++i) pk.e[i] = p[i];
    return pk.raw;
}

__device__ __forceinline__ void la_store8(bf16* p, uint4 x, bool vec) {
    if (vec) {
        *reinterpret_cast<uint4*>(p) = x;
        return;
    }
    Pack16<bf16> pk;
    pk.raw = x;
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = pk.e[i];
}

// The key norm on 8 bf16 keys of one token: bf16(k * rstd * w) (then relu by the caller).
__device__ __forceinline__ uint4 la_norm8(uint4 x, const float (&w)[8], float rstd) {
    Pack16<bf16> pk;
    pk.raw = x;
#pragma unroll
    for (int i = 0; i < 8; ++i) pk.e[i] = __float2bfloat16_rn(__bfloat162float(pk.e[i]) * rstd * w[i]);
    return pk.raw;
}

__device__ __forceinline__ void la_state_mma32(const bf16* k, const bf16* v, float* partial, float* state,
                                               unsigned* counters, int n_tokens, int rs, int hs, int chunk_len,
                                               int chunks, const bf16* key_w, const float* key_rstd) {
    constexpr int HD = 32, S = LaState<HD>::S, TILE = LA_STATE_TILE, LD = LA_LD;
    __shared__ __align__(16) bf16 ks[TILE * LD];
    __shared__ __align__(16) bf16 vs[TILE * LD];
    __shared__ float red[4 * S];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int n0 = blockIdx.x * chunk_len, n1 = min(n_tokens, n0 + chunk_len);
    const i64 head0 = (i64)blockIdx.z * n_tokens * rs + (i64)blockIdx.y * hs;
    const bool vec = aligned16(k) && aligned16(v) && rs % 8 == 0 && hs % 8 == 0;

    // Each thread moves 2 vectors of k and 2 of v per 64-token tile: vector s covers tile row
    // (threadIdx.x + 128 s) / 4, columns 8 ((threadIdx.x + 128 s) % 4) .. + 8.
    // With the key norm: this thread's 8 weights (its columns are the same in every tile) and the
    // 1/rms of its two rows of the tile in flight.
    uint4 pk[2], pv[2];
    float kw[8], pr[2] = {0.f, 0.f};
    if (key_rstd) {
        const bf16* w = key_w + blockIdx.y * HD + (threadIdx.x & 3) * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) kw[i] = __bfloat162float(w[i]);
    }
    const float* rstd = key_rstd ? key_rstd + (i64)blockIdx.z * n_tokens : nullptr;
    auto fetch = [&](int m0) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int idx = threadIdx.x + LA_THREADS * s, r = idx >> 2, c = (idx & 3) * 8;
            const bool ok = m0 + r < n1;
            const i64 off = head0 + (i64)(m0 + r) * rs + c;
            pk[s] = la_load8(k + off, ok, vec);
            pv[s] = la_load8(v + off, ok, vec);
            if (rstd) pr[s] = ok ? rstd[m0 + r] : 0.f;
        }
    };

    // acc[mt][nt]: rows i = 16 mt + (g, g + 8), columns j = 8 nt + 2 tq (+1); n-tile 4 is the ones column
    // (its column 0 is ksum).
    float acc[2][5][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 5; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
    // B fragment of a 16x8 matrix whose column 0 is all ones: rows 2tq, 2tq+1 (and +8) of column g.
    const unsigned one2 = g == 0 ? 0x3F803F80u : 0u;
    const unsigned ones[2] = {one2, one2};

    const int lq = lane >> 3, lr = lane & 7;  // ldmatrix: this lane gives row lr of matrix lq
    if (n0 < n1) fetch(n0);
    for (int m0 = n0; m0 < n1; m0 += TILE) {
        __syncthreads();  // the previous tile has been consumed
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int idx = threadIdx.x + LA_THREADS * s, r = idx >> 2, c = (idx & 3) * 8;
            *reinterpret_cast<uint4*>(ks + r * LD + c) = la_relu8(rstd ? la_norm8(pk[s], kw, pr[s]) : pk[s]);
            *reinterpret_cast<uint4*>(vs + r * LD + c) = pv[s];
        }
        __syncthreads();
        if (m0 + TILE < n1) fetch(m0 + TILE);  // in flight during the mma below

        // This warp's 16 tokens: rows 16 warp .. 16 warp + 15 of the tile (the MMA's k dimension).
        const int row0 = 16 * warp;
        unsigned a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            // A = relu(K)^T (rows i, columns tokens): matrix lq covers i-block lq & 1, token-block lq >> 1;
            // stored token-major, so the transposing load.
            ldmatrix_x4_trans(a[mt], ks + (row0 + 8 * (lq >> 1) + lr) * LD + 16 * mt + 8 * (lq & 1));
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
            // B = V (rows tokens, columns j): matrices (token-block 0/1) x (j-block 2np, 2np+1).
            unsigned bb[4];
            ldmatrix_x4_trans(bb, vs + (row0 + 8 * (lq & 1) + lr) * LD + 8 * (2 * np + (lq >> 1)));
            const unsigned b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                mma_m16n8k16_bf16_f32(acc[mt][2 * np], a[mt], b0, acc[mt][2 * np]);
                mma_m16n8k16_bf16_f32(acc[mt][2 * np + 1], a[mt], b1, acc[mt][2 * np + 1]);
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma_m16n8k16_bf16_f32(acc[mt][4], a[mt], ones, acc[mt][4]);
    }

    float* mine = red + warp * S;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = 16 * mt + g + 8 * (r >> 1);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) mine[i * HD + 8 * nt + 2 * tq + (r & 1)] = acc[mt][nt][r];
            if (tq == 0 && (r & 1) == 0) mine[HD * HD + i] = acc[mt][4][r];
        }
    }
    __syncthreads();
    la_finish<S>(red, 4, partial, state, counters, chunks);
}

__device__ __forceinline__ void la_apply_mma32(const bf16* q, const float* state, bf16* out, int n_tokens, int rs,
                                               int hs, int ors) {
    constexpr int HD = 32, S = LaState<HD>::S, LD = LA_LD;
    __shared__ float st[S];
    __shared__ __align__(16) bf16 qs[4][32 * LD];  // per warp: 32 token rows (two m-tiles of 16)

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y;
    const int nw = blockIdx.x * LA_APPLY_TILE + 32 * warp;  // this warp's first token
    const i64 head = (i64)b * gridDim.y + h;
    const bool vec_in = aligned16(q) && rs % 8 == 0 && hs % 8 == 0;
    const bool vec_out = aligned16(out) && ors % 8 == 0;

    // Issue this warp's q loads first (4 vectors per lane: row (lane + 32 s) / 4, columns 8 ((lane + 32 s) % 4)).
    const bf16* qb = q + (i64)b * n_tokens * rs + (i64)h * hs;
    uint4 pq[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int idx = lane + 32 * s, r = idx >> 2, c = (idx & 3) * 8;
        pq[s] = la_load8(qb + (i64)(nw + r) * rs + c, nw + r < n_tokens, vec_in);
    }
    for (int e = threadIdx.x; e < S; e += blockDim.x) st[e] = state[head * S + e];
    __syncthreads();

    // B fragments of [KV | ksum 0 ...] (32 x 40): k-tile kt (rows i = 16 kt ..), n-tile nt (columns 8 nt ..);
    // b[r] holds rows 16 kt + 8 r + 2 tq, +1 of column 8 nt + g; each f32 value split into hi + lo bf16.
    unsigned bh[2][5][2], bl[2][5][2];
#pragma unroll
    for (int kt = 0; kt < 2; ++kt)
#pragma unroll
        for (int nt = 0; nt < 5; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = 16 * kt + 8 * r + 2 * tq;
                float x0, x1;
                if (nt < 4) {
                    x0 = st[i * HD + 8 * nt + g];
                    x1 = st[(i + 1) * HD + 8 * nt + g];
                } else {
                    x0 = g == 0 ? st[HD * HD + i] : 0.f;
                    x1 = g == 0 ? st[HD * HD + i + 1] : 0.f;
                }
                la_split(x0, x1, bh[kt][nt][r], bl[kt][nt][r]);
            }

    bf16* qw = qs[warp];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int idx = lane + 32 * s, r = idx >> 2, c = (idx & 3) * 8;
        *reinterpret_cast<uint4*>(qw + r * LD + c) = la_relu8(pq[s]);
    }
    __syncwarp();

    const int lq = lane >> 3, lr = lane & 7;
    float o[2][5][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 5; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) o[mt][nt][r] = 0.f;
#pragma unroll
        for (int kt = 0; kt < 2; ++kt) {
            // A = relu(Q) rows n, columns i: matrix lq covers token-block lq & 1, i-block lq >> 1.
            unsigned a[4];
            ldmatrix_x4(a, qw + (16 * mt + 8 * (lq & 1) + lr) * LD + 16 * kt + 8 * (lq >> 1));
#pragma unroll
            for (int nt = 0; nt < 5; ++nt) {
                mma_m16n8k16_bf16_f32(o[mt][nt], a, bh[kt][nt], o[mt][nt]);
                mma_m16n8k16_bf16_f32(o[mt][nt], a, bl[kt][nt], o[mt][nt]);
            }
        }
    }
    __syncwarp();  // every lane's ldmatrix reads are done before the rows are overwritten with the output

#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
        // The denominators of rows g and g + 8 sit in column 0 of n-tile 4, held by lane 4 g (tq == 0).
        const float d0 = __shfl_sync(0xffffffffu, o[mt][4][0], lane & ~3) + LA_EPS;
        const float d1 = __shfl_sync(0xffffffffu, o[mt][4][2], lane & ~3) + LA_EPS;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int c = 8 * nt + 2 * tq;
            *reinterpret_cast<unsigned*>(qw + (16 * mt + g) * LD + c) = la_pack(o[mt][nt][0] / d0, o[mt][nt][1] / d0);
            *reinterpret_cast<unsigned*>(qw + (16 * mt + g + 8) * LD + c) =
                la_pack(o[mt][nt][2] / d1, o[mt][nt][3] / d1);
        }
    }
    __syncwarp();

    bf16* ob = out + (i64)b * n_tokens * ors + (i64)h * HD;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int idx = lane + 32 * s, r = idx >> 2, c = (idx & 3) * 8;
        if (nw + r < n_tokens)
            la_store8(ob + (i64)(nw + r) * ors + c, *reinterpret_cast<const uint4*>(qw + r * LD + c), vec_out);
    }
}

// ---- key norm pre-pass ---------------------------------------------------------------------------------------

// rstd[row] = 1 / sqrt(mean(k²) + eps) over the row's heads * hd key channels (head h's at
// k + row * rs + h * hs), one warp per row; f32 as the RMSNorm kernels compute it.
template <typename T>
__device__ __forceinline__ void la_key_rms(const T* k, float* rstd, i64 rows, int heads, int hd, int rs, int hs,
                                           float eps) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (LA_THREADS / 32) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp; no barrier follows
    const T* kr = k + row * rs;
    constexpr int V = Vec16<T>::N;
    float s = 0.f;
    if (hd % V == 0 && aligned16(k) && rs % V == 0 && hs % V == 0) {
        const int per_head = hd / V;
        for (int e = lane; e < heads * per_head; e += 32) {
            float x[V];
            load_vec<T>(kr + (i64)(e / per_head) * hs + (e % per_head) * V, x);
#pragma unroll
            for (int j = 0; j < V; ++j) s += x[j] * x[j];
        }
    } else {
        for (int e = lane; e < heads * hd; e += 32) {
            const float x = to_f32(kr[(i64)(e / hd) * hs + e % hd]);
            s += x * x;
        }
    }
    s = warp_sum(s, 32);
    if (lane == 0) rstd[row] = 1.f / sqrtf(s / (float)(heads * hd) + eps);
}

}  // namespace ou

using ou::bf16;

// Entry points are written out one by one (no macros), so that openuni_cuda finds every kernel's file by
// scanning the sources for `extern "C" __global__ void NAME(`.

// State: f32 storage (FMA).
extern "C" __global__ void linear_attention_state_f32_hd2(const float* k, const float* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const float* key_w, const float* key_rstd) {
    ou::la_state_fma<float, 2>(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}
extern "C" __global__ void linear_attention_state_f32_hd8(const float* k, const float* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const float* key_w, const float* key_rstd) {
    ou::la_state_fma<float, 8>(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}
extern "C" __global__ void linear_attention_state_f32_hd16(const float* k, const float* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const float* key_w, const float* key_rstd) {
    ou::la_state_fma<float, 16>(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}
extern "C" __global__ void linear_attention_state_f32_hd32(const float* k, const float* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const float* key_w, const float* key_rstd) {
    ou::la_state_fma<float, 32>(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}

// State: bf16 storage (FMA for the small head dims, tensor cores for 32).
extern "C" __global__ void linear_attention_state_bf16_hd2(const bf16* k, const bf16* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const bf16* key_w, const float* key_rstd) {
    ou::la_state_fma<bf16, 2>(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}
extern "C" __global__ void linear_attention_state_bf16_hd8(const bf16* k, const bf16* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const bf16* key_w, const float* key_rstd) {
    ou::la_state_fma<bf16, 8>(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}
extern "C" __global__ void linear_attention_state_bf16_hd16(const bf16* k, const bf16* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const bf16* key_w, const float* key_rstd) {
    ou::la_state_fma<bf16, 16>(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}
extern "C" __global__ void linear_attention_state_bf16_hd32(const bf16* k, const bf16* v, float* partial, float* state, unsigned* counters, int n_tokens, int row_stride, int head_stride, int chunk_len, int chunks, const bf16* key_w, const float* key_rstd) {
    ou::la_state_mma32(k, v, partial, state, counters, n_tokens, row_stride, head_stride, chunk_len, chunks, key_w, key_rstd);
}

// Apply: f32 storage (FMA).
extern "C" __global__ void linear_attention_apply_f32_hd2(const float* q, const float* state, float* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_fma<float, 2>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}
extern "C" __global__ void linear_attention_apply_f32_hd8(const float* q, const float* state, float* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_fma<float, 8>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}
extern "C" __global__ void linear_attention_apply_f32_hd16(const float* q, const float* state, float* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_fma<float, 16>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}
extern "C" __global__ void linear_attention_apply_f32_hd32(const float* q, const float* state, float* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_fma<float, 32>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}

// Apply: bf16 storage.
extern "C" __global__ void linear_attention_apply_bf16_hd2(const bf16* q, const float* state, bf16* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_fma<bf16, 2>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}
extern "C" __global__ void linear_attention_apply_bf16_hd8(const bf16* q, const float* state, bf16* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_fma<bf16, 8>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}
extern "C" __global__ void linear_attention_apply_bf16_hd16(const bf16* q, const float* state, bf16* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_fma<bf16, 16>(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}
extern "C" __global__ void linear_attention_apply_bf16_hd32(const bf16* q, const float* state, bf16* out, int n_tokens, int row_stride, int head_stride, int out_row_stride) {
    ou::la_apply_mma32(q, state, out, n_tokens, row_stride, head_stride, out_row_stride);
}

// Key norm pre-pass.
extern "C" __global__ void linear_attention_key_rms_f32(const float* k, float* rstd, long long rows, int heads, int head_dim, int row_stride, int head_stride, float eps) {
    ou::la_key_rms<float>(k, rstd, rows, heads, head_dim, row_stride, head_stride, eps);
}
extern "C" __global__ void linear_attention_key_rms_bf16(const bf16* k, float* rstd, long long rows, int heads, int head_dim, int row_stride, int head_stride, float eps) {
    ou::la_key_rms<bf16>(k, rstd, rows, heads, head_dim, row_stride, head_stride, eps);
}
