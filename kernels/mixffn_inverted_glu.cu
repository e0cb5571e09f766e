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
// Known next steps, to be measured on a GPU: the A tile is still reread from L2 by every channel
// slice (a 2-CTA cluster sharing it through distributed shared memory would halve that), 16-byte
// output stores, the halo recompute at 32x32 (8 GEMM rows per 6 output rows).

#include "common.cuh"
#include "conv_geometry.cuh"
#include "cp_async.cuh"
// The emulated ldmatrix fails a launch whose 8x8 matrix rows hit a shared-memory bank twice.
#define OU_LDMATRIX_BANK_CHECK 1
#include "mma.cuh"

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
    for (int i = tid; i < 9 * MF_COLS; i += MF_THREADS) {
        const int t = i / MF_COLS, j = i % MF_COLS, cl = c0 + j % MF_HC;
        const i64 ch = (j < MF_HC ? 0 : hidden) + cl;
        Wdw[t][j] = cl < hidden ? to_f32(wd[ch * 9 + t]) : 0.f;
    }
    for (int j = tid; j < MF_COLS; j += MF_THREADS) {
        const int cl = c0 + j % MF_HC;
        const i64 ch = (j < MF_HC ? 0 : hidden) + cl;
        Bi[j] = cl < hidden && bi ? to_f32(bi[ch]) : 0.f;
        Bd[j] = cl < hidden && bd ? to_f32(bd[ch]) : 0.f;
    }

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

    // 3. depthwise 3x3 + GLU, one (token, channel) per thread and step.
    const int j = tid % MF_HC, ch = c0 + j;
    if (ch >= hidden) return;  // no barrier follows
    const int outs = (r1 - r0) * wdt;
    bf16* yb = y + (i64)blockIdx.z * h * wdt * hidden;
    for (int p = tid / MF_HC; p < outs; p += MF_THREADS / MF_HC) {
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
                const float* s = sm.act[(iy - lo) * wdt + ix];
                u += Wdw[dy * 3 + dx][j] * s[j];
                gt += Wdw[dy * 3 + dx][j + MF_HC] * s[j + MF_HC];
            }
        }
        yb[((i64)oy * wdt + ox) * hidden + ch] = from_f32<bf16>(u * mf_silu(gt));
    }
}

}  // namespace ou

using ou::bf16;

extern "C" __global__ void __launch_bounds__(256, 1) mixffn_inverted_glu_bf16(const bf16* x, const bf16* wi, const bf16* bi,
                                                                           const bf16* wd, const bf16* bd, bf16* y, int h,
                                                                           int wdt, int c, int hidden, int band) {
    ou::mixffn_inverted_glu(x, wi, bi, wd, bd, y, h, wdt, c, hidden, band);
}
