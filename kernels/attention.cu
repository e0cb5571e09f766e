// attention.cu: softmax attention (flash-attention 2 style). CPU twin: openuni_cpu::ops::attention.
//
//   attention_{f32,bf16}_hd{16,32,48,64,80,96,112,128,160,192,224,256}(q, k, v, mask, seg, rope_cs, out,
//       n, m, heads, kv_heads, hd, causal, scale, smem_bytes)
//
//   q [B, n, heads*hd], k and v [B, m, kv_heads*hd], out [B, n, heads*hd], all row-major in the
//   storage type; query head h reads key/value head h / (heads / kv_heads) (GQA, as repeat_kv).
//   logit[i, j] = scale * q_i . k_j + bias_j, where bias_j = (1 - mask[b, j]) * -10000 when `mask`
//   ([B, m], same storage type, 1 keep / 0 pad, diffusers' convention) is non-null, else 0; with
//   `causal`, query i sees only keys j <= i + m - n (the last query is aligned with the last key).
//   out_i = softmax_j(logit[i, :]) . V, softmax in f32. A query that sees no key at all (possible
//   only for causal with m < n, which the graph builder refuses) gets zeros.
//   Packed sequences (`seg` non-null; B = 1, n = m): seg[2t], seg[2t + 1] = [start, end) of the segment of
//   token t; query i sees only keys of its own segment, j in [start(i), end(i)) (and j <= i when causal).
//   Without `seg` every query sees keys [0, m) (j <= i + m - n when causal).
//   Fused RoPE (`rope_cs` non-null; n = m): q and k are rotated (rotate_half, as misc.cu's rope) before the
//   scores, token t at position p(t) = t - start(t) (t without `seg`); rope_cs[(p * hd/2 + i) * 2 + {0, 1}] =
//   (cos, sin) of the f32 angle p * inv_freq[i], a table the launcher computes on the host exactly as the CPU
//   twin (openuni_cpu::ops::rope_cos_sin) and the separate rope kernel do, so the rotation is the same
//   arithmetic as Op::Rope. The bf16 kernel rotates its shared-memory Q and K tiles in place and rounds
//   the rotated values to bf16, exactly what the separate rope op stores; the f32 kernel rotates while
//   loading a tile (each thread loads both halves of its pair, so no extra barrier).
//   Head dims: the kernel's template parameter HD is a capacity, the argument hd (1 <= hd <= HD; even
//   with RoPE) the head dim. Shared-memory tiles are HD columns wide and columns hd..HD-1 are zero
//   (bf16) or never read (f32); the bf16 kernel skips the mma steps whose columns are all padding, so a
//   head dim costs what the next multiple of 16 (Q K^T) and of 8 (P V) costs. Capacities: every
//   multiple of 16 up to 128 (InternVL3's LLM and the connector: 64 and 128; SANA's cross-attention:
//   72 and 112 on 80 and 112), then every multiple of 32 up to 256; the launcher
//   (crates/cuda/src/families/attention.rs) picks the smallest capacity that holds hd.
//   Shared memory is dynamic: the launcher reserves smem_bytes (its mirror of Mma<HD>::BYTES and
//   FSmem<HD>::BYTES; above 48 KiB with cuFuncSetAttribute) and the kernel traps when that is less
//   than its layout needs.
//
// Both kernels are the flash-attention 2 algorithm: one CTA per (batch * head, block of query
// rows); K/V tiles are streamed through shared memory; each query row keeps a running maximum and a
// running sum in f32 (online softmax) and rescales its output accumulator whenever the maximum
// grows, so the n x m score matrix never exists in global memory, and q, k, v are read once per
// CTA. Grid: (ceil(n / BLOCK_M), B * heads), block 128 threads (4 warps).
//
// attention_bf16_hd*: tensor cores (kernels/include/mma.cuh: mma.sync m16n8k16 bf16 -> f32 and
//   ldmatrix). BLOCK_M = 64 query rows (16 per warp), BLOCK_N = 64 keys per tile.
//   - Q is staged once through shared memory (while K tile 0 is in flight). Up to capacity 128 it is
//     staged in the V buffer and held in registers as mma A fragments for the whole key loop; above,
//     the fragments (4 * HD / 16 registers) next to the f32 output (HD / 2 registers) would spill, so
//     Q keeps a shared tile of its own and each key tile re-reads the fragments with ldmatrix.
//   - Loads are asynchronous (cp.async, kernels/include/cp_async.cuh) and overlap the tensor-core
//     work as in flash-attention 2: V tile t is in flight during S = Q K_t^T and the softmax, K tile
//     t + 1 during O += P V_t; one K and one V buffer, two barriers per tile.
//   - S = Q K^T: K tile [64 keys][HD] row-major in shared memory is exactly the "col" B operand
//     (ldmatrix without .trans, two 8-key groups per ldmatrix.x4). Q and K are zero-padded to the
//     capacity in shared memory alike, so the padding adds nothing to S.
//   - Online softmax on the S accumulator fragments: each thread owns 2 rows (g and g + 8 of its
//     warp's 16) and 16 of the 64 columns; row maxima are reduced over the 4 lanes of a quad with
//     two shuffles; the running sum is kept per thread (partial over its columns) and reduced over
//     the quad only at the end (the rescale factor is the same for the whole quad). Logits are in
//     the log2 domain (scale and bias pre-multiplied by log2 e) so p = exp2(x - max).
//   - O += P V: the S accumulators of two adjacent 8-key groups are exactly the A fragment of one
//     16-key k-step (rounded to bf16, as flash-attention does; the running sum uses the f32 p), and
//     the V tile [64 keys][HD] is the B operand through ldmatrix .trans. O stays in f32 registers.
//   - Shared-memory rows are padded by 8 bf16 (16 bytes): the row stride is an odd number of
//     16-byte units, so ldmatrix's 8 row addresses hit 8 different bank groups.
//   - Keys past m are zero-filled in shared memory (poisoned or stale K/V must not reach the mma:
//     0 * NaN is NaN) and get a -inf bias; the key-padding mask is read once per tile into a
//     shared bias row. Each row has a visible key range [lo, hi] (its segment, cut at the diagonal
//     when causal); the CTA streams only keys [lo(first row), hi(last row)] (starting at lo, not at
//     a multiple of 64, so packed sequences cost no tiles outside the CTA's own segments) and
//     evaluates the per-row range only on tiles that are not inside every row's range.
//   - The output goes back through shared memory so that global stores are 16-byte, coalesced.
//
// attention_f32_hd*: the accuracy reference path, SIMT f32. BLOCK_M = 16 query rows (4 per warp),
//   BLOCK_N = 32 keys per tile (one per lane). Lane j computes the scores of key j for its warp's
//   4 rows (Q rows in shared memory are broadcast reads; the K tile rows are HD + 1
//   floats so the 32 lanes read 32 different banks); maxima and sums by warp shuffles; p goes
//   through a per-warp shared row so that each lane accumulates its own output columns
//   (lane, lane + 32, ...) over the 32 keys. exp is expf, not exp2f, for accuracy.
//
// Global accesses are 16 bytes wide (bf16: cp.async loads and uint4 stores; f32: float4 loads,
// stores one float per lane, coalesced) when q, k, v, out are 16-byte aligned (always true in the
// executor's arena) and hd is a multiple of 8 (bf16) or 4 (f32), so that every row is too; a scalar
// path handles any other pointer or head dim (bf16: synchronous loads, the barriers order them the
// same way). Every thread of a CTA runs the same number of tiles and
// reaches every __syncthreads (no early return before a barrier; rows past n are computed on zero
// inputs and not stored).
//
// History:
// - Version 1: synchronous loads (global -> registers -> shared, then a barrier); ptxas gave the
//   hd128 kernel 223 registers, much of it load staging.
// - Version 2: cp.async loads with the flash-attention 2 K/V overlap above (no staging
//   registers, loads hidden behind the mma work). Not yet done: packing the query heads that share
//   a KV head into one CTA (GQA reads each KV tile heads/kv_heads times, from L2), 32 query rows
//   per warp (half the shared-memory traffic per FLOP), and wgmma/TMA (Hopper only; the emulated
//   GPU cannot run them). Measure on a GPU first.
// - Version 3: packed segments (per-row key ranges, key tiles from the CTA's first visible
//   key) and fused RoPE. RoPE costs one extra barrier per K tile on the bf16 path, and with GQA every
//   query head rotates the shared K tile again (heads / kv_heads times); a cos/sin table read from L2
//   replaces the transcendentals.
// - Version 4 (this one): every head dim up to 256 (capacities with zero padding, dynamic shared
//   memory, Q in shared memory above 128). ptxas (sm_90a, NVRTC 13.0): no spills; bf16 121-186
//   registers up to capacity 128, 166-230 above; f32 68-128.

