// conv_sm90.cu: the DC-AE decoder's 3x3 convolution and phase-upsample convolution as implicit GEMMs on
// Hopper's warpgroup MMA (sm_90a `wgmma.mma_async`), fed by the tensor memory accelerator (TMA) through an
// mbarrier ring: issue 16 item 2. Same ops, tokens and epilogues as conv2d_bf16_tc and
// upsample_conv2d_bf16_tc of conv.cu (the mma.sync kernels, which stay for other GPUs and as the
// fallback); CPU twins openuni_cpu::ops::{conv2d, upsample_conv2d}. Launcher and shape rules:
// crates/cuda/src/families/conv_sm90.rs. docs/hopper.md describes the pipeline in full.
//
//   conv3x3_weights_sm90(w, out, cin, cout, phases)      grid-stride
//       The weights in the layout the kernels below read by TMA, made once per weight tensor (at resolve
//       time): phases == 0: out[tap][cout][cin] = w[cout][cin][tap] (tap = 3 dy + dx, the upstream
//       [Cout, Cin, 3, 3] transposed so that input channels are contiguous, the GEMM's K);
//       phases == 1: out[4 phase + tap][cout][cin], the 4 taps (r, s) of each output parity phase
//       (pi, pj) of the upsample conv, combined in f32 from the 9 taps and rounded once (as conv.cu's
//       phase_taps: rows first, then columns).
//   conv2d_bf16_wgmma(map_x, map_w, bias, res, y, h, wd, cin, cout, act)
//   upsample_conv2d_bf16_wgmma(map_x, map_w, x, bias, y, h, wd, cin, cout, shortcut)
//       grid (tiles of 16 x 16 pixels x batch, ceil(cout / 128), 1 or 4 phases), 384 threads,
//       C90_SMEM bytes of dynamic shared memory.
//       Implicit GEMM: M = output pixels (a 16 x 16 tile), N = 128 output channels, K = taps x cin in
//       steps of (tap, 64 input channels). map_x: a 4D tensor map over x [B, h, wd, cin] (dims cin, wd,
//       h, B), box 64 channels x 16 columns x 8 rows, 128B swizzle; map_w: 3D over the prepared weights
//       (dims cin, cout, taps), box 64 x 128 x 1, 128B swizzle. A box lands as 128 rows (pixels) of 128
//       bytes: exactly a K-major 128B-swizzled wgmma operand (SBO 1024 bytes, 16-element k steps 32 bytes
//       apart), the tap's shift is just the box's signed start coordinate, and the zero padding, the
//       edge tiles and channel counts that are not a multiple of 64 are the TMA's out-of-bounds zero
//       fill (weights and pixels alike, so no masking in the mainloop).
//       Warpgroup 0 is the producer: setmaxnreg.dec to 40 registers; one thread waits for a free stage
//       (`empty` barrier), arms its `full` barrier with the stage's bytes (arrive.expect_tx) and issues
//       three TMA boxes (A of both consumers, B). Warpgroups 1 and 2 are the consumers (setmaxnreg.inc to
//       232): each owns 8 x 16 pixels (two m64 row blocks) x 128 channels, 128 f32 accumulators per
//       thread; per stage it waits on `full`, issues 4 k16 steps x 2 `wgmma.mma_async.m64n128k16`,
//       commits, waits until at most the current group is in flight (wait_group 1), and only then
//       releases the previous stage to the producer (its wgmma reads are complete). Four 48 KiB stages.
//       Epilogue (conv_sm90_epilogue, conv_sm90.cuh) through shared memory: each consumer warp copies
//       its accumulators into its own A box of one stage (free once the mainloop is done), then a rolled
//       loop over 8-channel vectors computes in f32 + bias, SiLU when act == 1, + res (same shape as y)
//       when non-null (conv); + bias and DC-AE's pixel-shuffle shortcut of x when shortcut != 0
//       (upsample: blockIdx.z = 2 pi + pj, the tile is on the low-resolution grid and its pixels land at
//       (2 ly + pi, 2 lx + pj)); rounded once to bf16, stored as 16-byte vectors (element-wise when
//       cout % 8 != 0 or a pointer is not 16-byte aligned). Small code on purpose: see there.
//       Shape rules (the launcher checks them): cin % 8 == 0 (TMA row strides are multiples of 16
//       bytes), x and the prepared weights 16-byte aligned; any h, wd, cout.
//   conv_sm90_geometry(out)   the geometry the kernels are compiled with (conv_sm90_geometry.cuh).
//
// On devices other than sm_90a the kernels compile to a trap (wgmma and setmaxnreg exist only there);
// the launcher selects them only on compute capability 9.0.
//
// Not yet (measure first on a GPU): a TMA store of the output tile, a persistent
// tile scheduler, two consumer warpgroups ping-ponging mainloop and epilogue (CUTLASS's "pingpong"),
// thread-block clusters multicasting the weight box, and weights prepared at load time rather than at
// resolve time.

