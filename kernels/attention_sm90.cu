// attention_sm90.cu: softmax attention FA3-style on Hopper (sm_90a): Q tile by TMA, K/V tiles streamed
// by a producer warpgroup through an mbarrier ring, S = Q K^T and O += P V on warpgroup MMA, online
// softmax in registers (issue 16 item 2). Same op as attention.cu's attention_bf16_hd* (the mma.sync
// kernels, which stay for other GPUs, for what this one does not take, and as the fallback); CPU twin
// openuni_cpu::ops::attention. Launcher and selection: crates/cuda/src/families/attention_sm90.rs.
//
//   attention_bf16_wgmma_hd{64,128}(map_q, map_k, map_v, mask, out, n, m, heads, kv_heads, hd, causal,
//       scale_log2)   grid (ceil(n / 128), B * heads), 384 threads, dynamic shared memory
//       ATT90_SMEM<HD>.
//   q [B, n, heads*hd], k and v [B, m, kv_heads*hd], out like q, bf16, row-major; query head h reads
//   key/value head h / (heads / kv_heads) (GQA); logit[i, j] = scale * q_i . k_j + bias_j with
//   bias_j = (1 - mask[b, j]) * -10000 when mask ([B, m]) is non-null; with `causal`, query i sees keys
//   j <= i + m - n. Head dims: hd % 8 == 0, hd <= HD (64 or 128): the maps' boxes are 64 columns wide
//   and the columns past hd are the TMA's zero fill. No packed segments or fused RoPE (attention.cu).
//
//   The maps are 4D over (hd, heads, tokens, B) with boxes of 64 columns x 1 head x 64 tokens x 1 and
//   the 128B swizzle: a box lands as 64 rows of 128 bytes, a K-major 128B operand (SBO 1024).
//   Warpgroup 0 produces (setmaxnreg.dec 40; one thread): the two consumers' Q tiles once (q_full), then
//   per 64-key tile the K and V boxes into a 2-stage ring (full / empty barriers, phase parity
//   (tile / 2) & 1). Warpgroups 1 and 2 consume (setmaxnreg.inc 232), 64 query rows each:
//     S (64 x 64 keys, f32) = Q K^T: HD/16 wgmma m64n64k16, A = Q and B = K by descriptor (K-major);
//     online softmax on the accumulator fragments (thread: rows g and g + 8 of its warp's 16, 16 keys
//     each; row maxima over the quad by two shuffles; log2 domain, p = exp2(x - max)); out-of-range and
//     causally hidden keys are -inf;
//     O (64 x HD, f32) += P V: P rounded to bf16 is already the A register fragment (two adjacent 8-key
//     accumulator groups = one k16 step), 4 wgmma m64nHDk16 with A from registers and B = the V tile
//     read N-major (imm-trans-b = 1: V [keys][hd] has the head dim contiguous; LBO = one 64-column box,
//     SBO = 8 keys x 128 bytes);
//     the K/V stage is released (empty barrier) only after the wait_group that completes its wgmma.
//   Epilogue: the row sums reduced over the quad, O / l rounded to bf16 and stored as pairs.
//   Not yet (measure first): the intra-warpgroup overlap of softmax and the next S wgmma and the
//   ping-pong of two consumers (FA3's remaining tricks), a TMA store of O, separate K and V barriers.

#include "attention_sm90.cuh"

using ou::bf16;

#if OU_ATT_SM90
#define OU_A90_BODY(HD)                                                                                          \
    extern __shared__ __align__(1024) unsigned char smem[];                                                      \
    ou::attention_sm90<HD>(smem, map_q, map_k, map_v, mask, out, n, m, heads, kv_heads, hd, causal, scale_log2);
#else
#define OU_A90_BODY(HD) __trap();  // not sm_90a: the launcher never selects this kernel
#endif

extern "C" __launch_bounds__(384, 1) __global__ void attention_bf16_wgmma_hd64(const __grid_constant__ ou::TensorMap map_q, const __grid_constant__ ou::TensorMap map_k, const __grid_constant__ ou::TensorMap map_v, const bf16* mask, bf16* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale_log2) {
    OU_A90_BODY(64)
}

extern "C" __launch_bounds__(384, 1) __global__ void attention_bf16_wgmma_hd128(const __grid_constant__ ou::TensorMap map_q, const __grid_constant__ ou::TensorMap map_k, const __grid_constant__ ou::TensorMap map_v, const bf16* mask, bf16* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale_log2) {
    OU_A90_BODY(128)
}