#include "common.cuh"
#include "cp_async.cuh"
#include "mma.cuh"

namespace ou {
namespace attn {

constexpr int THREADS = 128;  // 4 warps
constexpr float LOG2E = 1.4426950408889634f;
constexpr float MASKED_KEY_BIAS = -10000.f;
// -inf (NVRTC has no INFINITY macro).
#define NEG_INF __uint_as_float(0xff800000u)

// Key-padding bias of key `key` (already known to be < m), from the [B, m] mask of sample b.
template <typename T>
__device__ __forceinline__ float key_bias(const T* mask, int b, int m, int key) {
    return mask ? (1.f - to_f32(mask[(i64)b * m + key])) * MASKED_KEY_BIAS : 0.f;
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The base to subtract from logits whose running maximum is `mx`: 0 while a row has seen no
// key (mx = -inf), so that exp(-inf - base) = 0 instead of NaN.
__device__ __forceinline__ float safe_max(float mx) { return mx == NEG_INF ? 0.f : mx; }

// Visible keys of query row i: [seg_lo, seg_hi] (inclusive). Both are non-decreasing in i, so a
// block of rows [a, b] sees keys [seg_lo(a), seg_hi(b)] and every row sees [seg_lo(b), seg_hi(a)].
__device__ __forceinline__ int seg_lo(const int* seg, int i) { return seg ? seg[2 * i] : 0; }
__device__ __forceinline__ int seg_hi(const int* seg, int i, int m, int off, int causal) {
    return causal ? i + off : (seg ? seg[2 * i + 1] - 1 : m - 1);
}
// RoPE position of token t: restarts at each segment start.
__device__ __forceinline__ int rope_pos(const int* seg, int t) { return t - seg_lo(seg, t); }

// ---------------------------------------------------------------------------------------------
// bf16: tensor cores
// ---------------------------------------------------------------------------------------------

constexpr int BM = 64;  // query rows per CTA (16 per warp)
constexpr int BN = 64;  // keys per tile

// Shared-memory layout of the bf16 kernel for head-dim capacity HD (the kernel serves every head
// dim hd <= HD; columns hd..HD-1 are zero in shared memory). The launcher reserves BYTES of dynamic
// shared memory (smem_bytes in crates/cuda/src/families/attention.rs) and passes the count, which
// the kernel checks.
template <int HD> struct Mma {
    static_assert(HD % 16 == 0 && HD <= 256, "capacities are multiples of 16 up to 256");
    static constexpr int STRIDE = HD + 8;  // shared row stride in bf16: an odd number of 16 B
    static constexpr int KSTEPS = HD / 16;  // mma k-steps of Q K^T
    static constexpr int NT = HD / 8;       // 8-column tiles of O
    static constexpr int CHUNKS = HD / 8;   // 16-byte chunks of a shared row
    // Up to 128 the Q fragments live in registers for the whole key loop (KSTEPS * 4 registers);
    // above, next to 4 * NT output registers they would spill, so Q stays in its own shared tile
    // and is re-read with ldmatrix at every key tile.
    static constexpr bool Q_IN_REGS = HD <= 128;
    static constexpr int TILE = BN * STRIDE;  // bf16 elements of one 64-row tile
    // K and V tiles (Q staged in V, O in K when Q is in registers), plus a Q tile otherwise.
    static constexpr int BYTES = (Q_IN_REGS ? 2 : 3) * TILE * 2;
    static_assert((STRIDE / 8) % 2 == 1, "row stride must be an odd number of 16-byte units");
};

// rows x HD bf16 into shared `dst` (row stride STRIDE) from global `src` (row stride `ld`
// elements): rows >= valid and columns >= hd are zero. `vec` (16-byte aligned rows, hd a multiple
// of 8): asynchronous 16-byte copies, in flight until the caller's cp_async_wait; otherwise
// synchronous scalar loads. Either way the tile is visible to the other threads only after a
// __syncthreads.
template <int HD>
__device__ __forceinline__ void load_tile_bf16(bf16* dst, const bf16* src, i64 ld, int rows, int valid, int hd,
                                               bool vec) {
    typedef Mma<HD> C;
    for (int c = threadIdx.x; c < rows * C::CHUNKS; c += THREADS) {
        const int r = c / C::CHUNKS, col = (c % C::CHUNKS) * 8;
        const int cnt = r < valid ? min(8, hd - col) : 0;  // elements of this chunk inside the row
        bf16* d = dst + r * C::STRIDE + col;
        if (vec) {
            cp_async_16(d, cnt > 0 ? src + (i64)r * ld + col : src, cnt > 0);  // zero-fill reads nothing
        } else {
            Pack16<bf16> pk;
            pk.raw = make_uint4(0u, 0u, 0u, 0u);
            if (cnt > 0) {
                const bf16* p = src + (i64)r * ld + col;
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    if (e < cnt) pk.e[e] = p[e];
            }
            *reinterpret_cast<uint4*>(d) = pk.raw;
        }
    }
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) is the low half
    return *reinterpret_cast<unsigned*>(&v);
}

// Rotates rows [0, valid) of a shared bf16 tile in place (RoPE); row r is token first + r. Rounds
// the rotated values to bf16, as the separate rope op stores them.
template <int HD>
__device__ __forceinline__ void rope_tile_bf16(bf16* t, int valid, const float* cs, const int* seg, int first, int hd) {
    const int HALF = hd / 2;
    for (int e = threadIdx.x; e < valid * HALF; e += THREADS) {
        const int r = e / HALF, i = e - r * HALF;
        const float* c = cs + ((i64)rope_pos(seg, first + r) * HALF + i) * 2;
        bf16* p = t + r * Mma<HD>::STRIDE + i;
        const float x1 = to_f32(p[0]), x2 = to_f32(p[HALF]);
        p[0] = from_f32<bf16>(x1 * c[0] - x2 * c[1]);
        p[HALF] = from_f32<bf16>(x2 * c[0] + x1 * c[1]);
    }
}

// The dynamic shared memory of both kernels (as on a GPU, every `extern __shared__` array of a
// kernel is the same buffer).
__device__ __forceinline__ unsigned char* dyn_smem() {
    extern __shared__ __align__(16) unsigned char ou_attn_smem[];
    return ou_attn_smem;
}

// A launcher that reserved less dynamic shared memory than the kernel's layout needs is a bug on
// the host side: fail the launch loudly instead of writing past the buffer.
__device__ __forceinline__ void check_smem(int reserved, int needed) {
    if (reserved < needed) __trap();
}

template <int HD>
__device__ __forceinline__ void attention_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                              const bf16* __restrict__ v, const bf16* __restrict__ mask,
                                              const int* __restrict__ seg, const float* __restrict__ rope_cs,
                                              bf16* __restrict__ out, int n, int m, int heads, int kv_heads, int hd,
                                              int causal, float scale, int smem_bytes) {
    typedef Mma<HD> C;
    check_smem(smem_bytes, C::BYTES);
    bf16* sk = reinterpret_cast<bf16*>(dyn_smem());  // K tiles (then O staging when Q is in registers)
    bf16* sv = sk + C::TILE;                          // V tiles (after Q staging when Q is in registers)
    bf16* sq = C::Q_IN_REGS ? sv : sv + C::TILE;      // Q (then O staging when Q is in shared memory)
    __shared__ float sbias[BN];  // key-padding bias (log2 domain), -inf past m
    static_assert(BM == BN, "Q and O tiles have the size of a K/V tile");

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads, kh = h / (heads / kv_heads);
    const int m0 = blockIdx.x * BM;
    const i64 ldq = (i64)heads * hd, ldk = (i64)kv_heads * hd;
    const bf16* qb = q + ((i64)b * n + m0) * ldq + (i64)h * hd;
    const bf16* kb = k + (i64)b * m * ldk + (i64)kh * hd;
    const bf16* vb = v + (i64)b * m * ldk + (i64)kh * hd;
    bf16* ob = out + ((i64)b * n + m0) * ldq + (i64)h * hd;
    // 16-byte rows need 16-byte aligned bases and a head dim that is a multiple of 8.
    const bool vec = hd % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(v) && aligned16(out);
    const int qvalid = min(BM, n - m0);

    const int off = m - n;  // query i sees keys <= i + off when causal
    const int qlast = m0 + qvalid - 1;
    const int kbeg = seg_lo(seg, m0), kend = min(m, seg_hi(seg, qlast, m, off, causal) + 1);
    const int tiles = kend > kbeg ? (kend - kbeg + BN - 1) / BN : 0;
    // Keys inside [lo_all, hi_all] are visible to every row of the CTA (no per-row check needed).
    const int lo_all = seg_lo(seg, qlast), hi_all = seg_hi(seg, m0, m, off, causal);
    const float sl2 = scale * LOG2E;
    const int row0 = m0 + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
    int rlo[2], rhi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = min(row0 + 8 * r, n - 1);  // rows past n are not stored
        rlo[r] = seg_lo(seg, i);
        rhi[r] = seg_hi(seg, i, m, off, causal);
    }
    // Padded columns are zero in Q, K and V, so the mma steps that see only padding are skipped.
    const int ksteps = (hd + 15) / 16, ntiles = (hd + 7) / 8;

