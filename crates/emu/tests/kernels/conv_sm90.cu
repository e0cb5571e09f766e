// The mainloop of kernels/conv_sm90.cu (kernels/include/conv_sm90.cuh) with each of its mutants: the 3x3
// conv (no bias, residual or activation) for crates/emu/tests/conv_sm90.rs, which expects the correct
// version (variant 0) to match a plain CPU conv and every other variant to fail or give a wrong result.
#include "conv_sm90.cuh"

extern "C" __global__ void emu_test_conv_sm90(const __grid_constant__ ou::TensorMap map_x, const __grid_constant__ ou::TensorMap map_w, ou::bf16* y, int h, int wd, int cin, int cout, int variant) {
  extern __shared__ __align__(1024) unsigned char smem[];
  switch (variant) {
    case ou::C90_OK: ou::conv_sm90<false, ou::C90_OK>(smem, map_x, map_w, nullptr, nullptr, nullptr, y, h, wd, cin, cout, 0, 0); break;
    case ou::C90_WRONG_SWIZZLE: ou::conv_sm90<false, ou::C90_WRONG_SWIZZLE>(smem, map_x, map_w, nullptr, nullptr, nullptr, y, h, wd, cin, cout, 0, 0); break;
    case ou::C90_EARLY_RELEASE: ou::conv_sm90<false, ou::C90_EARLY_RELEASE>(smem, map_x, map_w, nullptr, nullptr, nullptr, y, h, wd, cin, cout, 0, 0); break;
    case ou::C90_NO_WAIT: ou::conv_sm90<false, ou::C90_NO_WAIT>(smem, map_x, map_w, nullptr, nullptr, nullptr, y, h, wd, cin, cout, 0, 0); break;
    case ou::C90_WRONG_PARITY: ou::conv_sm90<false, ou::C90_WRONG_PARITY>(smem, map_x, map_w, nullptr, nullptr, nullptr, y, h, wd, cin, cout, 0, 0); break;
  }
}
