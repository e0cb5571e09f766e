// conv.cu: the DC-AE decoder's convolution family, on tokens [B, h*w, C] (NHWC: the h x w grid
// row-major, channels contiguous). Storage f32 or bf16, all arithmetic f32.
// CPU twins: openuni_cpu::ops::{conv2d, upsample_conv2d, depthwise_conv2d, depthwise_conv_glu,
// grouped_linear, repeat_channels}. Launchers: crates/cuda/src/families/conv.rs.
//
//   conv2d_bf16_tc{,_n128}(x, w, bias, res, y, h, wd, cin, cout, act)   grid (tiles of 8 x 16 pixels x batch, Cout / BN)
//       3x3 convolution, stride 1, zero padding 1, on the tensor cores (mma.sync m16n8k16 bf16 -> f32
//       through kernels/include/mma.cuh). Implicit GEMM: M = output pixels, N = Cout, K = Cin * 9.
//       A block computes an 8 x 16 tile of output pixels (M = 128) for BN output channels (64, or
//       128 in the _n128 instance, which the launcher picks when Cout % 128 == 0), in chunks of 16
//       input channels, through a TC_STAGES-deep cp.async ring (3 stages: chunk c + 2 is in flight
//       while chunk c is computed). Each stage holds the 10 x 18 input halo (each input pixel read
//       once per chunk, not 9 times as an explicit im2col would) and the chunk's [9][BN][16]
//       weights, both as 32-byte rows with a bank-conflict-free swizzle (analysis at tc_swz).
//       w is NOT the upstream [Cout, Cin, 3, 3]: it is the layout prepared once at load
//       (openuni_cuda::families::conv::prepare_conv_weight, ConvWeightLayout::Taps3x3: rows of 16
//       input channels, Cout padded to 128), so a stage is whole 16-byte copies, no scatter.
//       8 warps, 4 along M x 2 along N, each 32 pixels x BN/2 channels: per tap and chunk 2
//       ldmatrix.x4 for A (the tap's shift is just another row address), BN/32 for B, BN/4 mma.
//       Epilogue in f32: + bias, then SiLU when act == 1, then + res (same shape as y) when res is
//       non-null, rounded once. Any Cin, Cout, h, w: cp.async of the halo when Cin % 8 == 0 (the
//       launcher asserts x 16-byte aligned then, never a silent fallback), element loads (zero-filled
//       past Cin) otherwise; pixels and channels past the edges are masked. Dynamic shared memory
//       (the launcher sizes it): 3 x (5,760 + 9 x BN x 32) bytes = 72,576 (BN 64) or 127,872 (BN 128).
//       __launch_bounds__(256, 2) for BN 64 (two blocks per SM, <= 128 registers), (256, 1) for 128.
//   conv2d_{f32,bf16}(x, w, bias, res, y, h, wd, cin, cout, k, act) grid as conv2d_bf16_tc
//       k x k convolution (odd k <= 7), stride 1, zero padding k/2, on the CUDA cores with f32 FMAs:
//       the f32-storage path (the 1e-5 tolerance rules out TF32 and bf16 tensor cores) and the bf16
//       path for kernel sizes other than 3. Same tiling as above (8 x 16 pixels x 64 channels, the
//       input halo in shared memory), chunks of 8 input channels, weights of up to 9 taps at a time;
//       each thread accumulates one tile column (8 pixels) x 4 channels. Same epilogue.
//   upsample_conv2d_bf16_tc{,_n128}(x, w, bias, y, h, wd, cin, cout, shortcut)
//       DC-AE's DCUpBlock2d in one kernel: conv3x3(upsample2x(x)) + bias (+ the pixel-shuffle
//       shortcut of x when shortcut != 0), x on the h x wd grid, y on 2h x 2wd. The 3x3 conv of a
//       nearest-upsampled input is, for each output parity (pi, pj), a 2x2 conv of the
//       low-resolution input with weights summed over tap groups: 16 instead of 36 taps per 4
//       outputs (2.25x fewer MACs), and the upsampled tensor (4x the input) is never written or
//       read. The sums are made once at load, in f32 from the checkpoint, rounded once
//       (ConvWeightLayout::UpsamplePhases; derivation at prepare_conv_weight). blockIdx.z is the
//       phase; otherwise conv2d_bf16_tc's kernel (the same conv_tc template) with 4 taps on the
//       low-resolution grid. The shortcut is gathered from x in the epilogue. Dynamic shared memory
//       3 x (5,760 + 4 x BN x 32) = 41,856 (BN 64) or 66,432 (BN 128) bytes.
//   upsample_conv2d_{f32,bf16}(x, w, bias, y, h, wd, cin, cout, shortcut)
//       The same op on the CUDA cores (conv2d_direct with UP: the halo loader reads x at half the
//       coordinates); the f32-storage path and a second bf16 implementation for the tests.
//   depthwise_conv2d_{f32,bf16}(x, w, bias, y, batch, h, wd, c, k)
//   depthwise_conv3_glu_{f32,bf16}(x, w, bias, y, batch, h, wd, c): the 3x3 depthwise conv of a
//     [.., 2c] input fused with GLUMBConv's gate, u * silu(g) -> [.., c] (the 2c-wide conv output
//     is never stored)
//   silu_depthwise_conv3_glu_{f32,bf16}(x, w, bias, y, batch, h, wd, c): the same on silu(x), the
//     SiLU applied to each input vector as it is loaded (GLUMBConv's conv_inverted activation: the
//     activated 2c-wide tensor is never stored either; each element is loaded, and its SiLU
//     evaluated, about (DW_ROWS + 2) * 3 / DW_ROWS times, which costs ALU, not memory)
//       Depthwise k x k (odd k <= 7), zero padding k/2, weight [C, 1, k, k], bias may be null. Block
//       (32, 8) owns 128 channels (blockIdx.y) whose weights it stages once in shared memory (25 KiB
//       at most), then strides over (sample, 4-row block, column) items. A thread computes 4
//       channels (one 16-byte f32 / 8-byte bf16 vector when C % 4 == 0 and aligned) of 4 vertically
//       adjacent output pixels: it walks the 4 + k - 1 input rows once, so each input vector it loads
//       feeds up to k outputs. The 32 lanes of a warp cover 128 consecutive channels of one pixel
//       (coalesced). k = 3 and 5 (GLUMBConv, multi-scale branch) are compiled with constant tap
//       loops. (Weights held in registers instead cost 158 registers at k = 5.)
//   grouped_linear_{f32,bf16}(x, w, y, rows, cin, cout, groups)
//       Block-diagonal 1x1 convolution (no bias): group g maps input channels [g ci, (g+1) ci) to
//       output channels [g co, (g+1) co) with weight rows [g co, (g+1) co) of width ci. A block
//       computes 128 rows x 32 outputs of one group (the decoder's groups are 32 -> 32) through shared
//       tiles of 32 input channels; each thread a 4 x 4 block of outputs.
//   repeat_channels_{f32,bf16}(x, y, rows, cin, repeats)
//       repeat_interleave over channels: out[r, c] = x[r, c / repeats] (conv_in's shortcut).
//   conv_geometry(out)
//       Writes the tile geometry the kernels above are compiled with (12 ints), for the test that
//       compares it with the launcher's. The geometry the launcher needs is defined once, in
//       kernels/include/conv_geometry.cuh; crates/cuda/build.rs generates the launcher's constants
//       from that header.
//
// Version 2 (this one): the tensor-core kernels read weights prepared at load, pipeline their loads
// through a 3-stage cp.async ring into swizzled shared rows, and take a 128-channel tile where Cout
// allows. Known next steps, to be measured on a GPU: shared-memory staging of the output tile for
// 16-byte stores, a 2-CTA or larger M tile for the 1024-channel shapes, the sm_90a wgmma/TMA version
// (kernels of their own, docs/hopper.md).

