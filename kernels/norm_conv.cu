// norm_conv.cu: DC-AE's output head, conv_out(relu(norm_out(x))), as one kernel, so that neither
// the normalised nor the rectified tensor (128 channels at the image's full resolution) is ever
// stored. CPU twin: openuni_cpu::ops::rmsnorm_relu_conv2d (the three ops in turn).
//
//   rmsnorm_relu_conv2d_{f32,bf16}(x, nw, nb, w, b, y, h, wd, cin, cout, k, eps)
//       x tokens [B, h·wd, cin] (NHWC); RMSNorm over the channels of each pixel with weight `nw` and
//       optional bias `nb` (eps), ReLU, then a k×k convolution (zero padding k/2, stride 1) with
//       weight `w` [cout, cin, k, k] and optional bias `b` -> y [B, h·wd, cout]. A small-N kernel:
//       cout <= NC_MAX_COUT (conv_out has 3), k 1 or 3 (NC_MAX_K); the launcher checks both.
//
// Launch (openuni_cuda::families::norm_conv): grid (ceil(wd / NC_TW), ceil(h / NC_TH), B), block
// NC_THREADS = 128 threads. A CTA owns an NC_TH×NC_TW = 16×32 output tile plus a (k/2)-pixel halo;
// a thread owns NC_RPT = 4 pixels of one column (rows tr·4 .. tr·4+3), so each staged value it reads
// serves up to 4 outputs (18 shared loads feed 108 FMAs per channel for k 3, cout 3, where the first
// version of this kernel, one pixel per thread, issued 45 loads per 36 FMAs and ran at 3% of the copy
// ceiling on an H200, docs/gpu-results.md run 1):
//   1. every halo pixel's 1/rms (f32), kept in shared memory: half a warp per pixel over 16-byte
//      vectors, 4 pixels per half-warp in flight (or, without vectors, one warp per pixel over single
//      elements); a pixel outside the image is marked (-1) and reads as zero (the conv's padding is
//      applied to relu(norm(x)), not to x);
//   2. channels in chunks of NC_CC = 8: the chunk of the halo tile is normalised, rectified and
//      stored channel-major in shared memory (f32; a fixed 18×34 layout per channel, whose stride
//      612 ≡ 4 mod 32 keeps both store patterns conflict-free: a vector's channels of consecutive
//      pixels, or without vectors 8 channels by 4 pixels), the chunk's
//      weights next to it as one float4 of output channels per (channel, tap); then every thread
//      accumulates its 4 pixels' outputs over the chunk's channels and taps in f32 (consecutive
//      lanes read consecutive columns: no bank conflicts; the weight reads are broadcasts).
// The kernel size (1 or 3) and the output channel count (1 to 4) are template parameters, so the
// tap and output loops unroll and no FMA is spent on absent channels.
// x is read twice (statistics, then values), the second time mostly from L2; y is written once.
// Accumulation is in f32 in (channel chunk, channel, tap row, tap column) order: not the CPU twin's.

#include "common.cuh"
#include "norm_geometry.cuh"