    // K tile `t` into sk and its key bias into sbias (one cp.async group).
    auto load_k = [&](int t) {
        const int n0 = kbeg + t * BN, kvalid = min(BN, kend - n0);
        load_tile_bf16<HD>(sk, kb + (i64)n0 * ldk, ldk, BN, kvalid, hd, vec);
        if (tid < BN) sbias[tid] = tid < kvalid ? key_bias(mask, b, m, n0 + tid) * LOG2E : NEG_INF;
        cp_async_commit();
    };
    auto load_v = [&](int t) {
        const int n0 = kbeg + t * BN;
        load_tile_bf16<HD>(sv, vb + (i64)n0 * ldk, ldk, BN, min(BN, kend - n0), hd, vec);
        cp_async_commit();
    };

    // Q -> shared (the V buffer, or its own tile), while K tile 0 is in flight. ldmatrix.x4
    // matrices of a Q fragment: (rows 0-7 | 8-15) x (cols 0-7 | 8-15) of the warp's 16 rows.
    load_tile_bf16<HD>(sq, qb, ldq, BM, qvalid, hd, vec);
    cp_async_commit();
    if (tiles > 0) load_k(0);
    if (tiles > 0) {
        cp_async_wait<1>();  // Q has landed, K tile 0 may still be in flight
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
    if (rope_cs) {
        rope_tile_bf16<HD>(sq, qvalid, rope_cs, seg, m0, hd);
        __syncthreads();
    }
    const bf16* qrow = sq + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * C::STRIDE + (lane >> 4) * 8;
    unsigned qf[C::Q_IN_REGS ? C::KSTEPS : 1][4];
    if constexpr (C::Q_IN_REGS) {
#pragma unroll
        for (int ks = 0; ks < C::KSTEPS; ++ks)
            if (ks < ksteps) ldmatrix_x4(qf[ks], qrow + ks * 16);
    }

    float mx[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    float o[C::NT][4];
#pragma unroll
    for (int t = 0; t < C::NT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;

    // Pipeline (flash-attention 2): V tile t loads during S = Q K_t^T and the softmax; K tile t + 1
    // loads during O += P V_t. Two barriers per tile, each after every thread's wait.
    for (int tile = 0; tile < tiles; ++tile) {
        const int n0 = kbeg + tile * BN;
        cp_async_wait<0>();  // K tile `tile` (and its bias)
        __syncthreads();     // ... visible to all; every warp is done with sv (Q or V tile - 1)
        load_v(tile);
        if (rope_cs) {
            rope_tile_bf16<HD>(sk, min(BN, kend - n0), rope_cs, seg, n0, hd);
            __syncthreads();  // the rotated K tile is visible to all
        }

        // S = Q K^T: 8 groups of 8 keys; ldmatrix.x4 gives the B fragments of groups j and j + 1.
        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < C::KSTEPS; ++ks) {
            if (ks >= ksteps) break;
            unsigned qa[4];
            if constexpr (C::Q_IN_REGS) {
#pragma unroll
                for (int e = 0; e < 4; ++e) qa[e] = qf[ks][e];
            } else {
                ldmatrix_x4(qa, qrow + ks * 16);
            }
#pragma unroll
            for (int j = 0; j < BN / 8; j += 2) {
                unsigned kf[4];
                ldmatrix_x4(kf, sk + ((j + (lane >> 4)) * 8 + (lane & 7)) * C::STRIDE + ks * 16 + ((lane >> 3) & 1) * 8);
                const unsigned b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
                mma_m16n8k16_bf16_f32(s[j], qa, b0, s[j]);
                mma_m16n8k16_bf16_f32(s[j + 1], qa, b1, s[j + 1]);
            }
        }

        // Logits (log2 domain), masks, online softmax.
        const bool part = n0 < lo_all || n0 + BN - 1 > hi_all;  // some key is hidden from some row
        float tmax[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int kc = j * 8 + 2 * tq + (e & 1);
                float x = s[j][e] * sl2 + sbias[kc];
                if (part && (n0 + kc < rlo[e >> 1] || n0 + kc > rhi[e >> 1])) x = NEG_INF;
                s[j][e] = x;
                tmax[e >> 1] = fmaxf(tmax[e >> 1], x);
            }
        }
        float alpha[2], base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float mnew = fmaxf(mx[r], quad_max(tmax[r]));
            base[r] = safe_max(mnew);
            alpha[r] = exp2f(mx[r] - base[r]);  // 0 when mx was -inf
            mx[r] = mnew;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[j][e] - base[e >> 1]);
                s[j][e] = p;
                l[e >> 1] += p;
            }
        }