#include "common.cuh"
#include "conv_geometry.cuh"
#include "cp_async.cuh"
#include "fast_math.cuh"
// The emulated ldmatrix fails a launch whose 8x8 matrix rows hit a shared-memory bank twice.
#define OU_LDMATRIX_BANK_CHECK 1
#include "mma.cuh"

namespace ou {

// The activation of the conv epilogues: silu_fast (as conv_sm90's), not an IEEE divide of the accurate
// expf (dozens of instructions per output element, and code the epilogue then fetches per tile).
__device__ __forceinline__ float conv_epilogue(float v, int act) {
    return act == 1 ? silu_fast(v) : v;
}

// ---------------------------------------------------------------------------------------------
// conv2d on the CUDA cores (any odd k <= 7)

constexpr int CV_TH = CONV_TILE_H, CV_TW = CONV_TILE_W;  // output tile: 8 rows x 16 columns
constexpr int CV_BN = CONV_TILE_N;                       // output channels per block
constexpr int CV_BK = 8;                                 // input channels per chunk
constexpr int CV_KMAX = CONV_KMAX;                       // largest kernel the halo buffer holds
constexpr int CV_TAPS = 9;             // taps of weights staged at a time
constexpr int CV_HALO = (CV_TH + CV_KMAX - 1) * (CV_TW + CV_KMAX - 1);

// blockIdx.x -> (first output column, first output row, sample) of the block's tile.
__device__ __forceinline__ void tile_origin(int th, int tw, int h, int wd, int& ox0, int& oy0, int& b) {
    const int tiles_x = (wd + tw - 1) / tw, tiles_y = (h + th - 1) / th;
    int t = blockIdx.x;
    ox0 = (t % tiles_x) * tw;
    t /= tiles_x;
    oy0 = (t % tiles_y) * th;
    b = t / tiles_y;
}

// UP: the conv runs over the nearest-2x upsampled input without materializing it (x is the h x wd
// low-resolution grid, the conv grid and y are 2h x 2wd), and `shortcut` adds DC-AE's
// pixel-shuffle shortcut of x to the output.
template <typename T, bool UP>
__device__ __forceinline__ void conv2d_direct(const T* __restrict__ x, const T* __restrict__ w,
                                              const T* __restrict__ bias, const T* __restrict__ res,
                                              T* __restrict__ y, int h, int wd, int cin, int cout, int k, int act,
                                              int shortcut) {
    __shared__ float As[CV_HALO][CV_BK];
    __shared__ float Bs[CV_TAPS][CV_BK][CV_BN];
    const int tid = threadIdx.x;
    const int tn = tid & 15;  // output channels 4 tn .. 4 tn + 3
    const int tm = tid >> 4;  // tile column
    const int H = UP ? 2 * h : h, W = UP ? 2 * wd : wd;  // the conv grid
    int ox0, oy0, b;
    tile_origin(CV_TH, CV_TW, H, W, ox0, oy0, b);
    const int n0 = blockIdx.y * CV_BN;
    const int pad = k / 2, hw = CV_TW + k - 1, hh = CV_TH + k - 1, kk = k * k;
    const i64 img = (i64)b * h * wd;     // first pixel of the sample in x
    const i64 img_out = (i64)b * H * W;  // in y

    float acc[CV_TH][4];
#pragma unroll
    for (int r = 0; r < CV_TH; ++r)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[r][j] = 0.f;

    for (int c0 = 0; c0 < cin; c0 += CV_BK) {
        __syncthreads();  // the previous chunk's reads of As and Bs are done
        for (int i = tid; i < hh * hw * CV_BK; i += blockDim.x) {
            const int p = i / CV_BK, ci = i % CV_BK;
            const int iy = oy0 - pad + p / hw, ix = ox0 - pad + p % hw;
            float v = 0.f;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W && c0 + ci < cin) {
                const i64 src = UP ? (i64)(iy >> 1) * wd + (ix >> 1) : (i64)iy * wd + ix;
                v = to_f32(x[(img + src) * cin + c0 + ci]);
            }
            As[p][ci] = v;
        }
        for (int t0 = 0; t0 < kk; t0 += CV_TAPS) {
            const int nt = min(CV_TAPS, kk - t0);
            if (t0 > 0) __syncthreads();  // the previous taps' reads of Bs are done
            // Weights [Cout, Cin, k, k]: (ci, tap) runs are contiguous for one output channel.
            for (int i = tid; i < CV_BN * CV_BK * nt; i += blockDim.x) {
                const int t = i % nt, ci = (i / nt) % CV_BK, n = i / (nt * CV_BK);
                float v = 0.f;
                if (n0 + n < cout && c0 + ci < cin) v = to_f32(w[((i64)(n0 + n) * cin + c0 + ci) * kk + t0 + t]);
                Bs[t][ci][n] = v;
            }
            __syncthreads();
            for (int t = 0; t < nt; ++t) {
                const int dy = (t0 + t) / k, dx = (t0 + t) % k;
#pragma unroll
                for (int ci = 0; ci < CV_BK; ++ci) {
                    float bv[4];
#pragma unroll
                    for (int j = 0; j < 4; ++j) bv[j] = Bs[t][ci][tn * 4 + j];
#pragma unroll
                    for (int r = 0; r < CV_TH; ++r) {
                        const float a = As[(r + dy) * hw + tm + dx][ci];
#pragma unroll
                        for (int j = 0; j < 4; ++j) acc[r][j] += a * bv[j];
                    }
                }
            }
        }
    }

