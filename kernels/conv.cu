// conv.cu: the DC-AE decoder's convolution family, on tokens [B, h*w, C] (NHWC: the h x w grid
// row-major, channels contiguous). Storage f32 or bf16, all arithmetic f32.
// CPU twins: openuni_cpu::ops::{conv2d, upsample_conv2d, depthwise_conv2d, depthwise_conv_glu,
// grouped_linear, repeat_channels}. Launchers: crates/cuda/src/families/conv.rs.
//
//   conv2d_bf16_tc(x, w, bias, res, y, h, wd, cin, cout, act)      grid (tiles of 8 x 16 pixels x batch, Cout / 64)
//       3x3 convolution, stride 1, zero padding 1, on the tensor cores (mma.sync m16n8k16 bf16 -> f32
//       through kernels/include/mma.cuh). Implicit GEMM: M = output pixels, N = Cout, K = Cin * 9.
//       A block computes an 8 x 16 tile of output pixels (M = 128) for 64 output channels, in chunks
//       of 16 input channels. Per chunk it stages in shared memory
//         - the input halo, 10 x 18 pixels x 16 channels (each input pixel is read once per chunk,
//           not 9 times as an explicit im2col would), rows padded to 24 bf16 (48 bytes) so that the
//           8 row addresses of an ldmatrix hit distinct banks;
//         - the weights of the 9 taps, [tap][64 Cout][16 Cin] (padded to 24), read from the upstream
//           layout [Cout, Cin, 3, 3] directly: for one output channel, the 16 x 9 weights of a chunk
//           are one contiguous run of 144 elements, loaded as 16-byte vectors and scattered by tap.
//           (No weight-prep step is needed; a [tap][Cout][Cin] layout prepared at load time would only
//           turn the scatter into plain vector stores.)
//       Each of the 8 warps owns 32 pixels (2 tile rows) x 32 channels: per tap and chunk, 2 ldmatrix.x4
//       for A (the tap's shift is just another row address), 2 ldmatrix.x4 for B, 8 mma. One shared
//       buffer, two barriers per chunk, no software prefetch: that keeps the kernel at 128 registers,
//       so two blocks (16 warps, 2 x 36 KiB) share an SM and one block's loads overlap the other's
//       mma. (A register-staged prefetch of the next chunk measured 174 registers in ptxas: one block
//       per SM.) The loader threads take one 16-byte vector position of 14 channels' runs each, so
//       the 8 shared addresses a vector scatters to are loop-invariant. Epilogue in f32: + bias,
//       then SiLU when act == 1, then + res (same shape as y) when res is non-null, rounded once.
//       Any Cin, Cout, h, w: 16-byte vector loads when Cin % 8 == 0 and the pointers are 16-byte
//       aligned, element loads (zero-filled past Cin) otherwise; pixels and channels past the edges are
//       masked. 36 KiB of static shared memory, 256 threads.
//   conv2d_{f32,bf16}(x, w, bias, res, y, h, wd, cin, cout, k, act) grid as conv2d_bf16_tc
//       k x k convolution (odd k <= 7), stride 1, zero padding k/2, on the CUDA cores with f32 FMAs:
//       the f32-storage path (the 1e-5 tolerance rules out TF32 and bf16 tensor cores) and the bf16
//       path for kernel sizes other than 3. Same tiling as above (8 x 16 pixels x 64 channels, the
//       input halo in shared memory), chunks of 8 input channels, weights of up to 9 taps at a time;
//       each thread accumulates one tile column (8 pixels) x 4 channels. Same epilogue.
//   upsample_conv2d_bf16_tc(x, w, bias, y, h, wd, cin, cout, shortcut)
//       DC-AE's DCUpBlock2d in one kernel: conv3x3(upsample2x(x)) + bias (+ the pixel-shuffle
//       shortcut of x when shortcut != 0), x on the h x wd grid, y on 2h x 2wd. The 3x3 conv of a
//       nearest-upsampled input is, for each output parity (pi, pj), a 2x2 conv of the
//       low-resolution input with weights summed over tap groups (derivation above upconv_tc):
//       16 instead of 36 taps per 4 outputs (2.25x fewer MACs), and the upsampled tensor (4x the
//       input) is never written or read. blockIdx.z is the phase; otherwise conv2d_bf16_tc's tiling
//       on the low-resolution grid (8 x 16 pixels x 64 channels, chunks of 16 channels, the same
//       10 x 18 halo). Per chunk the raw weights are staged as loaded ([64][144], 16-byte stores),
//       then combined in f32 into the phase's 4 taps and rounded once to bf16 (the only numerical
//       difference from the plain conv: one extra rounding of the summed weights), then 4 taps x
//       8 mma per warp. The shortcut is gathered from x in the epilogue. 38.4 KiB shared memory.
//       Next step: combine the weights once at load time (a weight-prep pass) instead of per block.
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
// Version 1 (this one): correctness on any shape first, the tiling chosen for the decoder's shapes
// (Cout 128..1024, grids 16^2..1024^2). Known next steps, to be measured on a GPU: cp.async double
// buffering, a 128-channel N tile with dynamic shared memory, a [tap][Cout][Cin] weight layout
// (and pre-combined phase weights for the upsample conv) prepared at load time, shared-memory
// staging of the output tile for 16-byte stores.

