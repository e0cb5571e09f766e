// norm_geometry.cuh: the launch geometry of the row norms (kernels/norm.cu, kernels/pixel_shuffle.cu)
// and of DC-AE's output head (kernels/norm_conv.cu) that their launchers also need, in one place.
//
// crates/cuda/build.rs generates openuni_cuda::families::norm::geometry from the
// `constexpr int NAME = VALUE;` lines (one literal per line, as conv_geometry.cuh).
#pragma once

namespace ou {

// Row norms: items (16-byte vectors or elements) a thread keeps in registers. 5, not 4: SANA-600M's
// 1152 columns (144 bf16 vectors) then fit one warp per row, whose reductions are shuffles only;
// with 4 they took 64 threads and a shared-memory step with barriers, and the adaLN LayerNorm ran
// at 38% of the copy ceiling on an H200 where the one-warp norms ran at 68-86% (docs/gpu-results.md
// run 3).
constexpr int NORM_CACHE = 5;
// Row norms: most threads in a block. Their registers must fit an SM (65,536) for any launch:
// 1024-thread blocks of layernorm_bf16 at 71 registers failed to launch on an H200 (run 4), which
// the emulated GPU cannot show; tests/kernels_compile.rs checks every norm kernel against this.
constexpr int NORM_MAX_THREADS = 512;

// rmsnorm_relu_conv2d (DC-AE conv_out): output tile NC_TW columns (one per lane) by
// NC_RPT * NC_TROWS rows, a thread owning NC_RPT rows of one column; NC_TW * NC_TROWS threads.
constexpr int NC_TW = 32;
constexpr int NC_RPT = 4;
constexpr int NC_TROWS = 4;
constexpr int NC_MAX_K = 3;       // kernel size 1 or 3
constexpr int NC_MAX_COUT = 4;    // output channels (conv_out has 3)
constexpr int NC_CC = 8;          // input channels staged per chunk

}  // namespace ou
