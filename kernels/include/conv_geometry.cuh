// conv_geometry.cuh: the geometry of kernels/conv.cu that its launcher also needs, in one place.
//
// crates/cuda/build.rs reads the `constexpr int NAME = VALUE;` lines of this file and generates the
// launcher's constants from them (openuni_cuda::families::conv::geometry), so kernel and launcher
// cannot disagree; conv.cu's `conv_geometry` kernel reports the values the compiled kernels use,
// and tests/cuda_conv.rs compares them with the launcher's. One definition per line, a literal
// value, nothing else on the line but a comment.
#pragma once

namespace ou {

constexpr int CONV_TILE_H = 8;    // output tile rows of conv2d_* and upsample_conv2d_* (per phase)
constexpr int CONV_TILE_W = 16;   // output tile columns
constexpr int CONV_TILE_N = 64;   // output channels per block
constexpr int CONV_TC_STAGES = 3;  // conv2d_bf16_tc*, upsample_conv2d_bf16_tc*: cp.async ring depth
constexpr int CONV_TC_NPAD = 128;  // their prepared weights: output channels padded to a multiple of this
constexpr int CONV_TC_CHUNK = 16;  // their prepared weights: input channels per chunk (zero-padded)
constexpr int CONV_KMAX = 7;      // largest (odd) kernel of conv2d_{f32,bf16} and depthwise_conv2d_*
constexpr int DW_ROWS = 4;        // depthwise: output rows per thread
constexpr int DW_CHANNELS = 128;  // depthwise: channels per block (32 threads x 4)
constexpr int DWG_CHANNELS = 32;  // depthwise 3x3 + GLU: output channels per block (u and g: 2x this)
constexpr int DWG_ROWS = 8;       // depthwise 3x3 + GLU: output rows of a block's tile
constexpr int DWG_COLS = 16;      // depthwise 3x3 + GLU: output columns of a block's tile
constexpr int DWG_THREADS = 256;  // depthwise 3x3 + GLU: threads per block
constexpr int GL_ROWS = 128;      // grouped_linear: rows per block
constexpr int GL_COLS = 32;       // grouped_linear: outputs per block
constexpr int MF_M = 256;         // mixffn_inverted_glu (kernels/mixffn_inverted_glu.cu): GEMM rows (tokens) per block
constexpr int MF_HC = 64;         // mixffn_inverted_glu: hidden channels per block (2x as many GEMM columns)
constexpr int MF_SMEM = 132096;   // mixffn_inverted_glu: dynamic shared memory, sizeof(MfSmem) (checked there)
constexpr int MF90_CHUNK = 64;    // mixffn_inverted_glu_bf16_wgmma (sm_90a): k per TMA stage (one 128-byte swizzled row)
constexpr int MF90_STAGES = 4;    // mixffn_inverted_glu_bf16_wgmma: depth of the TMA -> wgmma ring
constexpr int MF90_THREADS = 384; // mixffn_inverted_glu_bf16_wgmma: 1 producer + 2 consumer warpgroups
constexpr int MF90_SMEM = 197760; // mixffn_inverted_glu_bf16_wgmma: 1024 alignment slack + 4 x 48 KiB stages + barriers

}  // namespace ou
