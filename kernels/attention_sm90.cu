// attention_sm90.cu: softmax attention FA3-style on Hopper (sm_90a): Q tile by TMA, K/V tiles streamed
// by a producer warpgroup through an mbarrier ring, S = Q K^T and O += P V on warpgroup MMA, online
// softmax in registers (issue 16 item 2). Same op as attention.cu's attention_bf16_hd* (the mma.sync
// kernels, which stay for other GPUs, for what this one does not take, and as the fallback); CPU twin
// openuni_cpu::ops::attention. Launcher and selection: crates/cuda/src/families/attention_sm90.rs.
//
//   attention_bf16_wgmma_hd{64,80,112,128}(map_q, map_k, map_v, mask, seg, out, n, m, heads, kv_heads, hd, causal,
//       scale_log2)   grid (ceil(n / 128), B * heads), 384 threads, dynamic shared memory
//       ATT90_SMEM<HD>.
//   q [B, n, heads*hd], k and v [B, m, kv_heads*hd], out like q, bf16, row-major; query head h reads
//   key/value head h / (heads / kv_heads) (GQA); logit[i, j] = scale * q_i . k_j + bias_j with
//   bias_j = (1 - mask[b, j]) * -10000 when mask ([B, m]) is non-null; with `causal`, query i sees keys
//   j <= i + m - n. Head dims: hd % 8 == 0, hd <= HD (64, 80, 112 or 128; the smallest that holds hd):
//   the maps' boxes are 64 columns wide and the columns past hd are the TMA's zero fill; the tensor
//   cores compute HD columns (attention_sm90.cuh). Packed sequences (`seg` non-null; B = 1, n = m):
//   seg[2t], seg[2t + 1] = [start, end) of token t's segment (attention.cu's table); query i sees keys
//   [start(i), end(i)) (and j <= i when causal), and a block streams the key tiles from its first row's
//   start. Fused RoPE is the pre-pass attention_rope_bf16 below, then this kernel on the rotated q, k.
//
//   The maps are 4D over (hd, heads, tokens, B) with boxes of 64 columns x 1 head x 64 tokens x 1 and
//   the 128B swizzle: a box lands as 64 rows of 128 bytes, a K-major 128B operand (SBO 1024).
//   Warpgroup 0 produces (setmaxnreg.dec 40; one thread): the two consumers' Q tiles once (q_full), then
//   per 64-key tile the K and V boxes into a 2-stage ring (full / empty barriers, phase parity
//   (tile / 2) & 1). Warpgroups 1 and 2 consume (setmaxnreg.inc 232), 64 query rows each:
//     S (64 x 64 keys, f32) = Q K^T: HD/16 wgmma m64n64k16, A = Q and B = K by descriptor (K-major);
//     online softmax on the accumulator fragments (thread: rows g and g + 8 of its warp's 16, 16 keys
//     each; row maxima over the quad by two shuffles; log2 domain, p = exp2(x - max)); out-of-range,
//     causally hidden and other segments' keys are -inf;
//     O (64 x HD, f32) += P V: P rounded to bf16 is already the A register fragment (two adjacent 8-key
//     accumulator groups = one k16 step), 4 wgmma m64nHDk16 with A from registers and B = the V tile
//     read N-major (imm-trans-b = 1: V [keys][hd] has the head dim contiguous; LBO = one 64-column box,
//     SBO = 8 keys x 128 bytes);
//     the K/V stage is released (empty barrier) only after the wait_group that completes its wgmma.
//   Epilogue: the row sums reduced over the quad, O / l rounded to bf16 and stored as pairs.
//   Not yet (measure first): the intra-warpgroup overlap of softmax and the next S wgmma and the
//   ping-pong of two consumers (FA3's remaining tricks), a TMA store of O, separate K and V barriers.
//
//   attention_rope_bf16(q, k, seg, rope_cs, q_out, k_out, tokens, n, heads, kv_heads, hd)   grid
//       ceil(tokens * (heads + kv_heads) * hd / 8 / 256), 256 threads: fused RoPE's pre-pass. The wgmma
//       kernel reads q and k by TMA straight into swizzled shared memory, so instead of rotating tiles
//       there (attention.cu's rope_tile_bf16) the launcher rotates q [tokens, heads*hd] and k [tokens,
//       kv_heads*hd] (tokens = B * n, n = m; row t at position t % n, or t - start(t) with `seg`) once
//       into scratch (q_out, k_out) and maps those. rotate_half with attention.cu's table, rope_cs[(p * hd/2 + i) * 2 + {0, 1}] =
//       (cos, sin): x1 c - x2 s and x2 c + x1 s with every product and sum rounded once (no fused
//       multiply-add), then rounded to bf16: the CPU twin's rope_at on the bf16 inputs, rounded to bf16,
//       bit for bit (what attention.cu stores in its tiles, up to the FMA it may contract). One thread
//       rotates 4 adjacent pairs (hd % 8 == 0: 8-byte loads of each half, 32 bytes of the table).

