// mixffn_inverted_glu.cu: GLUMBConv (SANA's Mix-FFN) from its input to the GLU in one kernel:
// conv_inverted (a 1x1 conv = GEMM C -> 2H, bias), SiLU, the depthwise 3x3 conv (bias) and the GLU
// u * silu(g), so the 2H-wide GEMM output (SANA's widest activation) never leaves shared memory.
// CPU twin: openuni_cpu::ops::mixffn_inverted_glu (Linear, then silu_depthwise_conv_glu).
// Launcher and selection: crates/cuda/src/families/mixffn_inverted_glu.rs.
//
//   mixffn_inverted_glu_bf16(x, wi, bi, wd, bd, y, h, wd_, c, hidden, band)
//       x tokens [B, h*wd_, c] (c % 8 == 0, 16-byte aligned), wi [2H, c] (16-byte aligned, the Linear
//       layout: row j is GEMM column j), bi [2H] or null, wd [2H, 1, 3, 3], bd [2H] or null ->
//       y [B, h*wd_, H].
//
// Launch: grid (ceil(H / MF_HC), ceil(h / band), B), 256 threads, MF_SMEM bytes of dynamic shared
// memory (one block per SM: `__launch_bounds__(256, 1)`). A block owns MF_HC hidden channels
// (GEMM columns c0.. and H + c0..: both GLU halves of its channels) and `band` output rows of one
// image. It computes the GEMM for those rows plus one halo row above and below (inside the image),
// at most MF_M tokens: the launcher picks band = h when the whole image fits (no halo, nothing
// computed twice: SANA at 512 px, 16x16 = 256 tokens), else MF_M / wd_ - 2 rows.
//   1. GEMM on the tensor cores (mma.sync m16n8k16 bf16 -> f32, kernels/include/mma.cuh): MF_M x
//      2*MF_HC (256 x 128) tile, k in stages of MF_KC through a MF_STAGES-deep cp.async ring (stage
//      kc + 2 in flight while kc is computed); 8 warps (4 along M x 2 along N) of 64 x 64. Shared
//      rows are 80 bytes, so the 8 rows of an ldmatrix matrix fall in 8 distinct 16-byte bank groups
//      (checked on the emulated GPU: OU_LDMATRIX_BANK_CHECK). The column width sets how often an
//      image's x is read from L2: H / MF_HC times (45 for SANA's 2880).
//   2. The tile + bias, rounded to bf16 (what the unfused GEMM stores), SiLU, as f32 in shared memory
//      (it reuses the stages' memory; 256 x 129 f32 = MF_SMEM bytes, the largest part).
//   3. The depthwise 3x3 conv of both halves from shared memory (zero padding at the image's
//      edges), then u * silu(g), written as bf16: one thread per (token, channel).
//
//   mixffn_inverted_glu_bf16_wgmma(map_x, map_w, bi, wd, bd, y, h, wd_, c, hidden)      sm_90a
//       The same block (whole latents only: h*wd_ <= MF_M) with its GEMM on wgmma fed by TMA (the
//       pipeline of conv_sm90.cu); grid (ceil(H / MF_HC), 1, B), MF90_THREADS threads, MF90_SMEM
//       bytes of dynamic shared memory. Described at its definition below and in docs/hopper.md.
//       On other architectures it compiles to a trap and is never selected.
//
// Known next steps of the mma.sync kernel, to be measured on a GPU: the A tile is still reread from L2 by every channel
// slice (a 2-CTA cluster sharing it through distributed shared memory would halve that), 16-byte
// output stores, the halo recompute at 32x32 (8 GEMM rows per 6 output rows).

#include "common.cuh"
#include "conv_geometry.cuh"
#include "cp_async.cuh"
// The emulated ldmatrix fails a launch whose 8x8 matrix rows hit a shared-memory bank twice.
#define OU_LDMATRIX_BANK_CHECK 1
#include "mma.cuh"
#include "mbarrier.cuh"
#include "sm90.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#if defined(OPENUNI_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define OU_MIXFFN_SM90 1
#else
#define OU_MIXFFN_SM90 0
#endif