    const int ox = ox0 + tm;
    if (ox >= W) return;  // no barrier follows
    const int R = UP && shortcut ? 4 * cout / cin : 1;
#pragma unroll
    for (int r = 0; r < CV_TH; ++r) {
        const int oy = oy0 + r;
        if (oy >= H) break;
        const i64 o = (img_out + (i64)oy * W + ox) * cout;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tn * 4 + j;
            if (n >= cout) break;
            float v = acc[r][j];
            if (bias) v += to_f32(bias[n]);
            v = conv_epilogue(v, act);
            if (res) v += to_f32(res[o + n]);
            if (UP && shortcut)
                v += to_f32(x[(img + (i64)(oy >> 1) * wd + (ox >> 1)) * cin + (4 * n + 2 * (oy & 1) + (ox & 1)) / R]);
            y[o + n] = from_f32<T>(v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// conv2d 3x3 and the upsample conv on the tensor cores (bf16)
//
// Implicit GEMM: M = output pixels (a tile of 8 x 16), N = output channels (BN = 64 or 128), K =
// input channels x taps, in chunks of 16 input channels (one mma k step). Per chunk a stage holds
//   - the input halo, 10 x 18 pixels x 16 channels (each input pixel is read once per chunk, not
//     once per tap as an explicit im2col would): row p = halo pixel, 32 bytes;
//   - the chunk's weights, [TAPS][BN][16]: row t BN + n, 32 bytes. The weights were permuted once
//     at load into exactly this order (families::conv::prepare_conv_weight), so a stage is plain
//     16-byte cp.async copies, no scatter.
// Shared rows are 32 bytes (two 16-byte halves) with the halves swapped on every other group of 4
// rows: half h of row r lives at r * 32 + 16 (h ^ ((r >> 2) & 1)) (tc_swz). Bank check: an ldmatrix
// 8x8 matrix reads 8 consecutive rows, one half each; rows r and r + 4 share (2 r) mod 8 but not
// the swap bit, so the 8 16-byte units (2 r + h') mod 8 are distinct: conflict-free for any first
// row (the tap shift is a row offset). A cp.async quarter-warp writes both halves of 4 rows starting
// at a multiple of 4: units 0..7 once each. The emulated ldmatrix enforces the first property for
// this file (OU_LDMATRIX_BANK_CHECK, kernels/include/mma.cuh); the second follows from the
// loaders' index maps (v -> row v / 2, half v % 2).
// TC_STAGES stages in a cp.async ring: chunk c + STAGES - 1 is in flight while chunk c is computed.

constexpr int TC_TH = CONV_TILE_H, TC_TW = CONV_TILE_W;  // output tile: 8 rows x 16 columns = 128 pixels
constexpr int TC_BK = CONV_TC_CHUNK;                     // input channels per chunk (one mma k step)
constexpr int TC_HH = TC_TH + 2, TC_HW = TC_TW + 2;      // halo 10 x 18
constexpr int TC_HP = TC_HH * TC_HW;                     // 180 halo pixels
constexpr int TC_THREADS = 256;
constexpr int TC_STAGES = CONV_TC_STAGES;                // cp.async ring depth
constexpr int TC_NPAD = CONV_TC_NPAD;                    // prepared weights: output channels padded to this
constexpr int TC_ROWB = 32;                              // bytes per shared row (16 bf16)

// Byte offset of half `hf` (channels 8 hf .. 8 hf + 7) of shared row `r` (see the bank analysis above).
__device__ __forceinline__ int tc_swz(int r, int hf) { return r * TC_ROWB + ((hf ^ ((r >> 2) & 1)) << 4); }

union Bf16x8 {
    uint4 u;
    bf16 e[8];
};

// Bytes of one stage: the halo, then TAPS x BN weight rows.
template <int BN, int TAPS> struct TcStage {
    static constexpr int A_BYTES = TC_HP * TC_ROWB;
    static constexpr int BYTES = A_BYTES + TAPS * BN * TC_ROWB;
};

// The dynamic shared memory of the tensor-core convs (the launcher sizes it: TC_STAGES stages).
// Declared in a plain function, as attention.cu does: the emulated GPU binds every `extern
// __shared__` array to its per-worker buffer, which a declaration inside a template does not get.
__device__ __forceinline__ unsigned char* conv_tc_smem() {
    extern __shared__ __align__(128) unsigned char ou_conv_tc_smem[];
    return ou_conv_tc_smem;
}

// The conv (UP = false, TAPS = 9, grid z = 1) or the upsample conv (UP = true, TAPS = 4, grid z =
// phase 2 pi + pj, the tile on the low-resolution grid) of one block: 8 x 16 pixels x BN channels.
// Warps: 4 along M (2 tile rows each) x 2 along N (BN / 2 channels each).
template <int BN, bool UP, bool VEC>
__device__ __forceinline__ void conv_tc(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                        const bf16* __restrict__ bias, const bf16* __restrict__ res,
                                        bf16* __restrict__ y, int h, int wd, int cin, int cout, int act, int shortcut) {
    constexpr int TAPS = UP ? 4 : 9;
    constexpr int WN = BN / 2;     // output channels per warp
    constexpr int NB = WN / 16;    // ldmatrix.x4 of B per tap (two n8 tiles each)
    constexpr int NJ = 2 * NB;     // n8 tiles per warp
    using Stage = TcStage<BN, TAPS>;
    unsigned char* const tc_smem = conv_tc_smem();

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp & 3;   // tile rows 2 wm, 2 wm + 1
    const int wn = warp >> 2;  // output channels WN wn .. of the block
    const int pi = UP ? (int)blockIdx.z >> 1 : 0, pj = UP ? (int)blockIdx.z & 1 : 0;
    int ox0, oy0, b;
    tile_origin(TC_TH, TC_TW, h, wd, ox0, oy0, b);
    const int n0 = blockIdx.y * BN;
    const i64 img = (i64)b * h * wd;
    const int chunks = (cin + TC_BK - 1) / TC_BK;
    const int npad = (cout + TC_NPAD - 1) / TC_NPAD * TC_NPAD;
    // Prepared weights: rows of 16 bf16, row ((c P + phase) TAPS + t) npad + n with P = 4 phases
    // (UP) or 1.
    const int phases = UP ? 4 : 1, phase = UP ? 2 * pi + pj : 0;

    float acc[2][NJ][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;

    auto load = [&](int c) {
        unsigned char* st = tc_smem + (c % TC_STAGES) * Stage::BYTES;
        const int tid2 = threadIdx.x;
        const int c0 = c * TC_BK;
        for (int v = tid2; v < TC_HP * 2; v += TC_THREADS) {
            const int p = v >> 1, hf = v & 1, ch = c0 + 8 * hf;
            const int iy = oy0 - 1 + p / TC_HW, ix = ox0 - 1 + p % TC_HW;
            const bool in = iy >= 0 && iy < h && ix >= 0 && ix < wd && ch < cin;
            const bf16* src = x + (img + (i64)(in ? iy : 0) * wd + (in ? ix : 0)) * cin + (in ? ch : 0);
            if constexpr (VEC) {
                cp_async_16(st + tc_swz(p, hf), src, in);  // cin % 8 == 0: the whole vector is inside
            } else {
                Bf16x8 e;
                e.u = make_uint4(0u, 0u, 0u, 0u);
                if (in)
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                        if (ch + j < cin) e.e[j] = src[j];
                *reinterpret_cast<uint4*>(st + tc_swz(p, hf)) = e.u;
            }
        }
        unsigned char* bs = st + Stage::A_BYTES;
        const bf16* wc = w + ((i64)(c * phases + phase) * TAPS * npad + n0) * TC_BK;
        for (int v = tid2; v < TAPS * BN * 2; v += TC_THREADS) {
            const int r = v >> 1, hf = v & 1, t = r / BN, n = r % BN;
            cp_async_16(bs + tc_swz(r, hf), wc + ((i64)t * npad + n) * TC_BK + 8 * hf, true);
        }
    };

    // ldmatrix row addresses of this lane: matrix li = lane / 8, row lr = lane % 8.
    // A (16 pixels x 16 channels): matrices (px 0-7, k 0-7), (px 8-15, k 0-7), (px 0-7, k 8-15),
    // (px 8-15, k 8-15) give a[0..3] of the m16n8k16 A fragment.
    // B (16 channels k x 16 outputs n, stored n-major): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
    // (n 8-15, k 0-7), (n 8-15, k 8-15) give b[0..1] of two n8 tiles.
    const int li = lane >> 3, lr = lane & 7;
    const int a_px = lr + 8 * (li & 1), a_hf = li >> 1;
    const int b_n = 8 * (li >> 1) + lr, b_hf = li & 1;

    // Prologue: stages 0 .. STAGES - 2 in flight (a group per stage, empty past the last chunk, so
    // that "chunk c has landed" is always "at most STAGES - 2 groups pending").
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < chunks) load(s);
        cp_async_commit();
    }
    for (int c = 0; c < chunks; ++c) {
        cp_async_wait<TC_STAGES - 2>();  // this thread's copies of chunk c are done
        __syncthreads();  // everyone's are; and everyone is done reading chunk c - 1's stage
        if (c + TC_STAGES - 1 < chunks) load(c + TC_STAGES - 1);  // into chunk c - 1's stage
        cp_async_commit();
        const unsigned char* as = tc_smem + (c % TC_STAGES) * Stage::BYTES;
        const unsigned char* bs = as + Stage::A_BYTES;
#pragma unroll
        for (int t = 0; t < TAPS; ++t) {
            // Halo offset of the tap: (dy, dx) of the 3x3 conv, or (pi + r, pj + s) of phase tap (r, s).
            const int dy = UP ? pi + (t >> 1) : t / 3, dx = UP ? pj + (t & 1) : t % 3;
            unsigned a[2][4], bq[NB][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) ldmatrix_x4(a[mi], as + tc_swz((2 * wm + mi + dy) * TC_HW + a_px + dx, a_hf));
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) ldmatrix_x4(bq[nb], bs + tc_swz(t * BN + WN * wn + 16 * nb + b_n, b_hf));
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int nj = 0; nj < NJ; ++nj) {
                    const unsigned bb[2] = {bq[nj >> 1][2 * (nj & 1)], bq[nj >> 1][2 * (nj & 1) + 1]};
                    mma_m16n8k16_bf16_f32(acc[mi][nj], a[mi], bb, acc[mi][nj]);
                }
        }
    }
    cp_async_wait<0>();  // only empty groups are left; nothing may stay pending past the block