namespace ou {

// NC_TW, NC_RPT, NC_TROWS, NC_MAX_K, NC_MAX_COUT, NC_CC: norm_geometry.cuh (the launcher reads them too).
constexpr int NC_TH = NC_RPT * NC_TROWS;     // output tile height
constexpr int NC_THREADS = NC_TW * NC_TROWS;
constexpr int NC_HS = NC_TW + NC_MAX_K - 1;  // row stride of the staged halo tile, for every k
constexpr int NC_HALO = (NC_TH + NC_MAX_K - 1) * NC_HS;

// The CTA's shared memory, declared once in the entry point: each instantiation below declaring its
// own would add up (8 instantiations, 182 KB of static shared memory per CTA).
struct NormConvSmem {
    float4 wsm[NC_CC][NC_MAX_K * NC_MAX_K];  // the chunk's conv weights, output channels 0..3
    float rstd[NC_HALO];                     // 1/rms of each halo pixel, -1 outside the image
    float tile[NC_CC][NC_HALO];              // relu(norm(x)) of the chunk, channel-major
    float nwc[NC_CC], nbc[NC_CC];            // the chunk's norm weight and bias
};

template <typename T, int K, int COUT>
__device__ __forceinline__ void rmsnorm_relu_conv2d(NormConvSmem& sm, const T* x, const T* nw, const T* nb, const T* w,
                                                    const T* b, T* y, int h, int wd, int cin, float eps) {
    static_assert(K % 2 == 1 && K <= NC_MAX_K && COUT >= 1 && COUT <= NC_MAX_COUT, "shape outside the kernel");
    float* rstd = sm.rstd;
    float (*tile)[NC_HALO] = sm.tile;
    float4 (*wsm)[NC_MAX_K * NC_MAX_K] = sm.wsm;
    float* nwc = sm.nwc;
    float* nbc = sm.nbc;
    const int tid = threadIdx.x;
    constexpr int P = K / 2, HP = NC_TH + K - 1, WP = NC_TW + K - 1, TAPS = K * K;
    const int y0 = blockIdx.y * NC_TH - P, x0 = blockIdx.x * NC_TW - P;
    const T* xb = x + (i64)blockIdx.z * h * wd * cin;

    // With 16-byte vectors (cin a multiple of the vector width, x 16-byte aligned) both passes over
    // x issue several wide loads per thread before using any: one element per load, one load in
    // flight (the first version) left the kernel waiting on memory latency at 4-6% of the copy
    // ceiling on an H200 (docs/gpu-results.md run 3).
    constexpr int V = Vec16<T>::N;
    const bool vec = cin % V == 0 && aligned16(x);

    // 1. 1/rms of every halo pixel (-1: outside the image).
    const int lane = tid & 31, warp = tid >> 5;
    if (vec) {
        // Half a warp per pixel (lanes over its vectors), 4 pixels per half-warp in flight.
        constexpr int PIX = NC_THREADS / 16, UN = 4;
        const int half = lane >> 4, l16 = lane & 15;
        for (int q0 = warp * 2; q0 < HP * WP; q0 += PIX * UN) {  // q0 is the warp's: both halves reach the shuffles
            float sq[UN];
#pragma unroll
            for (int u = 0; u < UN; ++u) {
                const int q = q0 + half + u * PIX, sy = y0 + q / WP, sx = x0 + q % WP;
                sq[u] = 0.f;
                if (q < HP * WP && sy >= 0 && sy < h && sx >= 0 && sx < wd) {
                    const T* px = xb + ((i64)sy * wd + sx) * cin;
                    for (int c = l16 * V; c < cin; c += 16 * V) {
                        Pack16<T> pk;
                        pk.raw = *reinterpret_cast<const uint4*>(px + c);
#pragma unroll
                        for (int e = 0; e < V; ++e) sq[u] += to_f32(pk.e[e]) * to_f32(pk.e[e]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < UN; ++u) {
                const float ss = warp_sum(sq[u], 16);
                const int q = q0 + half + u * PIX, r = q / WP, cc = q % WP, sy = y0 + r, sx = x0 + cc;
                if (l16 == 0 && q < HP * WP)
                    rstd[r * NC_HS + cc] = (sy >= 0 && sy < h && sx >= 0 && sx < wd) ? 1.f / sqrtf(ss / (float)cin + eps) : -1.f;
            }
        }
    } else {
        for (int q = warp; q < HP * WP; q += NC_THREADS / 32) {
            const int r = q / WP, cc = q % WP, sy = y0 + r, sx = x0 + cc;
            const bool inside = sy >= 0 && sy < h && sx >= 0 && sx < wd;  // the same for the whole warp
            float sq = 0.f;
            if (inside) {
                const T* px = xb + ((i64)sy * wd + sx) * cin;
                for (int c = lane; c < cin; c += 32) {
                    const float v = to_f32(px[c]);
                    sq += v * v;
                }
            }
            sq = warp_sum(sq, 32);
            if (lane == 0) rstd[r * NC_HS + cc] = inside ? 1.f / sqrtf(sq / (float)cin + eps) : -1.f;
        }
    }

    float acc[NC_RPT][COUT];
#pragma unroll
    for (int j = 0; j < NC_RPT; ++j)
#pragma unroll
        for (int o = 0; o < COUT; ++o) acc[j][o] = 0.f;
    const int tx = tid % NC_TW, tr = tid / NC_TW;
    for (int c0 = 0; c0 < cin; c0 += NC_CC) {
        // 2a. The chunk's norm weight and bias, and its conv weights (zero beyond cin and COUT).
        if (tid < NC_CC) {
            const int ch = c0 + tid;
            nwc[tid] = ch < cin ? to_f32(nw[ch]) : 0.f;
            nbc[tid] = (ch < cin && nb) ? to_f32(nb[ch]) : 0.f;
        }
        for (int i = tid; i < NC_CC * TAPS; i += NC_THREADS) {
            const int c = i / TAPS, t = i % TAPS, ch = c0 + c;
            float o4[4];
#pragma unroll
            for (int o = 0; o < 4; ++o) o4[o] = (o < COUT && ch < cin) ? to_f32(w[((i64)o * cin + ch) * TAPS + t]) : 0.f;
            wsm[c][t] = make_float4(o4[0], o4[1], o4[2], o4[3]);
        }
        __syncthreads();  // rstd, nwc/nbc and wsm written; the previous chunk's tile fully read
        // 2b. relu(norm(x)) of the chunk's channels over the halo tile, channel-major.
        if (vec) {
            // One vector per (pixel, vector of the chunk), all of a thread's loads issued first.
            constexpr int G = NC_CC / V, N = HP * WP * G, PER = (N + NC_THREADS - 1) / NC_THREADS;
            Pack16<T> pk[PER];
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int i = tid + k * NC_THREADS, q = i / G, g = i % G, r = q / WP, cc = q % WP;
                pk[k].raw = make_uint4(0u, 0u, 0u, 0u);
                if (i < N && rstd[r * NC_HS + cc] >= 0.f && c0 + g * V < cin)
                    pk[k].raw = *reinterpret_cast<const uint4*>(xb + ((i64)(y0 + r) * wd + x0 + cc) * cin + c0 + g * V);
            }
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int i = tid + k * NC_THREADS, q = i / G, g = i % G, hi = q / WP * NC_HS + q % WP;
                if (i >= N) break;
                const float rs = rstd[hi];
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const int c = g * V + e;
                    tile[c][hi] = (rs >= 0.f && c0 + c < cin) ? fmaxf(to_f32(pk[k].e[e]) * rs * nwc[c] + nbc[c], 0.f) : 0.f;
                }
            }
        } else {
            for (int i = tid; i < HP * WP * NC_CC; i += NC_THREADS) {
                const int q = i / NC_CC, c = i % NC_CC, ch = c0 + c, r = q / WP, cc = q % WP, hi = r * NC_HS + cc;
                const float rs = rstd[hi];
                float v = 0.f;
                if (rs >= 0.f && ch < cin) {
                    const float xv = to_f32(xb[((i64)(y0 + r) * wd + x0 + cc) * cin + ch]);
                    v = fmaxf(xv * rs * nwc[c] + nbc[c], 0.f);
                }
                tile[c][hi] = v;
            }
        }
        __syncthreads();
        // 2c. This thread's NC_RPT pixels over the chunk: staged row r feeds output row j at tap row r - j.
#pragma unroll 2
        for (int c = 0; c < NC_CC; ++c) {
            const float* tc = &tile[c][tr * NC_RPT * NC_HS + tx];
            float4 wv[TAPS];
#pragma unroll
            for (int t = 0; t < TAPS; ++t) wv[t] = wsm[c][t];
#pragma unroll
            for (int r = 0; r < NC_RPT + K - 1; ++r) {
#pragma unroll
                for (int dx = 0; dx < K; ++dx) {
                    const float v = tc[r * NC_HS + dx];
#pragma unroll
                    for (int j = 0; j < NC_RPT; ++j) {
                        const int dy = r - j;
                        if (dy < 0 || dy >= K) continue;
                        const float4 wt = wv[dy * K + dx];
                        const float wo[4] = {wt.x, wt.y, wt.z, wt.w};
#pragma unroll
                        for (int o = 0; o < COUT; ++o) acc[j][o] += v * wo[o];
                    }
                }
            }
        }
        __syncthreads();  // the tile and weights are rewritten by the next chunk
    }
    const int ox = blockIdx.x * NC_TW + tx;
    if (ox >= wd) return;  // no barrier follows
    float bias[COUT];
#pragma unroll
    for (int o = 0; o < COUT; ++o) bias[o] = b ? to_f32(b[o]) : 0.f;
#pragma unroll
    for (int j = 0; j < NC_RPT; ++j) {
        const int oy = blockIdx.y * NC_TH + tr * NC_RPT + j;
        if (oy >= h) break;
        T* yp = y + (((i64)blockIdx.z * h + oy) * wd + ox) * COUT;
#pragma unroll
        for (int o = 0; o < COUT; ++o) yp[o] = from_f32<T>(acc[j][o] + bias[o]);
    }
}

// The instantiation for (k, cout); the launcher has refused every other pair.
template <typename T>
__device__ __forceinline__ void rmsnorm_relu_conv2d_any(const T* x, const T* nw, const T* nb, const T* w, const T* b, T* y,
                                                        int h, int wd, int cin, int cout, int k, float eps) {
    __shared__ NormConvSmem sm;
#define OU_NC_CASE(KK, CO) \
    if (k == KK && cout == CO) return rmsnorm_relu_conv2d<T, KK, CO>(sm, x, nw, nb, w, b, y, h, wd, cin, eps);
    OU_NC_CASE(3, 3) OU_NC_CASE(3, 1) OU_NC_CASE(3, 2) OU_NC_CASE(3, 4)
    OU_NC_CASE(1, 1) OU_NC_CASE(1, 2) OU_NC_CASE(1, 3) OU_NC_CASE(1, 4)
#undef OU_NC_CASE
}

}  // namespace ou

using ou::bf16;

extern "C" __launch_bounds__(128) __global__ void rmsnorm_relu_conv2d_f32(const float* x, const float* nw, const float* nb, const float* w,
                                                   const float* b, float* y, int h, int wd, int cin, int cout, int k,
                                                   float eps) {
    ou::rmsnorm_relu_conv2d_any<float>(x, nw, nb, w, b, y, h, wd, cin, cout, k, eps);
}

extern "C" __launch_bounds__(128) __global__ void rmsnorm_relu_conv2d_bf16(const bf16* x, const bf16* nw, const bf16* nb, const bf16* w,
                                                    const bf16* b, bf16* y, int h, int wd, int cin, int cout, int k,
                                                    float eps) {
    ou::rmsnorm_relu_conv2d_any<bf16>(x, nw, nb, w, b, y, h, wd, cin, cout, k, eps);
}
