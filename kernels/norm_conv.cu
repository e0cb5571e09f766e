// norm_conv.cu: DC-AE's output head, conv_out(relu(norm_out(x))), as one kernel, so that neither
// the normalised nor the rectified tensor (128 channels at the image's full resolution) is ever
// stored. CPU twin: openuni_cpu::ops::rmsnorm_relu_conv2d (the three ops in turn).
//
//   rmsnorm_relu_conv2d_{f32,bf16}(x, nw, nb, w, b, y, h, wd, cin, cout, k, eps)
//       x tokens [B, h·wd, cin] (NHWC); RMSNorm over the channels of each pixel with weight `nw` and
//       optional bias `nb` (eps), ReLU, then a k×k convolution (zero padding k/2, stride 1) with
//       weight `w` [cout, cin, k, k] and optional bias `b` -> y [B, h·wd, cout]. A small-N kernel:
//       cout <= NC_MAX_COUT (conv_out has 3), k odd <= NC_MAX_K; the launcher checks both.
//
// Launch (openuni_cuda::families::norm_conv): grid (ceil(wd / NC_TW), ceil(h / NC_TH), B), block
// NC_TW·NC_TH threads, one output pixel per thread. Each CTA works on its NC_TH×NC_TW output tile
// plus a (k/2)-pixel halo:
//   1. one warp per halo pixel, lanes over the channels: the pixel's 1/rms (f32), kept in shared
//      memory; a pixel outside the image is marked (-1) and reads as zero (the conv's padding is
//      applied to relu(norm(x)), not to x);
//   2. channels in chunks of NC_CC: the chunk of the halo tile is normalised, rectified and stored
//      channel-major in shared memory (f32), the chunk of the weights next to it (zero beyond
//      cout and cin), then every thread accumulates its pixel's NC_MAX_COUT outputs over the
//      chunk's channels and the k² taps in f32.
// x is read twice (statistics, then values), the second time mostly from L2; y is written once.
// Accumulation is in f32 in (channel chunk, channel, tap) order: not the CPU twin's order.

#include "common.cuh"

namespace ou {

constexpr int NC_TW = 32;
constexpr int NC_TH = 4;
constexpr int NC_THREADS = NC_TW * NC_TH;
constexpr int NC_MAX_K = 3;
constexpr int NC_MAX_COUT = 4;
constexpr int NC_CC = 16;
constexpr int NC_HALO = (NC_TH + NC_MAX_K - 1) * (NC_TW + NC_MAX_K - 1);

template <typename T>
__device__ __forceinline__ void rmsnorm_relu_conv2d(const T* x, const T* nw, const T* nb, const T* w, const T* b, T* y,
                                                    int h, int wd, int cin, int cout, int k, float eps) {
    __shared__ float rstd[NC_HALO];
    __shared__ float tile[NC_CC][NC_HALO];
    __shared__ float wsm[NC_MAX_COUT][NC_CC][NC_MAX_K * NC_MAX_K];
    const int tid = threadIdx.x;
    const int p = k / 2, hp = NC_TH + k - 1, wp = NC_TW + k - 1, halo = hp * wp, taps = k * k;
    const int y0 = blockIdx.y * NC_TH - p, x0 = blockIdx.x * NC_TW - p;
    const T* xb = x + (i64)blockIdx.z * h * wd * cin;

    // 1. 1/rms of every halo pixel (-1: outside the image).
    const int lane = tid & 31, warp = tid >> 5;
    for (int q = warp; q < halo; q += NC_THREADS / 32) {
        const int sy = y0 + q / wp, sx = x0 + q % wp;
        const bool inside = sy >= 0 && sy < h && sx >= 0 && sx < wd;  // the same for the whole warp
        float s = 0.f;
        if (inside) {
            const T* px = xb + ((i64)sy * wd + sx) * cin;
            for (int c = lane; c < cin; c += 32) {
                const float v = to_f32(px[c]);
                s += v * v;
            }
        }
        s = warp_sum(s, 32);
        if (lane == 0) rstd[q] = inside ? 1.f / sqrtf(s / (float)cin + eps) : -1.f;
    }

    float acc[NC_MAX_COUT];
#pragma unroll
    for (int o = 0; o < NC_MAX_COUT; ++o) acc[o] = 0.f;
    const int tx = tid % NC_TW, ty = tid / NC_TW;
    for (int c0 = 0; c0 < cin; c0 += NC_CC) {
        __syncthreads();  // rstd written (first chunk); the previous chunk's tile fully read
        // 2a. relu(norm(x)) of this chunk's channels over the halo tile, channel-major.
        for (int i = tid; i < halo * NC_CC; i += NC_THREADS) {
            const int q = i / NC_CC, c = i % NC_CC, ch = c0 + c;
            const float r = rstd[q];
            float v = 0.f;
            if (r >= 0.f && ch < cin) {
                const int sy = y0 + q / wp, sx = x0 + q % wp;
                v = to_f32(xb[((i64)sy * wd + sx) * cin + ch]) * r * to_f32(nw[ch]);
                if (nb) v += to_f32(nb[ch]);
                v = fmaxf(v, 0.f);
            }
            tile[c][q] = v;
        }
        for (int i = tid; i < NC_MAX_COUT * NC_CC * taps; i += NC_THREADS) {
            const int o = i / (NC_CC * taps), c = (i / taps) % NC_CC, t = i % taps, ch = c0 + c;
            wsm[o][c][t] = (o < cout && ch < cin) ? to_f32(w[((i64)o * cin + ch) * taps + t]) : 0.f;
        }
        __syncthreads();
        // 2b. This pixel's outputs over the chunk.
        for (int c = 0; c < NC_CC; ++c) {
            for (int dy = 0; dy < k; ++dy) {
                for (int dx = 0; dx < k; ++dx) {
                    const float v = tile[c][(ty + dy) * wp + tx + dx];
#pragma unroll
                    for (int o = 0; o < NC_MAX_COUT; ++o) acc[o] += v * wsm[o][c][dy * k + dx];
                }
            }
        }
    }
    const int oy = blockIdx.y * NC_TH + ty, ox = blockIdx.x * NC_TW + tx;
    if (oy >= h || ox >= wd) return;  // no barrier follows
    T* yp = y + (((i64)blockIdx.z * h + oy) * wd + ox) * cout;
#pragma unroll
    for (int o = 0; o < NC_MAX_COUT; ++o)
        if (o < cout) yp[o] = from_f32<T>(acc[o] + (b ? to_f32(b[o]) : 0.f));
}

}  // namespace ou

using ou::bf16;

extern "C" __global__ void rmsnorm_relu_conv2d_f32(const float* x, const float* nw, const float* nb, const float* w,
                                                   const float* b, float* y, int h, int wd, int cin, int cout, int k,
                                                   float eps) {
    ou::rmsnorm_relu_conv2d<float>(x, nw, nb, w, b, y, h, wd, cin, cout, k, eps);
}

extern "C" __global__ void rmsnorm_relu_conv2d_bf16(const bf16* x, const bf16* nw, const bf16* nb, const bf16* w,
                                                    const bf16* b, bf16* y, int h, int wd, int cin, int cout, int k,
                                                    float eps) {
    ou::rmsnorm_relu_conv2d<bf16>(x, nw, nb, w, b, y, h, wd, cin, cout, k, eps);
}
