// attention_sm90.cuh: the FA3-style attention of kernels/attention_sm90.cu (that file's comment describes
// it), in a header so that the emulated GPU's tests can also compile deliberately broken versions
// (the MUTANT parameter, crates/emu/tests/kernels/attention_sm90.cu). Production kernels use
// MUTANT = A90_OK; every mutant branch is compiled out of them.
#pragma once

#include "common.cuh"
#include "mbarrier.cuh"
#include "sm90.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#if defined(OPENUNI_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define OU_ATT_SM90 1
#else
#define OU_ATT_SM90 0
#endif

namespace ou {

// What a test build breaks on purpose (crates/emu/tests/attention_sm90.rs expects each to be caught).
enum A90Mutant {
    A90_OK = 0,
    A90_V_K_MAJOR = 1,      // V read K-major (imm-trans-b 0): the wrong operand layout
    A90_NO_RESCALE = 2,     // O not rescaled when the running maximum grows
    A90_EARLY_RELEASE = 3,  // the K/V stage released before the P V wgmma that reads V completes
};

#define A90_NEG_INF __uint_as_float(0xff800000u)  // -inf (NVRTC has no INFINITY macro)
constexpr int A90_CONSUMERS = 2;   // consumer warpgroups, 64 query rows each
constexpr int A90_BM = 64 * A90_CONSUMERS;
constexpr int A90_BN = 64;         // keys per tile
constexpr int A90_STAGES = 2;
constexpr unsigned A90_BOX = 64 * 128;  // one box: 64 rows of 64 bf16

// Dynamic shared memory (the launcher's attention_sm90::smem_bytes): 1 KiB alignment slack, Q (per
// consumer), K and V stages, each ceil(HD / 64) boxes, then the barriers (128 bytes).
// HD (64, 80, 112, 128) is the width the tensor cores compute: S = Q K^T takes HD / 16 k-steps and
// O += P V is one m64nHDk16 per 16 keys. Boxes are 64 columns, so HD 80 and 112 load two boxes like
// 128 (the columns past hd are the TMA's zero fill, no memory read) but skip the k-steps and output
// columns past HD: SANA-600M's hd 72 runs 5 k-steps and n80 instead of 8 and n128 (62.5 % of the
// tensor work), SANA-1.6B's hd 112 7 and n112 (87.5 %).

#if OU_ATT_SM90
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Two blocks per SM (80 registers a thread) were tried and dropped: ptxas serializes the consumers' wgmma
// there (docs/hopper.md); the registers are sm90.cuh's WarpSpecializedRegs.
template <int HD, int MUTANT = A90_OK>
__device__ __forceinline__ void attention_sm90(unsigned char* dyn_smem, const TensorMap& map_q, const TensorMap& map_k,
                                               const TensorMap& map_v, const bf16* __restrict__ mask,
                                               const int* __restrict__ seg, bf16* __restrict__ out, int n, int m,
                                               int heads, int kv_heads, int hd, int causal, float scale_log2) {
    static_assert(HD % 16 == 0 && HD <= 128, "attention_sm90: HD a multiple of 16 up to 128");
    constexpr int CB = (HD + 63) / 64;  // 64-column boxes per row
    unsigned char* sm = dyn_smem + ((1024u - smem_addr(dyn_smem) % 1024u) % 1024u);
    auto q_box = [&](int c, int cb) { return sm + (c * CB + cb) * A90_BOX; };
    auto k_box = [&](int s, int cb) { return sm + ((A90_CONSUMERS + s) * CB + cb) * A90_BOX; };
    auto v_box = [&](int s, int cb) { return sm + ((A90_CONSUMERS + A90_STAGES + s) * CB + cb) * A90_BOX; };
    unsigned long long* q_full = reinterpret_cast<unsigned long long*>(sm + (A90_CONSUMERS + 2 * A90_STAGES) * CB * A90_BOX);
    unsigned long long* kv_full = q_full + 1;
    unsigned long long* empty = kv_full + A90_STAGES;

    const int q0 = blockIdx.x * A90_BM;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads, kvh = h / (heads / kv_heads);
    // Keys the block's rows see: [lo, hi), from its first row's segment start (packed segments, n = m;
    // starts and ends are non-decreasing in the row) to what its last row sees; key tiles [first, tiles).
    const int last = min(q0 + A90_BM, n) - 1;
    const int lo = seg ? seg[2 * q0] : 0;
    const int hi = causal ? min(m, last + m - n + 1) : (seg ? seg[2 * last + 1] : m);
    const int first = lo / A90_BN;
    const int tiles = hi > 0 ? (hi + A90_BN - 1) / A90_BN : 0;

    const unsigned wg = threadIdx.x / 128, t = threadIdx.x % 128;
    if (threadIdx.x == 0) {
        tma_prefetch_map(map_q);
        tma_prefetch_map(map_k);
        tma_prefetch_map(map_v);
        mbarrier_init(q_full, 1);
        for (int s = 0; s < A90_STAGES; ++s) {
            mbarrier_init(&kv_full[s], 1);
            mbarrier_init(&empty[s], 128 * A90_CONSUMERS);
        }
        mbarrier_init_fence();
    }
    __syncthreads();  // the only block-wide barrier

    if (wg == 0) {
        setmaxnreg_dec<WarpSpecializedRegs::PRODUCER>();
        if (t != 0) return;
        mbarrier_arrive_expect_tx(q_full, A90_CONSUMERS * CB * A90_BOX);
        for (int c = 0; c < A90_CONSUMERS; ++c)
            for (int cb = 0; cb < CB; ++cb) tma_load_4d(q_box(c, cb), map_q, q_full, 64 * cb, h, q0 + 64 * c, b);
        for (int it = first; it < tiles; ++it) {
            const int s = (it - first) % A90_STAGES;
            mbarrier_wait_parity(&empty[s], ((unsigned)((it - first) / A90_STAGES) & 1u) ^ 1u);
            mbarrier_arrive_expect_tx(&kv_full[s], 2 * CB * A90_BOX);
            for (int cb = 0; cb < CB; ++cb) {
                tma_load_4d(k_box(s, cb), map_k, &kv_full[s], 64 * cb, kvh, it * A90_BN, b);
                tma_load_4d(v_box(s, cb), map_v, &kv_full[s], 64 * cb, kvh, it * A90_BN, b);
            }
        }
        return;
    }

    setmaxnreg_inc<WarpSpecializedRegs::CONSUMER>();
    const int c = (int)wg - 1;
    const int warp = (int)t / 32, g = (int)(t % 32) / 4, tq = (int)t % 4;
    // This thread's two rows (absolute query indices) and the keys each sees: [from, vis].
    int row[2], from[2], vis[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row[r] = q0 + 64 * c + 16 * warp + g + 8 * r;
        const int sr = min(row[r], n - 1);  // rows past n are never stored
        from[r] = seg ? seg[2 * sr] : 0;
        vis[r] = causal ? row[r] + m - n : (seg ? seg[2 * sr + 1] - 1 : m - 1);
    }
    float o[HD / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) o[i] = 0.f;
    float row_max[2] = {A90_NEG_INF, A90_NEG_INF}, row_sum[2] = {0.f, 0.f};
    constexpr float MASK_BIAS_LOG2 = -10000.f * 1.4426950408889634f;
    mbarrier_wait_parity(q_full, 0);

    for (int it = first; it < tiles; ++it) {
        const int s = (it - first) % A90_STAGES;
        mbarrier_wait_parity(&kv_full[s], (unsigned)((it - first) / A90_STAGES) & 1u);
        float sc[A90_BN / 2];
        wgmma_fence_operand(sc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            const unsigned long long da = wgmma_desc(q_box(c, kk / 4) + 32 * (kk % 4), 16, 1024, Swizzle::b128);
            const unsigned long long db = wgmma_desc(k_box(s, kk / 4) + 32 * (kk % 4), 16, 1024, Swizzle::b128);
            wgmma_mma_ss<A90_BN, 0, 0>(sc, da, db, kk > 0);
        }
        wgmma_commit_group();
        wgmma_wait_group<0>();
        wgmma_fence_operand(sc);

        // Logits (log2 domain) and the online softmax. sc[4j + e]: row r = e / 2, key it*64 + 8j + 2tq + e % 2.
        float tile_max[2] = {A90_NEG_INF, A90_NEG_INF};
#pragma unroll
        for (int j = 0; j < A90_BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = it * A90_BN + 8 * j + 2 * tq + (e & 1), r = e >> 1;
                float x = sc[4 * j + e] * scale_log2;
                if (mask && key < m) x += (1.f - to_f32(mask[(i64)b * m + key])) * MASK_BIAS_LOG2;
                if (key >= m || key > vis[r] || key < from[r]) x = A90_NEG_INF;
                sc[4 * j + e] = x;
                tile_max[r] = fmaxf(tile_max[r], x);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            const float mx = fmaxf(row_max[r], tile_max[r]);
            const float base = mx == A90_NEG_INF ? 0.f : mx;  // a row with no visible key yet stays at 0
            alpha[r] = exp2f(row_max[r] - base);
            row_max[r] = mx;
            row_sum[r] *= alpha[r];
            tile_max[r] = base;
        }
        unsigned pa[A90_BN / 16][4];
#pragma unroll
        for (int j = 0; j < A90_BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(sc[4 * j + e] - tile_max[e >> 1]);
                sc[4 * j + e] = p;
                row_sum[e >> 1] += p;
            }
        }
#pragma unroll
        for (int kb = 0; kb < A90_BN / 16; ++kb) {
            pa[kb][0] = pack_bf16x2(sc[8 * kb + 0], sc[8 * kb + 1]);
            pa[kb][1] = pack_bf16x2(sc[8 * kb + 2], sc[8 * kb + 3]);
            pa[kb][2] = pack_bf16x2(sc[8 * kb + 4], sc[8 * kb + 5]);
            pa[kb][3] = pack_bf16x2(sc[8 * kb + 6], sc[8 * kb + 7]);
        }
        if constexpr (MUTANT != A90_NO_RESCALE) {
#pragma unroll
            for (int i = 0; i < HD / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
        }

        wgmma_fence_operand(o);
        wgmma_fence();
#pragma unroll
        for (int kb = 0; kb < A90_BN / 16; ++kb) {
            const unsigned long long db = wgmma_desc(v_box(s, 0) + kb * 16 * 128, A90_BOX, 1024, Swizzle::b128);
            wgmma_mma_rs<HD, MUTANT == A90_V_K_MAJOR ? 0 : 1>(o, pa[kb], db, true);
        }
        wgmma_commit_group();
        if constexpr (MUTANT == A90_EARLY_RELEASE) mbarrier_arrive(&empty[s]);
        wgmma_wait_group<0>();
        wgmma_fence_operand(o);
        if constexpr (MUTANT != A90_EARLY_RELEASE) mbarrier_arrive(&empty[s]);  // K and V no longer read
    }

    // Epilogue: o[4j + e]: row r = e / 2, column 8j + 2tq + e % 2.
    const int qw = heads * hd;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        if (row[r] >= n) continue;
        bf16* dst = out + ((i64)b * n + row[r]) * qw + (i64)h * hd;
#pragma unroll
        for (int j = 0; j < HD / 8; ++j) {
            const int col = 8 * j + 2 * tq;
            if (col < hd)  // hd % 8 == 0: the pair is inside
                *reinterpret_cast<__nv_bfloat162*>(dst + col) =
                    __floats2bfloat162_rn(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
        }
    }
}
#endif

}  // namespace ou