#include "conv_sm90.cuh"

namespace ou {

// Tap order of the prepared weights: see the file comment.
__device__ __forceinline__ float c90_weight(const bf16* w, i64 n, int ci, int cin, int tap) {
    return to_f32(w[(n * cin + ci) * 9 + tap]);
}

}  // namespace ou

using ou::bf16;
using ou::i64;

extern "C" __global__ void conv3x3_weights_sm90(const bf16* w, bf16* out, int cin, int cout, int phases) {
    const int taps = phases ? 16 : 9;
    const i64 total = (i64)taps * cout * cin;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const int ci = (int)(e % cin);
        const i64 n = e / cin % cout;
        const int z = (int)(e / cin / cout);
        if (!phases) {
            out[e] = w[(n * cin + ci) * 9 + z];
            continue;
        }
        // Phase (pi, pj) = z / 4, tap (r, s) = z % 4: the 3x3 taps (dy, dx) of row group r and column
        // group s (pi = 0: r = 0 takes dy {0}, r = 1 takes {1, 2}; pi = 1: {0, 1} and {2}; columns alike).
        const int pi = z >> 3, pj = (z >> 2) & 1, r = (z >> 1) & 1, s = z & 1;
        float rows[3];
        for (int dx = 0; dx < 3; ++dx) {
            const float c0 = ou::c90_weight(w, n, ci, cin, dx), c1 = ou::c90_weight(w, n, ci, cin, 3 + dx),
                        c2 = ou::c90_weight(w, n, ci, cin, 6 + dx);
            rows[dx] = r == 0 ? (pi == 0 ? c0 : c0 + c1) : (pi == 0 ? c1 + c2 : c2);
        }
        const float v = s == 0 ? (pj == 0 ? rows[0] : rows[0] + rows[1]) : (pj == 0 ? rows[1] + rows[2] : rows[2]);
        out[e] = ou::from_f32<bf16>(v);
    }
}

extern "C" __launch_bounds__(384, 1) __global__ void conv2d_bf16_wgmma(const __grid_constant__ ou::TensorMap map_x, const __grid_constant__ ou::TensorMap map_w, const bf16* bias, const bf16* res, bf16* y, int h, int wd, int cin, int cout, int act) {
#if OU_CONV_SM90
    extern __shared__ __align__(1024) unsigned char smem[];
    ou::conv_sm90<false>(smem, map_x, map_w, nullptr, bias, res, y, h, wd, cin, cout, act, 0);
#else
    __trap();  // not sm_90a: the launcher never selects this kernel
#endif
}

extern "C" __launch_bounds__(384, 1) __global__ void upsample_conv2d_bf16_wgmma(const __grid_constant__ ou::TensorMap map_x, const __grid_constant__ ou::TensorMap map_w, const bf16* x, const bf16* bias, bf16* y, int h, int wd, int cin, int cout, int shortcut) {
#if OU_CONV_SM90
    extern __shared__ __align__(1024) unsigned char smem[];
    ou::conv_sm90<true>(smem, map_x, map_w, x, bias, nullptr, y, h, wd, cin, cout, 0, shortcut);
#else
    __trap();  // not sm_90a: the launcher never selects this kernel
#endif
}

// The geometry the kernels are compiled with, in conv_sm90_geometry.cuh's order.
extern "C" __global__ void conv_sm90_geometry(int* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const int g[8] = {ou::C90_BOX_H, ou::C90_TILE_W, ou::C90_CONSUMERS, ou::C90_TILE_N,
                          ou::C90_CHUNK, ou::C90_STAGES, ou::C90_THREADS, ou::C90_SMEM};
        for (int i = 0; i < 8; ++i) out[i] = g[i];
    }
}