#pragma unroll
        for (int t = 0; t < C::NT; ++t) {
            o[t][0] *= alpha[0];
            o[t][1] *= alpha[0];
            o[t][2] *= alpha[1];
            o[t][3] *= alpha[1];
        }

        cp_async_wait<0>();  // V tile `tile`
        __syncthreads();     // ... visible to all; every warp is done with sk and sbias
        if (tile + 1 < tiles) load_k(tile + 1);

        // O += P V: k-step kk covers keys 16kk..16kk+15 = key groups 2kk and 2kk + 1. Output
        // column tiles t and t + 1 take one ldmatrix.x4; a last tile of its own (ntiles odd) an x2.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const unsigned a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                   pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const bf16* vrow = sv + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * C::STRIDE;
#pragma unroll
            for (int t = 0; t < C::NT; t += 2) {
                if (t >= ntiles) break;
                if (t + 1 < ntiles) {
                    unsigned vf[4];
                    ldmatrix_x4_trans(vf, vrow + (t + (lane >> 4)) * 8);
                    const unsigned b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
                    mma_m16n8k16_bf16_f32(o[t], a, b0, o[t]);
                    mma_m16n8k16_bf16_f32(o[t + 1], a, b1, o[t + 1]);
                } else {
                    unsigned vf[2];
                    ldmatrix_x2_trans(vf, vrow + t * 8);
                    mma_m16n8k16_bf16_f32(o[t], a, vf, o[t]);
                }
            }
        }
    }

    // O / l -> shared (bf16) -> global. With Q in registers, sk is free: every warp passed the last
    // tile's second barrier after its last read of sk, and no K load follows the last tile (with no
    // tile at all, sk was never used); sv may still be read by other warps, so it is not used here.
    // With Q in shared memory, each warp overwrites only its own 16 Q rows, which no other warp reads.
    bf16* so = C::Q_IN_REGS ? sk : sq;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(l[r]);
        inv[r] = sum > 0.f ? 1.f / sum : 0.f;
    }