namespace ou {

constexpr int MF_KC = 32;             // k per pipeline stage
constexpr int MF_LD = MF_KC + 8;      // bf16 per shared row: 80 bytes (see above)
constexpr int MF_COLS = 2 * MF_HC;    // GEMM columns per block: MF_HC u channels, then their gates
constexpr int MF_SLD = MF_COLS + 1;   // f32 per row of the activated tile
constexpr int MF_THREADS = 256;
constexpr int MF_STAGES = 3;
constexpr int MF_WM = 4, MF_WN = 2;                         // warps along M and N
constexpr int MF_TM = MF_M / MF_WM, MF_TN = MF_COLS / MF_WN;  // warp tile: 64 x 64
constexpr int MF_MI = MF_TM / 16, MF_NI = MF_TN / 8;          // m16 and n8 tiles per warp
static_assert(MF_WM * MF_WN * 32 == MF_THREADS, "8 warps");
static_assert(MF_NI % 2 == 0, "B fragments are loaded two n8 tiles at a time");

struct MfStage {
    bf16 a[MF_M][MF_LD];
    bf16 b[MF_COLS][MF_LD];
};
union MfSmem {
    MfStage st[MF_STAGES];
    float act[MF_M][MF_SLD];
};
static_assert(sizeof(MfSmem) == MF_SMEM, "conv_geometry.cuh's MF_SMEM is the launcher's dynamic shared memory");

__device__ __forceinline__ float mf_silu(float v) { return v / (1.f + expf(-v)); }

// The block's per-column constants for the epilogue, from every one of `nthreads` threads: the
// depthwise weights Wdw[tap][j], the GEMM bias Bi[j] and the depthwise bias Bd[j] of column j (channel
// (j < MF_HC ? 0 : hidden) + c0 + j % MF_HC; zero for channels >= hidden and absent biases).
__device__ __forceinline__ void mf_load_columns(float (*Wdw)[MF_COLS], float* Bi, float* Bd, const bf16* __restrict__ wd,
                                                const bf16* __restrict__ bi, const bf16* __restrict__ bd, int c0,
                                                int hidden, int tid, int nthreads) {
    for (int i = tid; i < 9 * MF_COLS; i += nthreads) {
        const int tap = i / MF_COLS, j = i % MF_COLS, cl = c0 + j % MF_HC;
        const i64 ch = (j < MF_HC ? 0 : hidden) + cl;
        Wdw[tap][j] = cl < hidden ? to_f32(wd[ch * 9 + tap]) : 0.f;
    }
    for (int j = tid; j < MF_COLS; j += nthreads) {
        const int cl = c0 + j % MF_HC;
        const i64 ch = (j < MF_HC ? 0 : hidden) + cl;
        Bi[j] = cl < hidden && bi ? to_f32(bi[ch]) : 0.f;
        Bd[j] = cl < hidden && bd ? to_f32(bd[ch]) : 0.f;
    }
}

// The last step of both kernels: the depthwise 3x3 conv of both GLU halves from the activated GEMM
// tile `act` (f32, row m = token (lo rows above) of the image, `ld` floats a row; columns j < MF_HC
// the u channels c0 + j, MF_HC + j their gates; zero padding at the image's edges), then
// u * silu(g), written as bf16 to output rows [r0, r1) of image blockIdx.z. `nthreads` threads,
// this one `tid`; one (token, channel) per thread and step, consecutive threads on consecutive
// channels (consecutive shared words and output bytes).
__device__ __forceinline__ void mf_depthwise_glu(const float* act, int ld, const float (*Wdw)[MF_COLS], const float* Bd,
                                                 bf16* __restrict__ y, int tid, int nthreads, int h, int wdt, int hidden,
                                                 int c0, int r0, int r1, int lo) {
    const int j = tid % MF_HC, ch = c0 + j;
    if (ch >= hidden) return;  // no barrier follows
    const int outs = (r1 - r0) * wdt;
    bf16* yb = y + (i64)blockIdx.z * h * wdt * hidden;
    for (int p = tid / MF_HC; p < outs; p += nthreads / MF_HC) {
        const int oy = r0 + p / wdt, ox = p % wdt;
        float u = Bd[j], gt = Bd[j + MF_HC];
#pragma unroll
        for (int dy = 0; dy < 3; ++dy) {
            const int iy = oy + dy - 1;
            if (iy < 0 || iy >= h) continue;
#pragma unroll
            for (int dx = 0; dx < 3; ++dx) {
                const int ix = ox + dx - 1;
                if (ix < 0 || ix >= wdt) continue;
                const float* s = act + (i64)((iy - lo) * wdt + ix) * ld;
                u += Wdw[dy * 3 + dx][j] * s[j];
                gt += Wdw[dy * 3 + dx][j + MF_HC] * s[j + MF_HC];
            }
        }
        yb[((i64)oy * wdt + ox) * hidden + ch] = from_f32<bf16>(u * mf_silu(gt));
    }
}

__device__ __forceinline__ void mixffn_inverted_glu(const bf16* __restrict__ x, const bf16* __restrict__ wi,
                                                    const bf16* __restrict__ bi, const bf16* __restrict__ wd,
                                                    const bf16* __restrict__ bd, bf16* __restrict__ y, int h,
                                                    int wdt, int c, int hidden, int band) {
    extern __shared__ __align__(128) unsigned char ou_mixffn_smem[];
    MfSmem& sm = *reinterpret_cast<MfSmem*>(ou_mixffn_smem);
    __shared__ float Wdw[9][MF_COLS];
    __shared__ float Bi[MF_COLS], Bd[MF_COLS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % MF_WM, wn = warp / MF_WM;
    const int c0 = blockIdx.x * MF_HC;
    const int r0 = blockIdx.y * band, r1 = min(r0 + band, h);  // output rows [r0, r1)
    const int lo = max(r0 - 1, 0), hi = min(r1 + 1, h);        // GEMM rows [lo, hi) of the image
    const int rows = (hi - lo) * wdt;                           // <= MF_M (the launcher's band)
    const bf16* xb = x + ((i64)blockIdx.z * h + lo) * wdt * c;

    // Column j of the tile is channel (j < MF_HC ? 0 : hidden) + c0 + j % MF_HC; it exists when
    // c0 + j % MF_HC < hidden (zero weights otherwise, never written).
    mf_load_columns(Wdw, Bi, Bd, wd, bi, bd, c0, hidden, tid, MF_THREADS);

    // One stage: rows x k0..k0+MF_KC of x and the block's columns of wi, zero outside.
    auto load = [&](int s, int k0) {
        for (int v = tid; v < MF_M * (MF_KC / 8); v += MF_THREADS) {
            const int m = v / (MF_KC / 8), k = k0 + 8 * (v % (MF_KC / 8));
            const bool ok = m < rows && k < c;
            cp_async_16(&sm.st[s].a[m][k - k0], ok ? xb + (i64)m * c + k : x, ok);
        }
        for (int v = tid; v < MF_COLS * (MF_KC / 8); v += MF_THREADS) {
            const int j = v / (MF_KC / 8), k = k0 + 8 * (v % (MF_KC / 8)), cl = c0 + j % MF_HC;
            const bool ok = cl < hidden && k < c;
            const i64 ch = (j < MF_HC ? 0 : hidden) + cl;
            cp_async_16(&sm.st[s].b[j][k - k0], ok ? wi + ch * c + k : wi, ok);
        }
    };

    float acc[MF_MI][MF_NI][4];
#pragma unroll
    for (int mi = 0; mi < MF_MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < MF_NI; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;
    const bool busy = wm * MF_TM < rows;  // warp-uniform: a warp past the band's rows has no work
    const int nk = (c + MF_KC - 1) / MF_KC;
    // Ring: one commit group per stage, empty past the last chunk, so that in iteration kc
    // `wait<MF_STAGES - 2>` means chunk kc has landed.
#pragma unroll
    for (int s = 0; s < MF_STAGES - 1; ++s) {
        if (s < nk) load(s, s * MF_KC);
        cp_async_commit();
    }
    for (int kc = 0; kc < nk; ++kc) {
        cp_async_wait<MF_STAGES - 2>();
        __syncthreads();  // chunk kc visible to all; the stage computed in iteration kc - 1 is free
        const int next = kc + MF_STAGES - 1;
        if (next < nk) load(next % MF_STAGES, next * MF_KC);
        cp_async_commit();
        if (busy) {
            const MfStage& st = sm.st[kc % MF_STAGES];
#pragma unroll
            for (int kk = 0; kk < MF_KC; kk += 16) {
                unsigned a[MF_MI][4], b[MF_NI][2];
#pragma unroll
                for (int mi = 0; mi < MF_MI; ++mi)
                    ldmatrix_x4(a[mi], &st.a[wm * MF_TM + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
                for (int np = 0; np < MF_NI / 2; ++np) {
                    unsigned r[4];
                    ldmatrix_x4(r, &st.b[wn * MF_TN + np * 16 + (lane & 7) + (lane >> 4) * 8][kk + ((lane >> 3) & 1) * 8]);
                    b[2 * np][0] = r[0];
                    b[2 * np][1] = r[1];
                    b[2 * np + 1][0] = r[2];
                    b[2 * np + 1][1] = r[3];
                }
#pragma unroll
                for (int mi = 0; mi < MF_MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < MF_NI; ++ni) mma_m16n8k16_bf16_f32(acc[mi][ni], a[mi], b[ni], acc[mi][ni]);
            }
        }
    }
    cp_async_wait<0>();  // only empty groups remain; nothing may be pending at the block's end
    __syncthreads();     // every warp done with the stages before they become `act`

    // 2. bias, bf16 rounding, SiLU -> act (f32).
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MF_MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < MF_NI; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = wm * MF_TM + mi * 16 + g + (i >= 2 ? 8 : 0), j = wn * MF_TN + ni * 8 + 2 * tq + (i & 1);
                const float v = to_f32(from_f32<bf16>(acc[mi][ni][i] + Bi[j]));
                sm.act[m][j] = mf_silu(v);
            }
    __syncthreads();

    // 3. depthwise 3x3 + GLU.
    mf_depthwise_glu(&sm.act[0][0], MF_SLD, Wdw, Bd, y, tid, MF_THREADS, h, wdt, hidden, c0, r0, r1, lo);
}


// ---- sm_90a: the same block on wgmma, fed by TMA (mixffn_inverted_glu_bf16_wgmma) ----
//
// The block (one image of at most MF_M tokens, MF_HC channels: 256 x 128 GEMM tile) and the epilogue
// are those of the kernel above; the GEMM is conv_sm90.cu's pipeline (docs/hopper.md): warpgroup 0
// is the producer (setmaxnreg.dec to 40; one thread issues the TMA boxes of a stage after waiting on
// its `empty` barrier), warpgroups 1 and 2 the consumers (setmaxnreg.inc to 232), consumer c owning
// tokens 128c .. 128c + 127 as two m64 blocks x 128 columns (128 f32 accumulators a thread). A stage
// is k = 64 input channels: consumer c's A box (x [B, hw, C] as a 3D map, box 64 x 128 x 1: tokens
// past the image are the TMA's zero fill) and the B tile, two boxes of the weight [2H, C] (box 64 x
// 64): rows c0 .. c0 + 63 (u) and H + c0 .. (gates), each 64 rows of 128 bytes, so the two land as
// one 128-row K-major operand (the 128B swizzle repeats every 8 rows). Columns of channels >= H are
// computed from whatever rows the boxes hold (zero fill or gate rows) and never written.
// After the mainloop the consumers meet on an mbarrier (both must be done reading every stage), store
// silu(bf16(acc + bias)) as f32 over the stages ([token][MF90_LD]: the float2 stores of a half-warp
// fall in 32 distinct banks), meet again, and run mf_depthwise_glu.

constexpr int MF90_CONSUMERS = 2;
constexpr int MF90_ROWS = MF_M / MF90_CONSUMERS;                    // tokens of one consumer: 2 x m64
constexpr unsigned MF90_A_BYTES = MF90_ROWS * MF90_CHUNK * 2;       // 16 KiB
constexpr unsigned MF90_B_HALF = MF_HC * MF90_CHUNK * 2;            // one weight box: 8 KiB
constexpr unsigned MF90_STAGE_BYTES = MF90_CONSUMERS * MF90_A_BYTES + 2 * MF90_B_HALF;
constexpr int MF90_LD = MF_COLS + 8;                                // f32 per row of the activated tile
static_assert(MF90_THREADS == 128 * (1 + MF90_CONSUMERS), "one producer and two consumer warpgroups");
static_assert(MF90_CHUNK * 2 == 128, "a stage's k extent is one 128-byte swizzle line");
static_assert(MF90_ROWS == 128 && MF_COLS == 128, "a consumer issues 2 x m64n128 per k16 step");
static_assert(MF90_B_HALF % 1024 == 0, "the gate box starts on a swizzle-pattern boundary");
static_assert(MF90_SMEM == 1024 + MF90_STAGES * MF90_STAGE_BYTES + 128, "MF90_SMEM: slack + stages + barriers");
static_assert(MF_M * MF90_LD * 4 <= MF90_STAGES * (int)MF90_STAGE_BYTES, "the activated tile fits over the stages");
static_assert((2 * MF90_STAGES + 2) * 8 <= 128, "the barriers fit their 128 bytes");

#if OU_MIXFFN_SM90
__device__ __forceinline__ void mixffn_inverted_glu_sm90(unsigned char* dyn_smem, const TensorMap& map_x,
                                                         const TensorMap& map_w, const bf16* __restrict__ bi,
                                                         const bf16* __restrict__ wd, const bf16* __restrict__ bd,
                                                         bf16* __restrict__ y, int h, int wdt, int c, int hidden) {
    // Stages on a 1024-byte boundary (the 128B swizzle pattern; descriptors say base offset 0).
    unsigned char* sm = dyn_smem + ((1024u - smem_addr(dyn_smem) % 1024u) % 1024u);
    unsigned long long* full = reinterpret_cast<unsigned long long*>(sm + MF90_STAGES * MF90_STAGE_BYTES);
    unsigned long long* empty = full + MF90_STAGES;
    unsigned long long* met = empty + MF90_STAGES;  // [0]: mainloops done; [1]: tile stored
    auto a_stage = [&](int s, int cn) { return sm + s * MF90_STAGE_BYTES + cn * MF90_A_BYTES; };
    auto b_stage = [&](int s) { return sm + s * MF90_STAGE_BYTES + MF90_CONSUMERS * MF90_A_BYTES; };
    __shared__ float Wdw[9][MF_COLS];
    __shared__ float Bi[MF_COLS], Bd[MF_COLS];

    const int c0 = blockIdx.x * MF_HC, b = blockIdx.z;
    const int iters = (c + MF90_CHUNK - 1) / MF90_CHUNK;
    const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
    mf_load_columns(Wdw, Bi, Bd, wd, bi, bd, c0, hidden, tid, MF90_THREADS);
    if (tid == 0) {
        tma_prefetch_map(map_x);
        tma_prefetch_map(map_w);
        for (int s = 0; s < MF90_STAGES; ++s) {
            mbarrier_init(&full[s], 1);                      // the producer's arrive.expect_tx; then the bytes
            mbarrier_init(&empty[s], 128 * MF90_CONSUMERS);  // every consumer thread, after its wgmma reads
        }
        mbarrier_init(&met[0], 128 * MF90_CONSUMERS);
        mbarrier_init(&met[1], 128 * MF90_CONSUMERS);
        mbarrier_init_fence();
    }
    __syncthreads();  // the only block-wide barrier: the producer leaves early

    if (wg == 0) {
        setmaxnreg_dec<WarpSpecializedRegs::PRODUCER>();
        if (t != 0) return;
        for (int it = 0; it < iters; ++it) {
            const int s = it % MF90_STAGES, k0 = it * MF90_CHUNK;
            mbarrier_wait_parity(&empty[s], ((unsigned)(it / MF90_STAGES) & 1u) ^ 1u);  // fresh: passes at once
            mbarrier_arrive_expect_tx(&full[s], MF90_STAGE_BYTES);
#pragma unroll
            for (int cn = 0; cn < MF90_CONSUMERS; ++cn) tma_load_3d(a_stage(s, cn), map_x, &full[s], k0, cn * MF90_ROWS, b);
            tma_load_2d(b_stage(s), map_w, &full[s], k0, c0);
            tma_load_2d(b_stage(s) + MF90_B_HALF, map_w, &full[s], k0, hidden + c0);
        }
        return;
    }

    setmaxnreg_inc<WarpSpecializedRegs::CONSUMER>();
    const int cn = wg - 1;
    float acc[2][MF_COLS / 2];
    for (int it = 0; it < iters; ++it) {
        const int s = it % MF90_STAGES;
        mbarrier_wait_parity(&full[s], (unsigned)(it / MF90_STAGES) & 1u);
        wgmma_fence_operand(acc[0]);
        wgmma_fence_operand(acc[1]);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < MF90_CHUNK / 16; ++k) {
            const unsigned long long db = wgmma_desc(b_stage(s) + 32 * k, 16, 1024, Swizzle::b128);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const unsigned long long da = wgmma_desc(a_stage(s, cn) + i * (MF90_A_BYTES / 2) + 32 * k, 16, 1024, Swizzle::b128);
                wgmma_mma_ss<MF_COLS, 0, 0>(acc[i], da, db, it > 0 || k > 0);
            }
        }
        wgmma_commit_group();
        wgmma_wait_group<1>();  // the previous stage's group is complete: release that stage
        wgmma_fence_operand(acc[0]);
        wgmma_fence_operand(acc[1]);
        if (it > 0) mbarrier_arrive(&empty[(it - 1) % MF90_STAGES]);
    }
    wgmma_wait_group<0>();
    wgmma_fence_operand(acc[0]);
    wgmma_fence_operand(acc[1]);

    // Both consumers' wgmma have read every stage: the stages become the activated tile.
    mbarrier_arrive(&met[0]);
    mbarrier_wait_parity(&met[0], 0);
    fence_proxy_async();
    float* act = reinterpret_cast<float*>(sm);
    // Accumulator register 4j + r of m64 block i: token 16 warp + g + 8 (r / 2) of the block, column
    // 8j + 2tq + (r % 2). Stored as they are (the only loop unrolled over the accumulators: its code
    // runs once per block from a cold instruction cache, as conv_sm90.cuh's epilogue explains), then
    // each thread turns its own values into what the unfused GEMM stores (bias added, rounded to
    // bf16), then SiLU, in a rolled loop.
    const int warp = t / 32, lane = t % 32, g = lane / 4, tq = lane % 4;
    auto at = [&](int i, int half, int jn) {
        return act + (cn * MF90_ROWS + 64 * i + 16 * warp + g + 8 * half) * MF90_LD + 8 * jn + 2 * tq;
    };
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int jn = 0; jn < MF_COLS / 8; ++jn)
                *reinterpret_cast<float2*>(at(i, half, jn)) = make_float2(acc[i][4 * jn + 2 * half], acc[i][4 * jn + 2 * half + 1]);
#pragma unroll 1
    for (int q = 0; q < 4 * (MF_COLS / 8); ++q) {
        const int i = q / (2 * (MF_COLS / 8)), half = q / (MF_COLS / 8) % 2, jn = q % (MF_COLS / 8), j = 8 * jn + 2 * tq;
        float2* v = reinterpret_cast<float2*>(at(i, half, jn));
        const float2 r = *v;
        *v = make_float2(mf_silu(to_f32(from_f32<bf16>(r.x + Bi[j]))), mf_silu(to_f32(from_f32<bf16>(r.y + Bi[j + 1]))));
    }
    mbarrier_arrive(&met[1]);
    mbarrier_wait_parity(&met[1], 0);
    mf_depthwise_glu(act, MF90_LD, Wdw, Bd, y, tid - 128, 128 * MF90_CONSUMERS, h, wdt, hidden, c0, 0, h, 0);
}
#endif

}  // namespace ou

using ou::bf16;

extern "C" __global__ void __launch_bounds__(256, 1) mixffn_inverted_glu_bf16(const bf16* x, const bf16* wi, const bf16* bi,
                                                                           const bf16* wd, const bf16* bd, bf16* y, int h,
                                                                           int wdt, int c, int hidden, int band) {
    ou::mixffn_inverted_glu(x, wi, bi, wd, bd, y, h, wdt, c, hidden, band);
}

extern "C" __launch_bounds__(384, 1) __global__ void mixffn_inverted_glu_bf16_wgmma(const __grid_constant__ ou::TensorMap map_x, const __grid_constant__ ou::TensorMap map_w, const bf16* bi, const bf16* wd, const bf16* bd, bf16* y, int h, int wdt, int c, int hidden) {
#if OU_MIXFFN_SM90
    extern __shared__ __align__(1024) unsigned char ou_mixffn_sm90_smem[];
    ou::mixffn_inverted_glu_sm90(ou_mixffn_sm90_smem, map_x, map_w, bi, wd, bd, y, h, wdt, c, hidden);
#else
    __trap();  // not sm_90a: the launcher never selects this kernel
#endif
}
