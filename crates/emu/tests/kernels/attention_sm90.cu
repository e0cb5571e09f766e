// The attention of kernels/attention_sm90.cu (kernels/include/attention_sm90.cuh, head-dim capacity 64) with
// each of its mutants, for crates/emu/tests/attention_sm90.rs: the correct version (variant 0) must match a
// plain CPU attention, every other variant must fail or be clearly wrong.
#include "attention_sm90.cuh"

extern "C" __global__ void emu_test_attention_sm90(const __grid_constant__ ou::TensorMap map_q, const __grid_constant__ ou::TensorMap map_k, const __grid_constant__ ou::TensorMap map_v, ou::bf16* out, int n, int m, int hd, int causal, float scale_log2, int variant) {
  extern __shared__ __align__(1024) unsigned char smem[];
  switch (variant) {
    case ou::A90_OK: ou::attention_sm90<64, ou::A90_OK>(smem, map_q, map_k, map_v, nullptr, nullptr, out, n, m, 1, 1, hd, causal, scale_log2); break;
    case ou::A90_V_K_MAJOR: ou::attention_sm90<64, ou::A90_V_K_MAJOR>(smem, map_q, map_k, map_v, nullptr, nullptr, out, n, m, 1, 1, hd, causal, scale_log2); break;
    case ou::A90_NO_RESCALE: ou::attention_sm90<64, ou::A90_NO_RESCALE>(smem, map_q, map_k, map_v, nullptr, nullptr, out, n, m, 1, 1, hd, causal, scale_log2); break;
    case ou::A90_EARLY_RELEASE: ou::attention_sm90<64, ou::A90_EARLY_RELEASE>(smem, map_q, map_k, map_v, nullptr, nullptr, out, n, m, 1, 1, hd, causal, scale_log2); break;
  }
}