#include "attention_sm90.cuh"

using ou::bf16;

#if OU_ATT_SM90
#define OU_A90_BODY(HD)                                                                                          \
    extern __shared__ __align__(1024) unsigned char smem[];                                                      \
    ou::attention_sm90<HD>(smem, map_q, map_k, map_v, mask, seg, out, n, m, heads, kv_heads, hd, causal, scale_log2);
#else
#define OU_A90_BODY(HD) __trap();  // not sm_90a: the launcher never selects this kernel
#endif

extern "C" __launch_bounds__(384, 1) __global__ void attention_bf16_wgmma_hd64(const __grid_constant__ ou::TensorMap map_q, const __grid_constant__ ou::TensorMap map_k, const __grid_constant__ ou::TensorMap map_v, const bf16* mask, const int* seg, bf16* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale_log2) {
    OU_A90_BODY(64)
}

extern "C" __launch_bounds__(384, 1) __global__ void attention_bf16_wgmma_hd80(const __grid_constant__ ou::TensorMap map_q, const __grid_constant__ ou::TensorMap map_k, const __grid_constant__ ou::TensorMap map_v, const bf16* mask, const int* seg, bf16* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale_log2) {
    OU_A90_BODY(80)
}

extern "C" __launch_bounds__(384, 1) __global__ void attention_bf16_wgmma_hd112(const __grid_constant__ ou::TensorMap map_q, const __grid_constant__ ou::TensorMap map_k, const __grid_constant__ ou::TensorMap map_v, const bf16* mask, const int* seg, bf16* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale_log2) {
    OU_A90_BODY(112)
}

extern "C" __launch_bounds__(384, 1) __global__ void attention_bf16_wgmma_hd128(const __grid_constant__ ou::TensorMap map_q, const __grid_constant__ ou::TensorMap map_k, const __grid_constant__ ou::TensorMap map_v, const bf16* mask, const int* seg, bf16* out, int n, int m, int heads, int kv_heads, int hd, int causal, float scale_log2) {
    OU_A90_BODY(128)
}

extern "C" __launch_bounds__(256) __global__ void attention_rope_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k, const int* __restrict__ seg, const float* __restrict__ rope_cs, bf16* __restrict__ q_out, bf16* __restrict__ k_out, long long tokens, int n, int heads, int kv_heads, int hd) {
    using ou::i64;
    const int half = hd / 2, quads = half / 4;
    const i64 per_token = (i64)(heads + kv_heads) * quads;
    const i64 total = tokens * per_token;
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 t = e / per_token;
        const int r = (int)(e - t * per_token), h = r / quads, i = (r - h * quads) * 4;
        const i64 row = h < heads ? (t * heads + h) * hd : (t * kv_heads + h - heads) * hd;
        const bf16* src = (h < heads ? q : k) + row;
        bf16* dst = (h < heads ? q_out : k_out) + row;
        const i64 pos = seg ? t - seg[2 * t] : t % n;  // restarts at each segment start
        const float* c = rope_cs + (pos * half + i) * 2;
        const float4 cs01 = *reinterpret_cast<const float4*>(c), cs23 = *reinterpret_cast<const float4*>(c + 4);
        const float cos_[4] = {cs01.x, cs01.z, cs23.x, cs23.z}, sin_[4] = {cs01.y, cs01.w, cs23.y, cs23.w};
        const uint2 a = *reinterpret_cast<const uint2*>(src + i), b = *reinterpret_cast<const uint2*>(src + half + i);
        const bf16* x1 = reinterpret_cast<const bf16*>(&a);
        const bf16* x2 = reinterpret_cast<const bf16*>(&b);
        __align__(8) bf16 y1[4], y2[4];
        for (int j = 0; j < 4; ++j) {
            const float u = ou::to_f32(x1[j]), w = ou::to_f32(x2[j]);
            y1[j] = ou::from_f32<bf16>(__fsub_rn(__fmul_rn(u, cos_[j]), __fmul_rn(w, sin_[j])));
            y2[j] = ou::from_f32<bf16>(__fadd_rn(__fmul_rn(w, cos_[j]), __fmul_rn(u, sin_[j])));
        }
        *reinterpret_cast<uint2*>(dst + i) = *reinterpret_cast<const uint2*>(y1);
        *reinterpret_cast<uint2*>(dst + half + i) = *reinterpret_cast<const uint2*>(y2);
    }
}
