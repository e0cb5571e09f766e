// conv_sm90.cuh: the mainloop and epilogue of kernels/conv_sm90.cu (the wgmma/TMA 3x3 and phase-upsample
// convolutions; that file's comment describes them), in a header so that the emulated GPU's tests can also
// compile deliberately broken versions of it (the MUTANT parameter, crates/emu/tests/kernels/conv_sm90.cu).
// Production kernels use MUTANT = C90_OK; every mutant branch is compiled out of them.
#pragma once

#include "common.cuh"
#include "conv_sm90_geometry.cuh"
#include "fast_math.cuh"
#include "mbarrier.cuh"
#include "sm90.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#if defined(OPENUNI_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define OU_CONV_SM90 1
#else
#define OU_CONV_SM90 0
#endif

namespace ou {

// What a test build breaks on purpose (crates/emu/tests/conv_sm90.rs expects each to be caught).
enum C90Mutant {
    C90_OK = 0,
    C90_WRONG_SWIZZLE = 1,  // the A descriptors say 64B swizzle while the TMA wrote 128B
    C90_EARLY_RELEASE = 2,  // a stage is released to the producer before the wgmma that reads it is waited for
    C90_NO_WAIT = 3,        // no wgmma.wait_group in the mainloop (only the final one)
    C90_WRONG_PARITY = 4,   // the consumers wait on the full barrier with the wrong phase parity
};

constexpr int C90_TILE_H = C90_BOX_H * C90_CONSUMERS;      // 16 pixel rows per block
constexpr int C90_BOX_PIXELS = C90_BOX_H * C90_TILE_W;     // 128: two m64 row blocks
constexpr unsigned C90_A_BYTES = C90_BOX_PIXELS * C90_CHUNK * 2;  // one consumer's A box: 16 KiB
constexpr unsigned C90_B_BYTES = C90_TILE_N * C90_CHUNK * 2;      // the weight box: 16 KiB
constexpr unsigned C90_STAGE_BYTES = C90_CONSUMERS * C90_A_BYTES + C90_B_BYTES;
static_assert(C90_THREADS == 128 * (1 + C90_CONSUMERS), "one producer and C90_CONSUMERS consumer warpgroups");
static_assert(C90_SMEM == 1024 + C90_STAGES * C90_STAGE_BYTES + 128, "C90_SMEM: slack + stages + barriers");
static_assert(C90_CHUNK * 2 == 128, "a stage's k extent is one 128-byte swizzle line");
static_assert(C90_BOX_PIXELS == 128 && C90_TILE_N == 128, "a consumer issues 2 x m64n128 per k16 step");

#if OU_CONV_SM90
// The epilogue of conv_sm90 (below) for one consumer thread: its accumulators of rows ly0 + 4i, columns
// lx0 + 8 half, channels nt + 8j + e (i, half, e < 2, j < C90_TILE_N / 8) to y, in f32: + bias (bv,
// loaded by the caller), SiLU when ACT, + res (same shape as y) when non-null (conv); + DC-AE's
// pixel-shuffle shortcut of x when shortcut != 0 (upsample, phase (pi, pj): output pixel (2 ly + pi,
// 2 lx + pj)); rounded once to bf16, channel pairs stored (and res read) as bf16x2 when they are aligned.
template <bool UP, bool ACT>
__device__ __forceinline__ void conv_sm90_epilogue(const float (&acc)[2][C90_TILE_N / 2], const float (&bv)[C90_TILE_N / 8][2],
                                                   const bf16* __restrict__ x, const bf16* __restrict__ res, bf16* __restrict__ y,
                                                   int h, int wd, int cin, int cout, int shortcut, int b, int ly0, int lx0, int nt,
                                                   int pi, int pj) {
    const int gh = UP ? 2 * h : h, gw = UP ? 2 * wd : wd;  // the output grid
    const i64 img = (i64)b * h * wd, img_out = (i64)b * gh * gw;
    // Pairs need cout even (then n is even) and 4-byte aligned y and res (checked, not assumed).
    const bool pairs = cout % 2 == 0 && ((reinterpret_cast<unsigned long long>(y) | reinterpret_cast<unsigned long long>(res)) & 3ull) == 0;
    const int R = UP && shortcut ? 4 * cout / cin : 1;  // the shortcut's channel repeat (launcher-checked)
    // The shortcut's channel k / R: a shift when R is a power of two (DC-AE's 2 and 4), not a division
    // per element.
    const int rshift = (R & (R - 1)) == 0 ? __ffs(R) - 1 : -1;
    auto xch = [&](int k) { return rshift >= 0 ? k >> rshift : k / R; };
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int ly = ly0 + 4 * i;
        if (ly >= h) continue;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int lx = lx0 + 8 * half;
            if (lx >= wd) continue;
            const int oy = UP ? 2 * ly + pi : ly, ox = UP ? 2 * lx + pj : lx;
            const i64 o = (img_out + (i64)oy * gw + ox) * cout;
            const bf16* xs = UP && shortcut ? x + (img + (i64)ly * wd + lx) * cin : nullptr;
#pragma unroll
            for (int j = 0; j < C90_TILE_N / 8; ++j) {
                const int n = nt + 8 * j;
                if (n >= cout) continue;
                float v[2] = {acc[i][4 * j + 2 * half] + bv[j][0], acc[i][4 * j + 2 * half + 1] + bv[j][1]};
                if constexpr (ACT) v[0] = silu_fast(v[0]), v[1] = silu_fast(v[1]);
                if (pairs) {  // cout even, n even: 4-byte aligned pairs
                    if (res) {
                        const float2 r = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(res + o + n));
                        v[0] += r.x, v[1] += r.y;
                    }
                    if (xs) v[0] += to_f32(xs[xch(4 * n + 2 * pi + pj)]), v[1] += to_f32(xs[xch(4 * (n + 1) + 2 * pi + pj)]);
                    *reinterpret_cast<__nv_bfloat162*>(y + o + n) = __floats2bfloat162_rn(v[0], v[1]);
                } else {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        if (n + e >= cout) continue;
                        if (res) v[e] += to_f32(res[o + n + e]);
                        if (xs) v[e] += to_f32(xs[xch(4 * (n + e) + 2 * pi + pj)]);
                        y[o + n + e] = from_f32<bf16>(v[e]);
                    }
                }
            }
        }
    }
}

