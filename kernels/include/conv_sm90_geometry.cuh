// conv_sm90_geometry.cuh: the geometry of kernels/conv_sm90.cu that its launcher also needs, in one place.
//
// crates/cuda/build.rs generates openuni_cuda::families::conv_sm90::geometry from the
// `constexpr int NAME = VALUE;` lines (one literal per line, as conv_geometry.cuh), and the kernel
// `conv_sm90_geometry` reports the compiled values for tests/cuda_conv_sm90.rs to compare.
#pragma once

namespace ou {

constexpr int C90_BOX_H = 8;       // pixel rows of one consumer warpgroup's A box (one TMA box)
constexpr int C90_TILE_W = 16;     // pixel columns of a block tile (and of a box): box = 128 pixels = 2 x m64
constexpr int C90_CONSUMERS = 2;   // consumer warpgroups; block tile = (C90_BOX_H * C90_CONSUMERS) x C90_TILE_W
constexpr int C90_TILE_N = 128;    // output channels per block (wgmma N)
constexpr int C90_CHUNK = 64;      // input channels per pipeline stage (one 128-byte swizzled row)
constexpr int C90_STAGES = 4;      // depth of the TMA -> wgmma ring
constexpr int C90_THREADS = 384;   // 1 producer + C90_CONSUMERS consumer warpgroups of 128 threads
constexpr int C90_SMEM = 197760;   // dynamic shared memory: 1024 alignment slack + 4 x 48 KiB stages + barriers

}  // namespace ou