#pragma unroll
    for (int t = 0; t < C::NT; ++t) {
        if (t >= ntiles) break;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            __nv_bfloat162 pr = __floats2bfloat162_rn(o[t][2 * r] * inv[r], o[t][2 * r + 1] * inv[r]);
            *reinterpret_cast<__nv_bfloat162*>(so + (warp * 16 + g + 8 * r) * C::STRIDE + t * 8 + 2 * tq) = pr;
        }
    }
    __syncthreads();
    for (int c = tid; c < BM * ntiles; c += THREADS) {
        const int r = c / ntiles, col = (c % ntiles) * 8;
        if (r >= qvalid) continue;
        const bf16* src = so + r * C::STRIDE + col;
        bf16* dst = ob + (i64)r * ldq + col;
        if (vec) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
            const int cnt = min(8, hd - col);
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (e < cnt) dst[e] = src[e];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f32: SIMT reference path
// ---------------------------------------------------------------------------------------------

constexpr int FBM = 16;  // query rows per CTA (4 per warp)
constexpr int FBN = 32;  // keys per tile (one per lane)
constexpr int FROWS = FBM / (THREADS / 32);

// Shared-memory layout of the f32 kernel for head-dim capacity HD (dynamic, like the bf16 one:
// FSmem<HD>::BYTES is smem_bytes in the launcher). Columns hd..HD-1 are never read.
template <int HD> struct FSmem {
    static_assert(HD % 16 == 0 && HD <= 256, "capacities are multiples of 16 up to 256");
    static constexpr int KLD = HD + 1;  // K row stride: lane j reads row j, 32 different banks
    static constexpr int Q = 0, K = FBM * HD, V = K + FBN * KLD;  // offsets in floats (V: 16-byte aligned)
    static constexpr int BYTES = (V + FBN * HD) * 4;
    static_assert(K % 4 == 0 && V % 4 == 0, "Q, K and V tiles start 16-byte aligned");
};

// rows x hd floats into shared `dst` (row stride `sld`) from global `src` (row stride `ld`); rows
// >= valid are zero. `vec`: 16-byte aligned rows (hd a multiple of 4).
__device__ __forceinline__ void load_tile_f32(float* dst, int sld, const float* src, i64 ld, int rows, int valid,
                                              int hd, bool vec) {
    if (vec && sld % 4 == 0) {
        const int q4 = hd / 4;
        for (int c = threadIdx.x; c < rows * q4; c += THREADS) {
            const int r = c / q4, col = (c % q4) * 4;
            float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
            if (r < valid) x = *reinterpret_cast<const float4*>(src + (i64)r * ld + col);
            *reinterpret_cast<float4*>(dst + r * sld + col) = x;
        }
    } else {
        for (int c = threadIdx.x; c < rows * hd; c += THREADS) {
            const int r = c / hd, col = c % hd;
            dst[r * sld + col] = r < valid ? src[(i64)r * ld + col] : 0.f;
        }
    }
}

// load_tile_f32 with RoPE: row r is token first + r; each thread loads both halves of its pair,
// rotates them in f32 and stores them, so the tile needs no extra barrier.
__device__ __forceinline__ void load_tile_f32_rope(float* dst, int sld, const float* src, i64 ld, int rows, int valid,
                                                   int hd, const float* cs, const int* seg, int first) {
    const int HALF = hd / 2;
    for (int e = threadIdx.x; e < rows * HALF; e += THREADS) {
        const int r = e / HALF, i = e - r * HALF;
        float y1 = 0.f, y2 = 0.f;
        if (r < valid) {
            const float* x = src + (i64)r * ld + i;
            const float* c = cs + ((i64)rope_pos(seg, first + r) * HALF + i) * 2;
            const float x1 = x[0], x2 = x[HALF];
            y1 = x1 * c[0] - x2 * c[1];
            y2 = x2 * c[0] + x1 * c[1];
        }
        dst[r * sld + i] = y1;
        dst[r * sld + i + HALF] = y2;
    }
}

template <int HD>
__device__ __forceinline__ void attention_simt(const float* __restrict__ q, const float* __restrict__ k,
                                               const float* __restrict__ v, const float* __restrict__ mask,
                                               const int* __restrict__ seg, const float* __restrict__ rope_cs,
                                               float* __restrict__ out, int n, int m, int heads, int kv_heads, int hd,
                                               int causal, float scale, int smem_bytes) {
    typedef FSmem<HD> L;
    constexpr int OC = HD / 32 + (HD % 32 != 0);  // output columns per lane (lane, lane + 32, ...)
    check_smem(smem_bytes, L::BYTES);
    float* const smem = reinterpret_cast<float*>(dyn_smem());
    float* sq = smem + L::Q;  // row stride HD
    float* sk = smem + L::K;  // row stride KLD
    float* sv = smem + L::V;  // row stride HD
    __shared__ float sp[THREADS / 32][FROWS][FBN];
    __shared__ float sbias[FBN];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads, kh = h / (heads / kv_heads);
    const int m0 = blockIdx.x * FBM;
    const i64 ldq = (i64)heads * hd, ldk = (i64)kv_heads * hd;
    const float* qb = q + ((i64)b * n + m0) * ldq + (i64)h * hd;
    const float* kb = k + (i64)b * m * ldk + (i64)kh * hd;
    const float* vb = v + (i64)b * m * ldk + (i64)kh * hd;
    float* ob = out + ((i64)b * n + m0) * ldq + (i64)h * hd;
    // 16-byte rows need 16-byte aligned bases and a head dim that is a multiple of 4.
    const bool vec = hd % 4 == 0 && aligned16(q) && aligned16(k) && aligned16(v) && aligned16(out);
    const int qvalid = min(FBM, n - m0);

    if (rope_cs) {
        load_tile_f32_rope(sq, HD, qb, ldq, FBM, qvalid, hd, rope_cs, seg, m0);
    } else {
        load_tile_f32(sq, HD, qb, ldq, FBM, qvalid, hd, vec);
    }

    const int off = m - n;
    const int qlast = m0 + qvalid - 1;
    const int kbeg = seg_lo(seg, m0), kend = min(m, seg_hi(seg, qlast, m, off, causal) + 1);
    const int tiles = kend > kbeg ? (kend - kbeg + FBN - 1) / FBN : 0;
    const int rbase = warp * FROWS;  // this warp's rows in the CTA
    int rlo[FROWS], rhi[FROWS];
#pragma unroll
    for (int r = 0; r < FROWS; ++r) {
        const int i = min(m0 + rbase + r, n - 1);  // rows past n are not stored
        rlo[r] = seg_lo(seg, i);
        rhi[r] = seg_hi(seg, i, m, off, causal);
    }

    float mx[FROWS], l[FROWS], o[FROWS][OC];
#pragma unroll
    for (int r = 0; r < FROWS; ++r) {
        mx[r] = NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < OC; ++c) o[r][c] = 0.f;
    }

    for (int tile = 0; tile < tiles; ++tile) {
        const int n0 = kbeg + tile * FBN, kvalid = min(FBN, kend - n0);
        if (rope_cs) {
            load_tile_f32_rope(sk, L::KLD, kb + (i64)n0 * ldk, ldk, FBN, kvalid, hd, rope_cs, seg, n0);
        } else {
            load_tile_f32(sk, L::KLD, kb + (i64)n0 * ldk, ldk, FBN, kvalid, hd, vec);
        }
        load_tile_f32(sv, HD, vb + (i64)n0 * ldk, ldk, FBN, kvalid, hd, vec);
        if (tid < FBN) sbias[tid] = tid < kvalid ? key_bias(mask, b, m, n0 + tid) : NEG_INF;
        __syncthreads();

        // Scores of key n0 + lane for the warp's rows.
        float s[FROWS];
#pragma unroll
        for (int r = 0; r < FROWS; ++r) s[r] = 0.f;
        const float* kr = sk + lane * L::KLD;
        for (int d = 0; d < hd; ++d) {
            const float kd = kr[d];
#pragma unroll
            for (int r = 0; r < FROWS; ++r) s[r] += sq[(rbase + r) * HD + d] * kd;
        }
        const int key = n0 + lane;
#pragma unroll
        for (int r = 0; r < FROWS; ++r) {
            float x = s[r] * scale + sbias[lane];
            if (key < rlo[r] || key > rhi[r]) x = NEG_INF;
            const float mnew = fmaxf(mx[r], warp_max(x));
            const float base = safe_max(mnew);
            const float alpha = expf(mx[r] - base);
            const float p = expf(x - base);
            mx[r] = mnew;
            l[r] = l[r] * alpha + p;  // per-lane partial sum, reduced at the end
#pragma unroll
            for (int c = 0; c < OC; ++c) o[r][c] *= alpha;
            sp[warp][r][lane] = p;
        }
        __syncwarp();
        for (int j = 0; j < FBN; ++j) {
#pragma unroll
            for (int c = 0; c < OC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) {
                    const float vd = sv[j * HD + d];
#pragma unroll
                    for (int r = 0; r < FROWS; ++r) o[r][c] += sp[warp][r][j] * vd;
                }
            }
        }
        __syncthreads();  // the next tile overwrites sk, sv, sp, sbias
    }