// The conv/upsample mainloop and epilogue. UP: the upsample conv (4 taps of phase blockIdx.z on the
// low-resolution grid), else the 3x3 conv (9 taps).
template <bool UP, int MUTANT = C90_OK>
__device__ __forceinline__ void conv_sm90(unsigned char* dyn_smem, const TensorMap& map_x, const TensorMap& map_w, const bf16* __restrict__ x,
                                          const bf16* __restrict__ bias, const bf16* __restrict__ res,
                                          bf16* __restrict__ y, int h, int wd, int cin, int cout, int act,
                                          int shortcut) {
    // The 128B swizzle pattern repeats every 1024 bytes and the descriptors say base offset 0: stages
    // start on a 1024-byte boundary of the shared window (dyn_smem: the kernel's dynamic shared memory).
    unsigned char* sm = dyn_smem + ((1024u - smem_addr(dyn_smem) % 1024u) % 1024u);
    unsigned long long* full = reinterpret_cast<unsigned long long*>(sm + C90_STAGES * C90_STAGE_BYTES);
    unsigned long long* empty = full + C90_STAGES;
    auto a_stage = [&](int s, int c) { return sm + s * C90_STAGE_BYTES + c * C90_A_BYTES; };
    auto b_stage = [&](int s) { return sm + s * C90_STAGE_BYTES + C90_CONSUMERS * C90_A_BYTES; };

    const int tiles_x = (wd + C90_TILE_W - 1) / C90_TILE_W, tiles_y = (h + C90_TILE_H - 1) / C90_TILE_H;
    const int ox0 = (blockIdx.x % tiles_x) * C90_TILE_W;
    const int oy0 = (blockIdx.x / tiles_x % tiles_y) * C90_TILE_H;
    const int b = blockIdx.x / tiles_x / tiles_y;
    const int n0 = blockIdx.y * C90_TILE_N;
    const int pi = UP ? (int)blockIdx.z >> 1 : 0, pj = UP ? (int)blockIdx.z & 1 : 0;
    constexpr int TAPS = UP ? 4 : 9;
    const int iters = TAPS * ((cin + C90_CHUNK - 1) / C90_CHUNK);

    const unsigned wg = threadIdx.x / 128, t = threadIdx.x % 128;
    if (threadIdx.x == 0) {
        tma_prefetch_map(map_x);
        tma_prefetch_map(map_w);
        for (int s = 0; s < C90_STAGES; ++s) {
            mbarrier_init(&full[s], 1);                     // the producer's arrive.expect_tx; then the bytes
            mbarrier_init(&empty[s], 128 * C90_CONSUMERS);  // every consumer thread, after its wgmma reads
        }
        mbarrier_init_fence();
    }
    __syncthreads();  // the only block-wide barrier: the roles below never meet again

    if (wg == 0) {
        // Producer: one thread issues every TMA; the warpgroup gives its registers to the consumers.
        setmaxnreg_dec<40>();
        if (t != 0) return;
        for (int it = 0; it < iters; ++it) {
            const int s = it % C90_STAGES;
            const unsigned parity = (unsigned)(it / C90_STAGES) & 1u;
            mbarrier_wait_parity(&empty[s], parity ^ 1u);  // a fresh barrier passes parity 1 at once
            mbarrier_arrive_expect_tx(&full[s], C90_STAGE_BYTES);
            const int tap = it % TAPS, c0 = it / TAPS * C90_CHUNK;
            // The input pixel under tap (dy, dx) of output pixel (oy, ox) is (oy + dy - 1, ox + dx - 1);
            // under tap (r, s) of phase (pi, pj), low-resolution (ly + pi + r - 1, lx + pj + s - 1).
            const int dy = UP ? pi + (tap >> 1) - 1 : tap / 3 - 1, dx = UP ? pj + (tap & 1) - 1 : tap % 3 - 1;
#pragma unroll
            for (int c = 0; c < C90_CONSUMERS; ++c)
                tma_load_4d(a_stage(s, c), map_x, &full[s], c0, ox0 + dx, oy0 + c * C90_BOX_H + dy, b);
            tma_load_3d(b_stage(s), map_w, &full[s], c0, n0, UP ? 4 * (int)blockIdx.z + tap : tap);
        }
        return;
    }

    // Consumer c: pixels rows oy0 + 8c .. + 7 of the tile, as two m64 blocks (rows 4i .. 4i + 3 of the box).
    setmaxnreg_inc<232>();
    const int c = (int)wg - 1;
    float acc[2][C90_TILE_N / 2];
    for (int it = 0; it < iters; ++it) {
        const int s = it % C90_STAGES;
        mbarrier_wait_parity(&full[s], ((unsigned)(it / C90_STAGES) & 1u) ^ (MUTANT == C90_WRONG_PARITY ? 1u : 0u));
        wgmma_fence_operand(acc[0]);
        wgmma_fence_operand(acc[1]);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < C90_CHUNK / 16; ++k) {
            const unsigned long long db = wgmma_desc(b_stage(s) + 32 * k, 16, 1024, Swizzle::b128);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const unsigned long long da = wgmma_desc(a_stage(s, c) + i * (C90_A_BYTES / 2) + 32 * k, 16, 1024,
                                                         MUTANT == C90_WRONG_SWIZZLE ? Swizzle::b64 : Swizzle::b128);
                wgmma_mma_ss<C90_TILE_N, 0, 0>(acc[i], da, db, it > 0 || k > 0);
            }
        }
        wgmma_commit_group();
        if constexpr (MUTANT == C90_EARLY_RELEASE) mbarrier_arrive(&empty[s]);
        // The previous stage's group is complete: its operands may be overwritten.
        if constexpr (MUTANT != C90_NO_WAIT) wgmma_wait_group<1>();
        wgmma_fence_operand(acc[0]);
        wgmma_fence_operand(acc[1]);
        if (MUTANT != C90_EARLY_RELEASE && it > 0) mbarrier_arrive(&empty[(it - 1) % C90_STAGES]);
    }
    wgmma_wait_group<0>();
    wgmma_fence_operand(acc[0]);
    wgmma_fence_operand(acc[1]);

    // Epilogue. Accumulator register 4j + r of m64 block i: box row 4i + warp, column g + 8 (r / 2),
    // channel n0 + 8j + 2tq + (r % 2). Its code is kept small: it runs once per tile straight from the
    // instruction cache, and the first version (biases re-read per element, the SiLU as an IEEE divide
    // of the accurate expf, every flag tested per element: 12k instructions, most of the kernel's 194 KB
    // of code) left the warps waiting for instructions ("no instruction" was the top stall, Nsight
    // Compute on the H200, run 6). The biases are loaded once (each serves 4 pixels), the SiLU is
    // silu_fast, and the activation is a template argument (one branch per tile).
    const int warp = (int)t / 32, g = (int)(t % 32) / 4, tq = (int)t % 4;
    float bv[C90_TILE_N / 8][2];
#pragma unroll
    for (int j = 0; j < C90_TILE_N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int n = n0 + 8 * j + 2 * tq + e;
            bv[j][e] = bias && n < cout ? to_f32(bias[n]) : 0.f;
        }
    if (act == 1)
        conv_sm90_epilogue<UP, true>(acc, bv, x, res, y, h, wd, cin, cout, shortcut, b, oy0 + c * C90_BOX_H + warp, ox0 + g, n0 + 2 * tq, pi, pj);
    else
        conv_sm90_epilogue<UP, false>(acc, bv, x, res, y, h, wd, cin, cout, shortcut, b, oy0 + c * C90_BOX_H + warp, ox0 + g, n0 + 2 * tq, pi, pj);
}
#endif

}  // namespace ou