#include "common.cuh"
#include "conv_geometry.cuh"
#include "mma.cuh"

namespace ou {

__device__ __forceinline__ float conv_epilogue(float v, int act) {
    return act == 1 ? v / (1.f + expf(-v)) : v;
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
// conv2d 3x3 on the tensor cores (bf16)

constexpr int TC_TH = CONV_TILE_H, TC_TW = CONV_TILE_W;  // output tile: 8 rows x 16 columns = 128 pixels
constexpr int TC_BN = CONV_TILE_N;                       // output channels per block
constexpr int TC_BK = 16;                              // input channels per chunk (one mma k step)
constexpr int TC_HH = TC_TH + 2, TC_HW = TC_TW + 2;    // halo 10 x 18
constexpr int TC_HP = TC_HH * TC_HW;                   // 180 halo pixels
constexpr int TC_LD = 24;                              // padded row length (bf16) of both tiles
constexpr int TC_THREADS = 256;
constexpr int TC_AV = TC_HP * TC_BK / 8;               // 16-byte vectors of the halo per chunk (360)
constexpr int TC_RV = TC_BK * 9 / 8;                  // 16-byte vectors per output channel's run (18)
constexpr int TC_BROWS = TC_THREADS / TC_RV;           // output channels per pass of the block (14)
constexpr int TC_AR = (TC_AV + TC_THREADS - 1) / TC_THREADS;  // per thread: 2
constexpr int TC_BR = (TC_BN + TC_BROWS - 1) / TC_BROWS;      // per thread: 5

union Bf16x8 {
    uint4 u;
    bf16 e[8];
};

// The global loads of one chunk (input channels c0 .. c0 + 15) into registers.
// VEC: 16-byte vector loads (cin % 8 == 0, x and w 16-byte aligned), else element loads.
template <bool VEC>
__device__ __forceinline__ void tc_load(const bf16* __restrict__ x, const bf16* __restrict__ w, uint4 (&ra)[TC_AR],
                                        uint4 (&rb)[TC_BR], i64 img, int oy0, int ox0, int n0, int c0, int h, int wd,
                                        int cin, int cout) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < TC_AR; ++i) {
        const int s = tid + i * TC_THREADS;
        Bf16x8 v;
        v.u = make_uint4(0u, 0u, 0u, 0u);
        if (s < TC_AV) {
            const int p = s >> 1, ch = c0 + 8 * (s & 1);
            const int iy = oy0 - 1 + p / TC_HW, ix = ox0 - 1 + p % TC_HW;
            if (iy >= 0 && iy < h && ix >= 0 && ix < wd && ch < cin) {
                const bf16* src = x + (img + (i64)iy * wd + ix) * cin + ch;
                if constexpr (VEC) {
                    v.u = *reinterpret_cast<const uint4*>(src);  // cin % 8 == 0: the whole vector is inside
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        if (ch + e < cin) v.e[e] = src[e];
                }
            }
        }
        ra[i] = v.u;
    }
    // Weights: for output channel n0 + n the chunk's (ci, tap) elements are the contiguous run
    // [((n0 + n) cin + c0) 9, + 144); element e of it is (ci = e / 9, tap = e % 9). Thread tid
    // loads vector tid % 18 of channels tid / 18 + 14 i (the last 4 threads idle), so the 8 shared
    // addresses its vector scatters to are the same for every i up to a constant offset.
    const int valid = min(TC_BK, cin - c0) * 9;  // elements of the run that belong to this channel's row
    const int bv = tid % TC_RV, bn = tid / TC_RV, e0 = 8 * bv;
#pragma unroll
    for (int i = 0; i < TC_BR; ++i) {
        const int n = bn + TC_BROWS * i;
        Bf16x8 v;
        v.u = make_uint4(0u, 0u, 0u, 0u);
        if (bn < TC_BROWS && n < TC_BN && n0 + n < cout && e0 < valid) {
            const bf16* src = w + ((i64)(n0 + n) * cin + c0) * 9 + e0;
            if constexpr (VEC) {
                v.u = *reinterpret_cast<const uint4*>(src);  // cin % 8 == 0: valid is a multiple of 8
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    if (e0 + e < valid) v.e[e] = src[e];
            }
        }
        rb[i] = v.u;
    }
}