#pragma unroll
    for (int r = 0; r < FROWS; ++r) {
        float sum = l[r];
        for (int x = 16; x > 0; x >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int row = rbase + r;
        if (row < qvalid) {
#pragma unroll
            for (int c = 0; c < OC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) ob[(i64)row * ldq + d] = o[r][c] * inv;
            }
        }
    }
}

}  // namespace attn
}  // namespace ou

#undef NEG_INF

using ou::bf16;

// Entry points: one per (storage type, head-dim capacity); each serves every head dim up to its
// capacity (the launcher picks the smallest that fits). Written out one per line, no macros: the
// kernel registry finds each kernel's file by scanning the sources for `extern "C" __global__ void NAME(`.
#define OU_ATTN_ARGS_F32 const float* q, const float* k, const float* v, const float* mask, const int* seg, const float* rope_cs, float* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale, int smem_bytes
#define OU_ATTN_ARGS_BF16 const bf16* q, const bf16* k, const bf16* v, const bf16* mask, const int* seg, const float* rope_cs, bf16* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale, int smem_bytes
#define OU_ATTN_PASS q, k, v, mask, seg, rope_cs, out, n, m, heads, kv_heads, hd, causal, scale, smem_bytes

extern "C" __global__ void attention_f32_hd16(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<16>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd32(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<32>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd48(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<48>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd64(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<64>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd80(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<80>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd96(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<96>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd112(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<112>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd128(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<128>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd160(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<160>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd192(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<192>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd224(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<224>(OU_ATTN_PASS); }
extern "C" __global__ void attention_f32_hd256(OU_ATTN_ARGS_F32) { ou::attn::attention_simt<256>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd16(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<16>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd32(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<32>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd48(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<48>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd64(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<64>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd80(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<80>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd96(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<96>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd112(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<112>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd128(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<128>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd160(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<160>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd192(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<192>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd224(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<224>(OU_ATTN_PASS); }
extern "C" __global__ void attention_bf16_hd256(OU_ATTN_ARGS_BF16) { ou::attn::attention_mma<256>(OU_ATTN_PASS); }

#undef OU_ATTN_ARGS_F32
#undef OU_ATTN_ARGS_BF16
#undef OU_ATTN_PASS
