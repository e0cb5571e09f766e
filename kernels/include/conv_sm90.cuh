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
// The epilogue of conv_sm90 (below) for one consumer warp: its accumulators, image rows ly0 and ly0 + 4
// (m64 blocks i = 0, 1), columns ox0 .. ox0 + 15, channels n0 .. n0 + 127, to y, in f32: + bias, SiLU
// when act == 1, + res (same shape as y) when non-null (conv); + DC-AE's pixel-shuffle shortcut of x
// when shortcut != 0 (upsample, phase (pi, pj): output pixel (2 ly + pi, 2 lx + pj)); rounded once to
// bf16. `tile` is 16 KiB of shared memory only this warp uses now.
//
// Its code is kept small: it runs once per tile, and its instructions come from the instruction cache
// cold. The first version stored straight from the accumulator registers, which needs the loops over
// them unrolled: with the biases re-read per element, the SiLU an IEEE divide of the accurate expf and
// every flag tested per element, it was 12k instructions, most of the kernel's 194 KB of code, and
// "no instruction" was the kernel's top stall (Nsight Compute on the H200, docs/gpu-results.md run 6).
// Now only the copy of the accumulators to shared memory is unrolled (64 stores); the outputs are then
// made by a rolled loop over 8-channel vectors (16-byte loads of bias and res, 16-byte stores of y).
//
// Shared layout [i][pixel][channel] f32, the 8-channel groups of pixel p XOR-swizzled by p % 4, so the
// accumulator stores (float2, lanes g = 0..3 on four pixels) fall in distinct banks.
template <bool UP>
__device__ __forceinline__ void conv_sm90_epilogue(const float (&acc)[2][C90_TILE_N / 2], float* tile, const bf16* __restrict__ x,
                                                   const bf16* __restrict__ bias, const bf16* __restrict__ res, bf16* __restrict__ y,
                                                   int h, int wd, int cin, int cout, int act, int shortcut, int b, int ly0, int ox0,
                                                   int n0, int pi, int pj) {
    constexpr int TN = C90_TILE_N, PX = C90_TILE_W, G = TN / 8;
    static_assert(2 * PX * TN * 4 == C90_A_BYTES, "the warp's staging tile is one consumer A box");
    auto at = [](int i, int p, int ch) { return (i * PX + p) * TN + (ch ^ ((p & 3) << 3)); };
    const int lane = (int)threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    // Accumulator register 4j + r of m64 block i: pixel g + 8 (r / 2), channel 8j + 2tq + (r % 2).
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < G; ++j)
                *reinterpret_cast<float2*>(tile + at(i, g + 8 * half, 8 * j + 2 * tq)) =
                    make_float2(acc[i][4 * j + 2 * half], acc[i][4 * j + 2 * half + 1]);
    __syncwarp();

    const int gh = UP ? 2 * h : h, gw = UP ? 2 * wd : wd;  // the output grid
    const i64 img = (i64)b * h * wd, img_out = (i64)b * gh * gw;
    const bool vec = cout % 8 == 0 && aligned16(y) && (!res || aligned16(res)) && (!bias || aligned16(bias));
    const int R = UP && shortcut ? 4 * cout / cin : 1;  // the shortcut's channel repeat (launcher-checked)
    // The shortcut's channel k / R: a shift when R is a power of two (DC-AE's 2 and 4).
    const int rshift = (R & (R - 1)) == 0 ? __ffs(R) - 1 : -1;
#pragma unroll 1
    for (int v = lane; v < 2 * PX * G; v += 32) {
        const int i = v / (PX * G), p = v / G % PX, cg = v % G;
        const int ly = ly0 + 4 * i, lx = ox0 + p, n = n0 + 8 * cg;
        if (ly >= h || lx >= wd || n >= cout) continue;
        const float* src = tile + at(i, p, 8 * cg);  // the 8 channels stay contiguous (whole groups swizzle)
        float r[8];
        *reinterpret_cast<float4*>(r) = *reinterpret_cast<const float4*>(src);
        *reinterpret_cast<float4*>(r + 4) = *reinterpret_cast<const float4*>(src + 4);
        const int oy = UP ? 2 * ly + pi : ly, ox = UP ? 2 * lx + pj : lx;
        const i64 o = (img_out + (i64)oy * gw + ox) * cout + n;
        const bf16* xs = UP && shortcut ? x + (img + (i64)ly * wd + lx) * cin : nullptr;
        const int ne = vec ? 8 : min(8, cout - n);
        // r += the ne valid elements at `from` (one 16-byte vector when vec).
        auto add = [&](const bf16* from) {
            float t[8];
            if (vec) load_vec(from, t);
            else
#pragma unroll
                for (int e = 0; e < 8; ++e) t[e] = e < ne ? to_f32(from[e]) : 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) r[e] += t[e];
        };
        if (bias) add(bias + n);
        if (act == 1) {
#pragma unroll
            for (int e = 0; e < 8; ++e) r[e] = silu_fast(r[e]);
        }
        if (res) add(res + o);
        if (xs) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int k = 4 * (n + e) + 2 * pi + pj;
                if (e < ne) r[e] += to_f32(xs[rshift >= 0 ? k >> rshift : k / R]);
            }
        }
        if (vec) store_vec(y + o, r);
        else
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (e < ne) y[o + e] = from_f32<bf16>(r[e]);
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
        setmaxnreg_dec<WarpSpecializedRegs::PRODUCER>();
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
    setmaxnreg_inc<WarpSpecializedRegs::CONSUMER>();
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

    // Epilogue (conv_sm90_epilogue): warp w of consumer c stages its accumulators in its own A box of
    // stage w, free now: every load was consumed, and only this consumer's wgmma read it (all complete).
    // The proxy fence orders these generic stores after the async proxy's (TMA, wgmma) accesses.
    static_assert(C90_STAGES >= 4, "each of a consumer's 4 warps stages its tile in one stage's A box");
    fence_proxy_async();
    const int warp = (int)t / 32;
    float* tile = reinterpret_cast<float*>(a_stage(warp, c));
    conv_sm90_epilogue<UP>(acc, tile, x, bias, res, y, h, wd, cin, cout, act, shortcut, b, oy0 + c * C90_BOX_H + warp, ox0, n0, pi, pj);
}
#endif

}  // namespace ou