    // Accumulator e of tile (mi, nj): pixel row g + 8 (e >= 2) of the m16 tile (= tile column),
    // output channel 2 tq + (e & 1) of the n8 tile. Epilogue in f32: + bias, then SiLU (act == 1),
    // then + res; the upsample conv adds the pixel-shuffle shortcut of x instead. Rounded once.
    // Pair stores need y (and res) 4-byte aligned, which the launcher checked.
    const int g = lane >> 2, tq = lane & 3;
    const bool pairs = cout % 2 == 0;
    const int R = UP && shortcut ? 4 * cout / cin : 1;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int oy = oy0 + 2 * wm + mi;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int ox = ox0 + g + 8 * hf;
            if (oy >= h || ox >= wd) continue;
            const i64 o = UP ? ((i64)b * 2 * h + 2 * oy + pi) * (2 * wd) * cout + (i64)(2 * ox + pj) * cout
                             : (img + (i64)oy * wd + ox) * cout;
            const bf16* xs = x + (img + (i64)oy * wd + ox) * cin;
#pragma unroll
            for (int nj = 0; nj < NJ; ++nj) {
                const int n = n0 + WN * wn + 8 * nj + 2 * tq;
                if (n >= cout) continue;
                float v[2] = {acc[mi][nj][2 * hf], acc[mi][nj][2 * hf + 1]};
                const int m = min(2, cout - n);
                for (int j = 0; j < m; ++j) {
                    if (bias) v[j] += to_f32(bias[n + j]);
                    if constexpr (UP) {
                        if (shortcut) v[j] += to_f32(xs[(4 * (n + j) + 2 * pi + pj) / R]);
                    } else {
                        v[j] = conv_epilogue(v[j], act);
                        if (res) v[j] += to_f32(res[o + n + j]);
                    }
                }
                if (pairs) {  // m == 2: cout is even and n is even
                    *reinterpret_cast<__nv_bfloat162*>(y + o + n) = __floats2bfloat162_rn(v[0], v[1]);
                } else {
                    for (int j = 0; j < m; ++j) y[o + n + j] = from_f32<bf16>(v[j]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// depthwise conv

constexpr int DW_R = DW_ROWS;       // output rows per thread
constexpr int DW_CB = DW_CHANNELS;  // channels per block (32 threads x 4)
constexpr int DW_KMAX = CONV_KMAX;  // largest kernel the shared weight tile holds

// Loads 4 channels starting at p (n of them valid) as f32; `vec`: one aligned vector.
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4], bool vec, int n) {
    if (vec) {
        if constexpr (sizeof(T) == 4) {
            const float4 q = *reinterpret_cast<const float4*>(p);
            v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
        } else {
            union {
                uint2 u;
                bf16 e[4];
            } q;
            q.u = *reinterpret_cast<const uint2*>(p);
#pragma unroll
            for (int j = 0; j < 4; ++j) v[j] = to_f32(q.e[j]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = j < n ? to_f32(p[j]) : 0.f;
    }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&v)[4], bool vec, int n) {
    if (vec) {
        if constexpr (sizeof(T) == 4) {
            *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            union {
                uint2 u;
                bf16 e[4];
            } q;
#pragma unroll
            for (int j = 0; j < 4; ++j) q.e[j] = from_f32<bf16>(v[j]);
            *reinterpret_cast<uint2*>(p) = q.u;
        }
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (j < n) p[j] = from_f32<T>(v[j]);
    }
}

// The block owns DW_CB channels (blockIdx.y): their weights (and bias) sit in shared memory,
// loaded once; threadIdx.x picks 4 of them, threadIdx.y one of 8 concurrent pixel columns, and the
// block walks its (sample, row block, column) items with a stride. K > 0: the kernel size as a
// constant (the tap loops unroll); K == 0: any odd k <= DW_KMAX.
template <typename T, int K>
__device__ __forceinline__ void dwconv(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                       T* __restrict__ y, int batch, int h, int wd, int c, int k,
                                       float (*Ws)[DW_CB], float* Bs) {
    const int ks = K > 0 ? K : k, pad = ks / 2, kk = ks * ks;
    const int cb = blockIdx.y * DW_CB;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    for (int i = tid; i < kk * DW_CB; i += nthreads) {
        const int t = i / DW_CB, cl = i % DW_CB;
        Ws[t][cl] = cb + cl < c ? to_f32(w[(i64)(cb + cl) * kk + t]) : 0.f;
    }
    for (int cl = tid; cl < DW_CB; cl += nthreads) Bs[cl] = bias && cb + cl < c ? to_f32(bias[cb + cl]) : 0.f;
    __syncthreads();  // the only barrier: every thread reaches it before its item loop

    const int cl0 = 4 * threadIdx.x, c0 = cb + cl0, nc = min(4, c - c0);
    if (nc <= 0) return;
    const int align = 4 * (int)sizeof(T);
    const bool vec = c % 4 == 0 && (reinterpret_cast<unsigned long long>(x) % align) == 0 &&
                     (reinterpret_cast<unsigned long long>(y) % align) == 0;
    const int rb = (h + DW_R - 1) / DW_R;
    const i64 items = (i64)batch * rb * wd;
    for (i64 it = (i64)blockIdx.x * blockDim.y + threadIdx.y; it < items; it += (i64)gridDim.x * blockDim.y) {
        const int ox = (int)(it % wd);
        const i64 r = it / wd;
        const int y0 = (int)(r % rb) * DW_R;
        const int b = (int)(r / rb);
        float acc[DW_R][4];
#pragma unroll
        for (int q = 0; q < DW_R; ++q)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[q][j] = Bs[cl0 + j];

        // Input row y0 - pad + j feeds output row y0 + q with dy = j - q: each input vector is loaded
        // once per thread and used for up to DW_R outputs.
#pragma unroll
        for (int j = 0; j < DW_R + ks - 1; ++j) {
            const int iy = y0 - pad + j;
            if (iy < 0 || iy >= h) continue;
#pragma unroll
            for (int d = 0; d < ks; ++d) {
                const int ix = ox - pad + d;
                if (ix < 0 || ix >= wd) continue;
                float v[4];
                load4(x + (((i64)b * h + iy) * wd + ix) * c + c0, v, vec, nc);
#pragma unroll
                for (int q = 0; q < DW_R; ++q) {
                    const int dy = j - q;
                    if (dy < 0 || dy >= ks) continue;
                    const float* wt = &Ws[dy * ks + d][cl0];
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[q][e] += wt[e] * v[e];
                }
            }
        }
#pragma unroll
        for (int q = 0; q < DW_R; ++q) {
            const int oy = y0 + q;
            if (oy >= h) break;
            store4(y + (((i64)b * h + oy) * wd + ox) * c + c0, acc[q], vec, nc);
        }
    }
}

template <typename T>
__device__ __forceinline__ void depthwise_conv2d(const T* x, const T* w, const T* bias, T* y, int batch, int h, int wd,
                                                 int c, int k) {
    __shared__ float Ws[DW_KMAX * DW_KMAX][DW_CB];
    __shared__ float Bs[DW_CB];
    if (k == 3)
        dwconv<T, 3>(x, w, bias, y, batch, h, wd, c, k, Ws, Bs);
    else if (k == 5)
        dwconv<T, 5>(x, w, bias, y, batch, h, wd, c, k, Ws, Bs);
    else
        dwconv<T, 0>(x, w, bias, y, batch, h, wd, c, k, Ws, Bs);
}

// The depthwise 3x3 conv fused with GLUMBConv's SiLU gate: input [.., 2c] (u | g), output [.., c]
// = dw(u) * silu(dw(g)), so the 2c-channel conv output (SANA's widest activation) is never stored.
// With SILU_IN the input is silu(x) (GLUMBConv's conv_inverted activation, applied here as x loads).
//
// A block of DWG_THREADS owns one tile of DWG_ROWS x DWG_COLS output pixels of one image and
// DWG_CHANNELS output channels. It stages the tile's input with its 1-pixel halo, u and g halves,
// in shared memory (zero outside the image, the SiLU applied once per staged element), then each
// thread computes outputs from shared memory. The SiLU of the input is why this is staged:
// computed per tap read (as a register-only kernel would) it costs about 4.5 exponentials and
// divisions per input element and bounds the kernel by arithmetic (5% of the copy bandwidth on an
// H200, docs/gpu-results.md run 1).
//
// The kernel is bound by instruction issue, not memory (Nsight Compute on the H200, run 5: issue
// slots 77% busy, DRAM 14%, about 165 instructions per output of which 18 are the conv's FMAs), so
// what follows counts instructions:
// - staging reads 16-byte vectors (8 bf16 / 4 f32 channels), all of a thread's loads issued before
//   any is used, when the channel count and the pointer allow (`c` a multiple of the vector width,
//   x 16-byte aligned); else one element per load. The SiLU is `silu_fast` (5 instructions) and is
//   applied to padding too (silu(0) = 0), which costs less than the branch that skipped it;
// - an 8-row tile stages 1.4 input pixels per output pixel (a 4-row one 1.7);
// - the weights are read as the contiguous [channel][tap] runs they are in memory (coalesced), and
//   transposed into shared memory, where a compute thread reads its own channel's taps;
// - a thread computes 8 consecutive output columns of one row and one channel: the 3 x 10 staged
//   pixels of each half serve all 8 (7.5 shared loads per output instead of 18; 4 columns took
//   11% more instructions in this phase), lanes on consecutive channels (no bank conflicts), its
//   strips a fixed count (the loop unrolls).
template <typename T, bool SILU_IN>
__device__ __forceinline__ void dwconv3_glu(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                            T* __restrict__ y, int batch, int h, int wd, int c) {
    constexpr int TR = DWG_ROWS, TC = DWG_COLS, CB = DWG_CHANNELS, NT = DWG_THREADS;
    constexpr int SR = TR + 2, SC = TC + 2;  // staged rows and columns (halo included)
    constexpr int SX = 8;                    // output columns per thread
    constexpr int STRIPS = TR * TC / SX * CB / NT;  // strips of SX outputs per thread
    static_assert(TC % SX == 0 && (TR * TC / SX * CB) % NT == 0 && NT % CB == 0, "tile and block disagree");
    __shared__ __align__(16) float S[SR * SC][2][CB];  // [pixel][u | g][channel]
    // The block's 2 x 9 weights and 2 biases per channel, [u | g][tap 0..8, bias][channel]. Rows of
    // CB + 1: the transposing stores of consecutive taps fall in different banks.
    __shared__ float Wt[2][10][CB + 1];
    const int cin = 2 * c;
    // Channel blocks vary fastest along the grid: the blocks in flight together read neighbouring
    // 64-byte pieces of the same pixels' rows (one row is 2c channels, 11.5 KB in Sana-600M), and a
    // tile's halo is read again by the next tile soon after, from L2.
    const int cblocks = (c + CB - 1) / CB;
    const int c0 = (int)(blockIdx.x % cblocks) * CB;
    const int col_tiles = (wd + TC - 1) / TC, row_tiles = (h + TR - 1) / TR;
    const int tile = blockIdx.x / cblocks;
    const int x0 = (tile % col_tiles) * TC;
    const int y0 = ((tile / col_tiles) % row_tiles) * TR;
    const int b = tile / (col_tiles * row_tiles);
    const int tid = threadIdx.x;
    const int cl = tid % CB;  // this thread's channel in the compute phase (the same for all its strips)
    const bool ch_in = c0 + cl < c;
    // Pixel offsets within an image are 32-bit (the launcher refuses h * wd > 2^31 - 1): a 64-bit
    // multiply per load cost about 8 instructions of integer arithmetic.

    // Weights: for each half, the block's channels' 9 taps are one contiguous run of 9 * CB
    // elements (w is [2c][9]); read in order (coalesced), stored transposed. Loaded with the
    // staging: held in registers from the start they would be live through it (the registers per
    // thread, not shared memory, bound the blocks per SM).
    const int nch = min(CB, c - c0);
    for (int i = tid; i < 2 * 9 * CB; i += NT) {
        const int half = i / (9 * CB), r = i - half * (9 * CB), ch = r / 9, t = r - ch * 9;
        Wt[half][t][ch] = ch < nch ? to_f32(w[((i64)half * c + c0) * 9 + r]) : 0.f;
    }
    if (tid < 2 * CB) {
        const int half = tid / CB, ch = tid % CB;
        Wt[half][9][ch] = bias && ch < nch ? to_f32(bias[half * c + c0 + ch]) : 0.f;
    }

    constexpr int V = Vec16<T>::N;
    if (c % V == 0 && aligned16(x)) {
        // Stage by vectors: element i = (pixel, half, vector), vector fastest. With c % V == 0 a
        // vector lies wholly inside or outside the channel range, and every one is 16-byte aligned.
        // The loaded vectors stay raw (16 bytes: 4 registers for 8 bf16) until they are stored.
        constexpr int G = CB / V, N = SR * SC * 2 * G, PER = (N + NT - 1) / NT;
        static_assert(NT % (2 * G) == 0, "a thread's vector and half are the same for all its loads");
        const int g = tid % G, half = (tid / G) % 2, p0 = tid / (2 * G);
        constexpr int DP = NT / (2 * G);  // pixels between a thread's consecutive loads
        const bool g_in = c0 + g * V < c;
        const T* xb = x + (i64)b * h * wd * cin + half * c + c0 + g * V;
        // In rounds of at most 4 vectors (64 bytes in flight per thread, 64 KB per SM at 4 blocks):
        // all 6 at once (8-row tile, bf16) leave too few registers and spill.
        constexpr int RV = PER < 4 ? PER : 4, ROUNDS = (PER + RV - 1) / RV;
#pragma unroll
        for (int r = 0; r < ROUNDS; ++r) {
            Pack16<T> v[RV];
#pragma unroll
            for (int k = 0; k < RV; ++k) {
                const int p = p0 + (r * RV + k) * DP;
                const int iy = y0 - 1 + p / SC, ix = x0 - 1 + p % SC;
                v[k].raw = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits: 0 in bf16 and f32
                if (p < SR * SC && iy >= 0 && iy < h && ix >= 0 && ix < wd && g_in)
                    v[k].raw = *reinterpret_cast<const uint4*>(xb + (i64)(iy * wd + ix) * cin);
            }
#pragma unroll
            for (int k = 0; k < RV; ++k) {
                const int p = p0 + (r * RV + k) * DP;
                if (p >= SR * SC) break;
                float* dst = &S[p][half][g * V];
#pragma unroll
                for (int e = 0; e < V; e += 4) {
                    float4 q;
                    q.x = to_f32(v[k].e[e]);
                    q.y = to_f32(v[k].e[e + 1]);
                    q.z = to_f32(v[k].e[e + 2]);
                    q.w = to_f32(v[k].e[e + 3]);
                    if constexpr (SILU_IN) q.x = silu_fast(q.x), q.y = silu_fast(q.y), q.z = silu_fast(q.z), q.w = silu_fast(q.w);
                    *reinterpret_cast<float4*>(dst + e) = q;
                }
            }
        }
    } else {
        // Stage by elements: channel fastest, so a warp reads 32 consecutive channels.
        for (int i = tid; i < SR * SC * 2 * CB; i += NT) {
            const int ch = i % CB, half = (i / CB) % 2, p = i / (2 * CB);
            const int iy = y0 - 1 + p / SC, ix = x0 - 1 + p % SC;
            float v = 0.f;
            if (iy >= 0 && iy < h && ix >= 0 && ix < wd && c0 + ch < c) {
                v = to_f32(x[(((i64)b * h + iy) * wd + ix) * cin + half * c + c0 + ch]);
                if constexpr (SILU_IN) v = silu_fast(v);
            }
            S[p][half][ch] = v;
        }
    }
    __syncthreads();  // the only barrier (staging and weights written): no early return above

    if (!ch_in) return;
    float wu[9], wg[9];
#pragma unroll
    for (int t = 0; t < 9; ++t) wu[t] = Wt[0][t][cl], wg[t] = Wt[1][t][cl];
    const float bu = Wt[0][9][cl], bg = Wt[1][9][cl];
    // Strips of SX output columns of one row: item = strip * CB + channel.
    T* const yb = y + (((i64)b * h + y0) * wd + x0) * c + c0 + cl;
#pragma unroll
    for (int k = 0; k < STRIPS; ++k) {
        const int strip = (tid + k * NT) / CB, oy = strip / (TC / SX), ox0 = (strip % (TC / SX)) * SX;
        if (y0 + oy >= h || x0 + ox0 >= wd) continue;
        float au[SX], ag[SX];
#pragma unroll
        for (int j = 0; j < SX; ++j) au[j] = bu, ag[j] = bg;
#pragma unroll
        for (int dy = 0; dy < 3; ++dy) {
#pragma unroll
            for (int sx = 0; sx < SX + 2; ++sx) {
                const int p = (oy + dy) * SC + ox0 + sx;
                const float su = S[p][0][cl], sg = S[p][1][cl];
#pragma unroll
                for (int j = 0; j < SX; ++j) {
                    const int dx = sx - j;
                    if (dx < 0 || dx > 2) continue;
                    au[j] += wu[dy * 3 + dx] * su;
                    ag[j] += wg[dy * 3 + dx] * sg;
                }
            }
        }
        T* yp = yb + (i64)(oy * wd + ox0) * c;
#pragma unroll
        for (int j = 0; j < SX; ++j) {
            if (x0 + ox0 + j >= wd) break;
            yp[(i64)j * c] = from_f32<T>(au[j] * silu_fast(ag[j]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// grouped 1x1 conv

constexpr int GL_BM = GL_ROWS, GL_BN = GL_COLS, GL_BK = 32;

template <typename T>
__device__ __forceinline__ void grouped_linear(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                               i64 rows, int cin, int cout, int groups) {
    __shared__ float Xs[GL_BM][GL_BK + 1];
    __shared__ float Ws[GL_BK][GL_BN];
    const int ci = cin / groups, co = cout / groups;
    const int ntiles = (co + GL_BN - 1) / GL_BN;
    const int g = blockIdx.y / ntiles, n0 = (blockIdx.y % ntiles) * GL_BN;
    const i64 r0 = (i64)blockIdx.x * GL_BM;
    const int tid = threadIdx.x, tn = tid & 7, tm = tid >> 3;  // outputs 4 tn.., rows 4 tm..
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < ci; k0 += GL_BK) {
        __syncthreads();
        for (int i = tid; i < GL_BM * GL_BK; i += blockDim.x) {
            const int r = i / GL_BK, kk = i % GL_BK;
            float v = 0.f;
            if (r0 + r < rows && k0 + kk < ci) v = to_f32(x[(r0 + r) * cin + (i64)g * ci + k0 + kk]);
            Xs[r][kk] = v;
        }
        for (int i = tid; i < GL_BN * GL_BK; i += blockDim.x) {
            const int n = i / GL_BK, kk = i % GL_BK;
            float v = 0.f;
            if (n0 + n < co && k0 + kk < ci) v = to_f32(w[((i64)g * co + n0 + n) * ci + k0 + kk]);
            Ws[kk][n] = v;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < GL_BK; ++kk) {
            float a[4], bw[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = Xs[tm * 4 + i][kk];
#pragma unroll
            for (int j = 0; j < 4; ++j) bw[j] = Ws[kk][tn * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bw[j];
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const i64 r = r0 + tm * 4 + i;
        if (r >= rows) break;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tn * 4 + j;
            if (n < co) y[r * cout + (i64)g * co + n] = from_f32<T>(acc[i][j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// data movement: channel repeat

template <typename T>
__device__ __forceinline__ void repeat_channels(const T* __restrict__ x, T* __restrict__ y, i64 rows, int cin,
                                                int repeats) {
    constexpr int V = Vec16<T>::N;
    const int cout = cin * repeats;
    const bool vec = cout % V == 0 && aligned16(y);
    const int cv = vec ? cout / V : cout;
    const i64 items = rows * cv;
    for (i64 it = (i64)blockIdx.x * blockDim.x + threadIdx.x; it < items; it += (i64)gridDim.x * blockDim.x) {
        const int q = (int)(it % cv);
        const i64 r = it / cv;
        const T* src = x + r * cin;
        if (vec) {
            Pack16<T> pk;
#pragma unroll
            for (int e = 0; e < V; ++e) pk.e[e] = src[(q * V + e) / repeats];
            *reinterpret_cast<uint4*>(y + r * cout + q * V) = pk.raw;
        } else {
            y[r * cout + q] = src[q / repeats];
        }
    }
}

}  // namespace ou

using ou::bf16;
using ou::i64;

// The tensor-core convs: weights in the prepared layout (families::conv::prepare_conv_weight),
// dynamic shared memory of TC_STAGES stages (the launcher sizes it), 256 threads. Two instances per
// entry point rather than a run-time branch inside one: each path gets its own register allocation.
// BN = 64 keeps a block at <= 128 registers (two blocks per SM); BN = 128 (Cout a multiple of 128,
// every large decoder conv) halves the halo traffic per output and runs one block per SM.
extern "C" __global__ void __launch_bounds__(256, 2) conv2d_bf16_tc(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y, int h, int wd, int cin, int cout, int act) {
    if (cin % 8 == 0)
        ou::conv_tc<64, false, true>(x, w, bias, res, y, h, wd, cin, cout, act, 0);
    else
        ou::conv_tc<64, false, false>(x, w, bias, res, y, h, wd, cin, cout, act, 0);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv2d_bf16_tc_n128(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y, int h, int wd, int cin, int cout, int act) {
    if (cin % 8 == 0)
        ou::conv_tc<128, false, true>(x, w, bias, res, y, h, wd, cin, cout, act, 0);
    else
        ou::conv_tc<128, false, false>(x, w, bias, res, y, h, wd, cin, cout, act, 0);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv2d_f32(const float* x, const float* w, const float* bias, const float* res, float* y, int h, int wd, int cin, int cout, int k, int act) {
    ou::conv2d_direct<float, false>(x, w, bias, res, y, h, wd, cin, cout, k, act, 0);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv2d_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y, int h, int wd, int cin, int cout, int k, int act) {
    ou::conv2d_direct<bf16, false>(x, w, bias, res, y, h, wd, cin, cout, k, act, 0);
}

extern "C" __global__ void __launch_bounds__(256, 2) upsample_conv2d_bf16_tc(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int h, int wd, int cin, int cout, int shortcut) {
    if (cin % 8 == 0)
        ou::conv_tc<64, true, true>(x, w, bias, nullptr, y, h, wd, cin, cout, 0, shortcut);
    else
        ou::conv_tc<64, true, false>(x, w, bias, nullptr, y, h, wd, cin, cout, 0, shortcut);
}

extern "C" __global__ void __launch_bounds__(256, 1) upsample_conv2d_bf16_tc_n128(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int h, int wd, int cin, int cout, int shortcut) {
    if (cin % 8 == 0)
        ou::conv_tc<128, true, true>(x, w, bias, nullptr, y, h, wd, cin, cout, 0, shortcut);
    else
        ou::conv_tc<128, true, false>(x, w, bias, nullptr, y, h, wd, cin, cout, 0, shortcut);
}

extern "C" __global__ void __launch_bounds__(256, 2) upsample_conv2d_f32(const float* x, const float* w, const float* bias, float* y, int h, int wd, int cin, int cout, int shortcut) {
    ou::conv2d_direct<float, true>(x, w, bias, nullptr, y, h, wd, cin, cout, 3, 0, shortcut);
}

extern "C" __global__ void __launch_bounds__(256, 2) upsample_conv2d_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int h, int wd, int cin, int cout, int shortcut) {
    ou::conv2d_direct<bf16, true>(x, w, bias, nullptr, y, h, wd, cin, cout, 3, 0, shortcut);
}

extern "C" __global__ void __launch_bounds__(256) depthwise_conv2d_f32(const float* x, const float* w, const float* bias, float* y, int batch, int h, int wd, int c, int k) {
    ou::depthwise_conv2d<float>(x, w, bias, y, batch, h, wd, c, k);
}

// The depthwise GLU: at most 64 registers (4 blocks of 256 per SM; 48 registers, 5 blocks, spill),
// the f32 one without SiLU 85 (3 blocks; 64 spill): blocks per SM are its memory-level parallelism.
extern "C" __global__ void __launch_bounds__(256, 3) depthwise_conv3_glu_f32(const float* x, const float* w, const float* bias, float* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<float, false>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void __launch_bounds__(256, 4) depthwise_conv3_glu_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<bf16, false>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void __launch_bounds__(256, 4) silu_depthwise_conv3_glu_f32(const float* x, const float* w, const float* bias, float* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<float, true>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void __launch_bounds__(256, 4) silu_depthwise_conv3_glu_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<bf16, true>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void __launch_bounds__(256) depthwise_conv2d_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int batch, int h, int wd, int c, int k) {
    ou::depthwise_conv2d<bf16>(x, w, bias, y, batch, h, wd, c, k);
}

extern "C" __global__ void __launch_bounds__(256) grouped_linear_f32(const float* x, const float* w, float* y, i64 rows, int cin, int cout, int groups) {
    ou::grouped_linear<float>(x, w, y, rows, cin, cout, groups);
}

extern "C" __global__ void __launch_bounds__(256) grouped_linear_bf16(const bf16* x, const bf16* w, bf16* y, i64 rows, int cin, int cout, int groups) {
    ou::grouped_linear<bf16>(x, w, y, rows, cin, cout, groups);
}

extern "C" __global__ void __launch_bounds__(256) repeat_channels_f32(const float* x, float* y, i64 rows, int cin, int repeats) {
    ou::repeat_channels<float>(x, y, rows, cin, repeats);
}

extern "C" __global__ void __launch_bounds__(256) repeat_channels_bf16(const bf16* x, bf16* y, i64 rows, int cin, int repeats) {
    ou::repeat_channels<bf16>(x, y, rows, cin, repeats);
}

// The geometry the compiled kernels use, in conv_geometry.cuh's order, for tests/cuda_conv.rs to
// compare with the launcher's: tile h, w, n of conv2d_* and of conv2d_bf16_tc, the two kernel-size
// limits, depthwise rows and channels, grouped_linear rows and outputs.
extern "C" __global__ void conv_geometry(int* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const int g[14] = {ou::CV_TH, ou::CV_TW, ou::CV_BN, ou::TC_TH, ou::TC_TW, ou::TC_STAGES,
                           ou::CV_KMAX, ou::DW_KMAX, ou::DW_R, ou::DW_CB, ou::GL_BM, ou::GL_BN,
                           ou::TC_NPAD, ou::TC_BK};
        for (int i = 0; i < 14; ++i) out[i] = g[i];
    }
}