__device__ __forceinline__ void tc_store(bf16 (*As)[TC_LD], bf16 (*Bs)[TC_BN][TC_LD], const uint4 (&ra)[TC_AR],
                                         const uint4 (&rb)[TC_BR]) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < TC_AR; ++i) {
        const int s = tid + i * TC_THREADS;
        if (s < TC_AV) *reinterpret_cast<uint4*>(&As[s >> 1][8 * (s & 1)]) = ra[i];
    }
    const int bv = tid % TC_RV, bn = tid / TC_RV;
#pragma unroll
    for (int i = 0; i < TC_BR; ++i) {
        const int n = bn + TC_BROWS * i;
        if (bn < TC_BROWS && n < TC_BN) {
            Bf16x8 v;
            v.u = rb[i];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int el = 8 * bv + e;
                Bs[el % 9][n][el / 9] = v.e[e];
            }
        }
    }
}

// As [TC_HP][TC_LD] and Bs [9][TC_BN][TC_LD]: the shared tiles, declared once by the entry point
// (both instances of this template use the same 36 KiB).
template <bool VEC>
__device__ __forceinline__ void conv2d_tc(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          const bf16* __restrict__ bias, const bf16* __restrict__ res,
                                          bf16* __restrict__ y, int h, int wd, int cin, int cout, int act,
                                          bf16 (*As)[TC_LD], bf16 (*Bs)[TC_BN][TC_LD]) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp & 3;   // tile rows 2 wm, 2 wm + 1
    const int wn = warp >> 2;  // output channels 32 wn .. 32 wn + 31 of the block
    int ox0, oy0, b;
    tile_origin(TC_TH, TC_TW, h, wd, ox0, oy0, b);
    const int n0 = blockIdx.y * TC_BN;
    const i64 img = (i64)b * h * wd;

    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;

    // ldmatrix row addresses of this lane: matrix li = lane / 8, row lr = lane % 8.
    // A (16 pixels x 16 channels): matrices (px 0-7, k 0-7), (px 8-15, k 0-7), (px 0-7, k 8-15),
    // (px 8-15, k 8-15) give a[0..3] of the m16n8k16 A fragment.
    // B (16 channels k x 16 outputs n, stored n-major): matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
    // (n 8-15, k 0-7), (n 8-15, k 8-15) give b[0..1] of two n8 tiles.
    const int li = lane >> 3, lr = lane & 7;
    const int a_px = lr + 8 * (li & 1), a_k = 8 * (li >> 1);
    const int b_n = 8 * (li >> 1) + lr, b_k = 8 * (li & 1);

    for (int c0 = 0; c0 < cin; c0 += TC_BK) {
        {
            uint4 ra[TC_AR], rb[TC_BR];
            tc_load<VEC>(x, w, ra, rb, img, oy0, ox0, n0, c0, h, wd, cin, cout);
            tc_store(As, Bs, ra, rb);
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < 9; ++t) {
            const int dy = t / 3, dx = t % 3;
            unsigned a[2][4], bq[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                ldmatrix_x4(a[mi], &As[(2 * wm + mi + dy) * TC_HW + a_px + dx][a_k]);
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) ldmatrix_x4(bq[nb], &Bs[t][32 * wn + 16 * nb + b_n][b_k]);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) {
                    const unsigned bb[2] = {bq[nj >> 1][2 * (nj & 1)], bq[nj >> 1][2 * (nj & 1) + 1]};
                    mma_m16n8k16_bf16_f32(acc[mi][nj], a[mi], bb, acc[mi][nj]);
                }
        }
        __syncthreads();  // every warp is done with As and Bs before the next store
    }

    // Accumulator e of tile (mi, nj): pixel row g + 8 (e >= 2) of the m16 tile (= tile column),
    // output channel 2 tq + (e & 1) of the n8 tile.
    const int g = lane >> 2, tq = lane & 3;
    const bool pairs = cout % 2 == 0 && (reinterpret_cast<unsigned long long>(y) & 3ull) == 0 &&
                       (!res || (reinterpret_cast<unsigned long long>(res) & 3ull) == 0);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int oy = oy0 + 2 * wm + mi;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int ox = ox0 + g + 8 * hf;
            if (oy >= h || ox >= wd) continue;
            const i64 o = (img + (i64)oy * wd + ox) * cout;
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                const int n = n0 + 32 * wn + 8 * nj + 2 * tq;
                if (n >= cout) continue;
                float v[2] = {acc[mi][nj][2 * hf], acc[mi][nj][2 * hf + 1]};
                const int m = min(2, cout - n);
                for (int j = 0; j < m; ++j) {
                    if (bias) v[j] += to_f32(bias[n + j]);
                    v[j] = conv_epilogue(v[j], act);
                    if (res) v[j] += to_f32(res[o + n + j]);
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
// the upsample conv as four 2x2 phase convolutions on the tensor cores (bf16)
//
// Output pixel (2y + pi, 2x + pj) of conv3x3(upsample2x(x)) reads upsampled rows 2y + pi - 1 + dy,
// i.e. low-resolution rows y - 1 + pi + r with r = (pi + dy + 1) / 2 - pi in {0, 1}: for pi = 0 the
// taps dy = {0} land on r = 0 and {1, 2} on r = 1; for pi = 1, {0, 1} on r = 0 and {2} on r = 1
// (columns alike). So each parity phase (pi, pj) is a 2x2 convolution of x with weights summed over
// those groups: 4 taps instead of 9 per output pixel.

// Combines the 9 taps of (output channel n, input channel ci) held in `src` ([ci][tap] order,
// tap = 3 dy + dx) into the 4 taps (r, s) of phase (pi, pj), in f32, rounded once to bf16.
__device__ __forceinline__ void phase_taps(const bf16* src, int pi, int pj, bf16 (&out)[4]) {
    float rows[2][3];  // rows[r][dx]: the taps of row group r
#pragma unroll
    for (int dx = 0; dx < 3; ++dx) {
        const float c0 = to_f32(src[dx]), c1 = to_f32(src[3 + dx]), c2 = to_f32(src[6 + dx]);
        rows[0][dx] = pi == 0 ? c0 : c0 + c1;
        rows[1][dx] = pi == 0 ? c1 + c2 : c2;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        out[2 * r] = from_f32<bf16>(pj == 0 ? rows[r][0] : rows[r][0] + rows[r][1]);
        out[2 * r + 1] = from_f32<bf16>(pj == 0 ? rows[r][1] + rows[r][2] : rows[r][2]);
    }
}

// As: the halo [TC_HP][TC_LD] (the same 10 x 18 low-resolution window as conv2d_tc: both row
// parities need rows y - 1 .. y + 8); Braw: the chunk's weights as loaded, [TC_BN][16 * 9];
// Bs: the phase's combined weights [4][TC_BN][TC_LD]. blockIdx.z = 2 pi + pj.
template <bool VEC>
__device__ __forceinline__ void upconv_tc(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          const bf16* __restrict__ bias, bf16* __restrict__ y, int h, int wd,
                                          int cin, int cout, int shortcut, bf16 (*As)[TC_LD],
                                          bf16 (*Braw)[TC_BK * 9], bf16 (*Bs)[TC_BN][TC_LD]) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp & 3, wn = warp >> 2;
    const int pi = blockIdx.z >> 1, pj = blockIdx.z & 1;
    int ox0, oy0, b;
    tile_origin(TC_TH, TC_TW, h, wd, ox0, oy0, b);  // low-resolution tile
    const int n0 = blockIdx.y * TC_BN;
    const i64 img = (i64)b * h * wd;

    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;

    const int li = lane >> 3, lr = lane & 7;
    const int a_px = lr + 8 * (li & 1), a_k = 8 * (li >> 1);
    const int b_n = 8 * (li >> 1) + lr, b_k = 8 * (li & 1);

    for (int c0 = 0; c0 < cin; c0 += TC_BK) {
        {
            uint4 ra[TC_AR], rb[TC_BR];
            tc_load<VEC>(x, w, ra, rb, img, oy0, ox0, n0, c0, h, wd, cin, cout);
#pragma unroll
            for (int i = 0; i < TC_AR; ++i) {
                const int s = tid + i * TC_THREADS;
                if (s < TC_AV) *reinterpret_cast<uint4*>(&As[s >> 1][8 * (s & 1)]) = ra[i];
            }
            const int bv = tid % TC_RV, bn = tid / TC_RV;
#pragma unroll
            for (int i = 0; i < TC_BR; ++i) {
                const int n = bn + TC_BROWS * i;
                if (bn < TC_BROWS && n < TC_BN) *reinterpret_cast<uint4*>(&Braw[n][8 * bv]) = rb[i];
            }
        }
        __syncthreads();
        for (int q = tid; q < TC_BN * TC_BK; q += TC_THREADS) {
            const int n = q / TC_BK, ci = q % TC_BK;
            bf16 t4[4];
            phase_taps(&Braw[n][ci * 9], pi, pj, t4);
#pragma unroll
            for (int t = 0; t < 4; ++t) Bs[t][n][ci] = t4[t];
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int dy = pi + (t >> 1), dx = pj + (t & 1);  // halo offset of tap (r, s)
            unsigned a[2][4], bq[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                ldmatrix_x4(a[mi], &As[(2 * wm + mi + dy) * TC_HW + a_px + dx][a_k]);
#pragma unroll
            for (int nb = 0; nb < 2; ++nb) ldmatrix_x4(bq[nb], &Bs[t][32 * wn + 16 * nb + b_n][b_k]);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) {
                    const unsigned bb[2] = {bq[nj >> 1][2 * (nj & 1)], bq[nj >> 1][2 * (nj & 1) + 1]};
                    mma_m16n8k16_bf16_f32(acc[mi][nj], a[mi], bb, acc[mi][nj]);
                }
        }
        __syncthreads();  // every warp is done with As and Bs before the next store
    }

    const int g = lane >> 2, tq = lane & 3;
    const int W2 = 2 * wd, R = shortcut ? 4 * cout / cin : 1;
    const bool pairs = cout % 2 == 0 && (reinterpret_cast<unsigned long long>(y) & 3ull) == 0;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int ly = oy0 + 2 * wm + mi;  // low-resolution row
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int lx = ox0 + g + 8 * hf;
            if (ly >= h || lx >= wd) continue;
            const i64 o = ((i64)b * 2 * h + 2 * ly + pi) * W2 * cout + (i64)(2 * lx + pj) * cout;
            const bf16* xs = x + (img + (i64)ly * wd + lx) * cin;
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                const int n = n0 + 32 * wn + 8 * nj + 2 * tq;
                if (n >= cout) continue;
                float v[2] = {acc[mi][nj][2 * hf], acc[mi][nj][2 * hf + 1]};
                const int m = min(2, cout - n);
                for (int j = 0; j < m; ++j) {
                    if (bias) v[j] += to_f32(bias[n + j]);
                    if (shortcut) v[j] += to_f32(xs[(4 * (n + j) + 2 * pi + pj) / R]);
                }
                if (pairs) {
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
// Same work split as dwconv: the block owns DW_CB output channels, whose u and g weights sit in
// shared memory.
template <typename T, bool SILU_IN>
__device__ __forceinline__ void dwconv3_glu(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                            T* __restrict__ y, int batch, int h, int wd, int c) {
    constexpr int ks = 3, pad = 1, kk = 9;
    __shared__ float Wu[kk][DW_CB], Wg[kk][DW_CB];
    __shared__ float Bu[DW_CB], Bg[DW_CB];
    const int cin = 2 * c;
    const int cb = blockIdx.y * DW_CB;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
    for (int i = tid; i < kk * DW_CB; i += nthreads) {
        const int t = i / DW_CB, cl = i % DW_CB;
        const bool in = cb + cl < c;
        Wu[t][cl] = in ? to_f32(w[(i64)(cb + cl) * kk + t]) : 0.f;
        Wg[t][cl] = in ? to_f32(w[(i64)(cb + cl + c) * kk + t]) : 0.f;
    }
    for (int cl = tid; cl < DW_CB; cl += nthreads) {
        const bool in = bias && cb + cl < c;
        Bu[cl] = in ? to_f32(bias[cb + cl]) : 0.f;
        Bg[cl] = in ? to_f32(bias[cb + cl + c]) : 0.f;
    }
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
        float au[DW_R][4], ag[DW_R][4];
#pragma unroll
        for (int q = 0; q < DW_R; ++q)
#pragma unroll
            for (int j = 0; j < 4; ++j) au[q][j] = Bu[cl0 + j], ag[q][j] = Bg[cl0 + j];
#pragma unroll
        for (int j = 0; j < DW_R + ks - 1; ++j) {
            const int iy = y0 - pad + j;
            if (iy < 0 || iy >= h) continue;
#pragma unroll
            for (int d = 0; d < ks; ++d) {
                const int ix = ox - pad + d;
                if (ix < 0 || ix >= wd) continue;
                const T* px = x + (((i64)b * h + iy) * wd + ix) * cin + c0;
                float u[4], g[4];
                load4(px, u, vec, nc);
                load4(px + c, g, vec, nc);
                if constexpr (SILU_IN) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) u[e] = u[e] / (1.f + expf(-u[e])), g[e] = g[e] / (1.f + expf(-g[e]));
                }
#pragma unroll
                for (int q = 0; q < DW_R; ++q) {
                    const int dy = j - q;
                    if (dy < 0 || dy >= ks) continue;
                    const float* wu = &Wu[dy * ks + d][cl0];
                    const float* wg = &Wg[dy * ks + d][cl0];
#pragma unroll
                    for (int e = 0; e < 4; ++e) au[q][e] += wu[e] * u[e], ag[q][e] += wg[e] * g[e];
                }
            }
        }
#pragma unroll
        for (int q = 0; q < DW_R; ++q) {
            const int oy = y0 + q;
            if (oy >= h) break;
            float o[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) o[e] = au[q][e] * (ag[q][e] / (1.f + expf(-ag[q][e])));
            store4(y + (((i64)b * h + oy) * wd + ox) * c + c0, o, vec, nc);
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

extern "C" __global__ void conv2d_bf16_tc(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y, int h, int wd, int cin, int cout, int act) {
    // Two instances rather than a run-time branch inside one: each path gets its own register
    // allocation (the vector path needs far fewer).
    __shared__ __align__(16) bf16 As[ou::TC_HP][ou::TC_LD];
    __shared__ __align__(16) bf16 Bs[9][ou::TC_BN][ou::TC_LD];
    if (cin % 8 == 0 && ou::aligned16(x) && ou::aligned16(w))
        ou::conv2d_tc<true>(x, w, bias, res, y, h, wd, cin, cout, act, As, Bs);
    else
        ou::conv2d_tc<false>(x, w, bias, res, y, h, wd, cin, cout, act, As, Bs);
}

extern "C" __global__ void conv2d_f32(const float* x, const float* w, const float* bias, const float* res, float* y, int h, int wd, int cin, int cout, int k, int act) {
    ou::conv2d_direct<float, false>(x, w, bias, res, y, h, wd, cin, cout, k, act, 0);
}

extern "C" __global__ void conv2d_bf16(const bf16* x, const bf16* w, const bf16* bias, const bf16* res, bf16* y, int h, int wd, int cin, int cout, int k, int act) {
    ou::conv2d_direct<bf16, false>(x, w, bias, res, y, h, wd, cin, cout, k, act, 0);
}

extern "C" __global__ void upsample_conv2d_bf16_tc(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int h, int wd, int cin, int cout, int shortcut) {
    __shared__ __align__(16) bf16 As[ou::TC_HP][ou::TC_LD];
    __shared__ __align__(16) bf16 Braw[ou::TC_BN][ou::TC_BK * 9];
    __shared__ __align__(16) bf16 Bs[4][ou::TC_BN][ou::TC_LD];
    if (cin % 8 == 0 && ou::aligned16(x) && ou::aligned16(w))
        ou::upconv_tc<true>(x, w, bias, y, h, wd, cin, cout, shortcut, As, Braw, Bs);
    else
        ou::upconv_tc<false>(x, w, bias, y, h, wd, cin, cout, shortcut, As, Braw, Bs);
}

extern "C" __global__ void upsample_conv2d_f32(const float* x, const float* w, const float* bias, float* y, int h, int wd, int cin, int cout, int shortcut) {
    ou::conv2d_direct<float, true>(x, w, bias, nullptr, y, h, wd, cin, cout, 3, 0, shortcut);
}

extern "C" __global__ void upsample_conv2d_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int h, int wd, int cin, int cout, int shortcut) {
    ou::conv2d_direct<bf16, true>(x, w, bias, nullptr, y, h, wd, cin, cout, 3, 0, shortcut);
}

extern "C" __global__ void depthwise_conv2d_f32(const float* x, const float* w, const float* bias, float* y, int batch, int h, int wd, int c, int k) {
    ou::depthwise_conv2d<float>(x, w, bias, y, batch, h, wd, c, k);
}

extern "C" __global__ void depthwise_conv3_glu_f32(const float* x, const float* w, const float* bias, float* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<float, false>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void depthwise_conv3_glu_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<bf16, false>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void silu_depthwise_conv3_glu_f32(const float* x, const float* w, const float* bias, float* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<float, true>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void silu_depthwise_conv3_glu_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int batch, int h, int wd, int c) {
    ou::dwconv3_glu<bf16, true>(x, w, bias, y, batch, h, wd, c);
}

extern "C" __global__ void depthwise_conv2d_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int batch, int h, int wd, int c, int k) {
    ou::depthwise_conv2d<bf16>(x, w, bias, y, batch, h, wd, c, k);
}

extern "C" __global__ void grouped_linear_f32(const float* x, const float* w, float* y, i64 rows, int cin, int cout, int groups) {
    ou::grouped_linear<float>(x, w, y, rows, cin, cout, groups);
}

extern "C" __global__ void grouped_linear_bf16(const bf16* x, const bf16* w, bf16* y, i64 rows, int cin, int cout, int groups) {
    ou::grouped_linear<bf16>(x, w, y, rows, cin, cout, groups);
}

extern "C" __global__ void repeat_channels_f32(const float* x, float* y, i64 rows, int cin, int repeats) {
    ou::repeat_channels<float>(x, y, rows, cin, repeats);
}

extern "C" __global__ void repeat_channels_bf16(const bf16* x, bf16* y, i64 rows, int cin, int repeats) {
    ou::repeat_channels<bf16>(x, y, rows, cin, repeats);
}

// The geometry the compiled kernels use, in conv_geometry.cuh's order, for tests/cuda_conv.rs to
// compare with the launcher's: tile h, w, n of conv2d_* and of conv2d_bf16_tc, the two kernel-size
// limits, depthwise rows and channels, grouped_linear rows and outputs.
extern "C" __global__ void conv_geometry(int* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const int g[12] = {ou::CV_TH, ou::CV_TW, ou::CV_BN, ou::TC_TH, ou::TC_TW, ou::TC_BN,
                           ou::CV_KMAX, ou::DW_KMAX, ou::DW_R, ou::DW_CB, ou::GL_BM, ou::GL_BN};
        for (int i = 0; i < 12; ++i) out[i] = g[i];
    }
}
