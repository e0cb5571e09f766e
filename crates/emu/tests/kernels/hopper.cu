// sm_90a helpers (kernels/include/wgmma.cuh, mbarrier.cuh, sm90.cuh) on the emulated GPU: tests/hopper.rs
// builds the shared-memory images, fragments and expected results on the host, from the PTX ISA's layouts.
#include <cuda_bf16.h>
#include "mbarrier.cuh"
#include "sm90.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

// What a test kernel does wrong on purpose (the mutants tests/hopper.rs expects to be caught).
enum Variant { OK = 0, MISSING_WAIT = 1, MISSING_FENCE = 2, WRONG_PARITY = 3, READ_BEFORE_WAIT = 4, CLOBBER_BEFORE_WAIT = 5 };

struct WgmmaArgs {
  int n, ta, tb, a_regs, scale_d, k_steps, sw, variant;
  unsigned a_lbo, a_sbo, b_lbo, b_sbo;
  unsigned a_off[8], b_off[8];  // per k step: byte offset of the operand in the shared image
};

template <int N, int TA, int TB>
__device__ void wgmma_run(const WgmmaArgs& p, unsigned char* sm, const unsigned* a_frags, float (&d)[N / 2]) {
  const unsigned t = threadIdx.x % 128;
  const ou::Swizzle sw = static_cast<ou::Swizzle>(p.sw);
  if (p.variant != MISSING_FENCE) ou::wgmma_fence();
  for (int s = 0; s < p.k_steps; ++s) {
    const unsigned long long db = ou::wgmma_desc(sm + p.b_off[s], p.b_lbo, p.b_sbo, sw);
    const bool scale_d = p.scale_d || s > 0;
    if (p.a_regs) {
      const unsigned a[4] = {a_frags[(s * 128 + t) * 4], a_frags[(s * 128 + t) * 4 + 1], a_frags[(s * 128 + t) * 4 + 2],
                             a_frags[(s * 128 + t) * 4 + 3]};
      ou::wgmma_mma_rs<N, TB>(d, a, db, scale_d);
    } else {
      const unsigned long long da = ou::wgmma_desc(sm + p.a_off[s], p.a_lbo, p.a_sbo, sw);
      ou::wgmma_mma_ss<N, TA, TB>(d, da, db, scale_d);
    }
  }
  ou::wgmma_commit_group();
  if (p.variant == CLOBBER_BEFORE_WAIT) {
    // BUG: overwrites B while the mma_async ops that read it may still be in flight.
    for (unsigned i = t; i < 2048; i += 128) sm[p.b_off[0] + i] = 0;
    __syncthreads();
  }
  if (p.variant != MISSING_WAIT) ou::wgmma_wait_group<0>();
}

template <int N>
__device__ void wgmma_dispatch(const WgmmaArgs& p, unsigned char* sm, const unsigned* a_frags, float* dglob) {
  float d[N / 2];
  const unsigned t = threadIdx.x % 128;
  for (int r = 0; r < N / 2; ++r) d[r] = dglob[t * (N / 2) + r];
  if (p.ta == 0 && p.tb == 0) wgmma_run<N, 0, 0>(p, sm, a_frags, d);
  if (p.ta == 0 && p.tb == 1) wgmma_run<N, 0, 1>(p, sm, a_frags, d);
  if (p.ta == 1 && p.tb == 0) wgmma_run<N, 1, 0>(p, sm, a_frags, d);
  if (p.ta == 1 && p.tb == 1) wgmma_run<N, 1, 1>(p, sm, a_frags, d);
  for (int r = 0; r < N / 2; ++r) dglob[t * (N / 2) + r] = d[r];
}

// One warpgroup: copies `image` (the operands as they lie in shared memory) to dynamic shared memory, runs
// k_steps wgmma.mma_async m64nNk16 on the accumulators in/out `d` ([thread][N/2], the initial C).
extern "C" __global__ void emu_test_wgmma(const unsigned char* image, unsigned image_bytes, const unsigned* a_frags,
                                          float* d, WgmmaArgs p) {
  extern __shared__ __align__(1024) unsigned char sm[];
  for (unsigned i = threadIdx.x; i < image_bytes; i += blockDim.x) sm[i] = image[i];
  ou::fence_proxy_async();
  __syncthreads();
  switch (p.n) {
    case 8: wgmma_dispatch<8>(p, sm, a_frags, d); break;
    case 16: wgmma_dispatch<16>(p, sm, a_frags, d); break;
    case 32: wgmma_dispatch<32>(p, sm, a_frags, d); break;
    case 64: wgmma_dispatch<64>(p, sm, a_frags, d); break;
    case 128: wgmma_dispatch<128>(p, sm, a_frags, d); break;
    case 256: wgmma_dispatch<256>(p, sm, a_frags, d); break;
    default: break;
  }
}

// Two warpgroups each run their own m64n8k16 (rows 64g..64g+63 of A), the second after setmaxnreg: both
// threads' sets of accumulators must come out right (warpgroups rendezvous separately).
extern "C" __global__ void emu_test_wgmma_two_groups(const unsigned char* image, unsigned image_bytes, float* out,
                                                     int bad_setmaxnreg) {
  extern __shared__ __align__(1024) unsigned char sm[];
  for (unsigned i = threadIdx.x; i < image_bytes; i += blockDim.x) sm[i] = image[i];
  __syncthreads();
  const unsigned g = threadIdx.x / 128, t = threadIdx.x % 128;
  if (g == 0) {
    ou::setmaxnreg_dec<40>();
  } else if (bad_setmaxnreg && t >= 64) {
    ou::setmaxnreg_inc<240>();  // BUG: warps 2-3 of the group ask for another count than warps 0-1
  } else {
    ou::setmaxnreg_inc<232>();
  }
  float d[4] = {0, 0, 0, 0};
  // A: K-major, no swizzle, core matrices 128 bytes; rows 64g.. start 8 core matrices (1024 bytes) per
  // 64 rows further. B (8x16, K-major) after A's 128 rows.
  const unsigned long long da = ou::wgmma_desc(sm + g * 1024, 128 * 16, 128, ou::Swizzle::none);
  const unsigned long long db = ou::wgmma_desc(sm + 4096, 128, 256, ou::Swizzle::none);
  ou::wgmma_fence();
  ou::wgmma_mma_ss<8, 0, 0>(d, da, db, false);
  ou::wgmma_commit_group();
  ou::wgmma_wait_group<0>();
  for (int r = 0; r < 4; ++r) out[threadIdx.x * 4 + r] = d[r];
}

// mbarrier semantics, one thread: the results of try_wait.parity 0/1 after each step of a script, so that
// tests/hopper.rs can check phases, arrival counts and transaction counts exactly.
extern "C" __global__ void emu_test_mbarrier_script(int* out) {
  __shared__ __align__(8) unsigned long long bar;
  if (threadIdx.x != 0) return;
  int i = 0;
  auto probe = [&] {
    out[i++] = ou::mbarrier_try_wait_parity(&bar, 0);
    out[i++] = ou::mbarrier_try_wait_parity(&bar, 1);
  };
  ou::mbarrier_init(&bar, 2);
  probe();                                 // fresh: phase 0 in progress
  ou::mbarrier_arrive(&bar);
  probe();                                 // 1 of 2 arrivals
  ou::mbarrier_arrive_expect_tx(&bar, 64);
  probe();                                 // arrivals done, 64 bytes outstanding
  ou::mbarrier_complete_tx(&bar, 32);
  probe();
  ou::mbarrier_complete_tx(&bar, 32);
  probe();                                 // phase 0 complete, phase 1 in progress
  ou::mbarrier_complete_tx(&bar, 16);      // bytes may land before they are expected (tx-count -16)
  ou::mbarrier_arrive(&bar);
  ou::mbarrier_arrive(&bar);
  probe();                                 // arrivals done, tx-count -16: phase 1 still open
  ou::mbarrier_expect_tx(&bar, 16);
  probe();                                 // tx-count 0: phase 1 complete
  ou::mbarrier_inval(&bar);
  out[i++] = -1;
}

// A producer warp fills a 2-stage ring in dynamic shared memory, `rounds` times; 3 consumer warps wait on
// the stage's full barrier (arrive_expect_tx by the producer + complete_tx as the data lands), sum it, and
// release the stage on its empty barrier. out[w] = what consumer warp w summed.
extern "C" __global__ void emu_test_mbarrier_ring(const float* src, int rounds, float* out, int variant) {
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem);
  unsigned long long* empty = full + 2;
  float* data = reinterpret_cast<float*>(smem + 64);  // 2 stages x 32 floats
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      ou::mbarrier_init(&full[s], 1);
      ou::mbarrier_init(&empty[s], 3 * 32);
    }
    ou::mbarrier_init_fence();
  }
  __syncthreads();
  if (warp == 0) {
    for (int r = 0; r < rounds; ++r) {
      const int s = r % 2;
      const unsigned phase = (unsigned)(r / 2) & 1u;
      ou::mbarrier_wait_parity(&empty[s], phase ^ 1u);  // a fresh barrier's parity-1 wait passes at once
      if (lane == 0) ou::mbarrier_arrive_expect_tx(&full[s], 32 * 4);
      __syncwarp();
      data[s * 32 + lane] = src[r * 32 + lane];
      ou::mbarrier_complete_tx(&full[s], 4);  // each lane's 4 bytes have landed
    }
  } else {
    float acc = 0.f;
    for (int r = 0; r < rounds; ++r) {
      const int s = r % 2;
      unsigned phase = (unsigned)(r / 2) & 1u;
      if (variant == WRONG_PARITY) phase ^= 1u;  // BUG: waits for the previous phase
      ou::mbarrier_wait_parity(&full[s], phase);
      acc += data[s * 32 + lane];
      ou::mbarrier_arrive(&empty[s]);
    }
    for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[warp] = acc;
  }
}

// One TMA box load of a rank-2..4 tensor map at the given coordinates into dynamic shared memory at offset
// 1024; out receives the `bytes` shared-memory bytes as they lie there (swizzled), for tests/hopper.rs to
// compare with its own placement.
extern "C" __global__ void emu_test_tma_load(const __grid_constant__ ou::TensorMap map, int rank, int c0, int c1,
                                             int c2, int c3, unsigned bytes, unsigned char* out, int variant) {
  extern __shared__ __align__(1024) unsigned char sm[];
  unsigned long long* bar = reinterpret_cast<unsigned long long*>(sm);
  unsigned char* dst = sm + 1024;
  if (threadIdx.x == 0) {
    ou::mbarrier_init(bar, 1);
    ou::mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ou::tma_prefetch_map(map);
    ou::mbarrier_arrive_expect_tx(bar, bytes);
    if (rank == 2) ou::tma_load_2d(dst, map, bar, c0, c1);
    if (rank == 3) ou::tma_load_3d(dst, map, bar, c0, c1, c2);
    if (rank == 4) ou::tma_load_4d(dst, map, bar, c0, c1, c2, c3);
  }
  if (variant != READ_BEFORE_WAIT) ou::mbarrier_wait_parity(bar, 0);
  for (unsigned i = threadIdx.x; i < bytes; i += blockDim.x) out[i] = dst[i];
}

// TMA -> wgmma: A (64x64 bf16, K contiguous) and B (64 n x 64 k, K contiguous) arrive by TMA boxes of
// 64 x 64 (the maps' swizzle), then four m64n64k16 steps read them as K-major tiles with descriptors of
// swizzle `sw` (SBO 1024: 8 rows of 128 bytes). out: [thread][32] accumulators.
extern "C" __global__ void emu_test_tma_wgmma(const __grid_constant__ ou::TensorMap map_a,
                                              const __grid_constant__ ou::TensorMap map_b, float* out, int sw) {
  extern __shared__ __align__(1024) unsigned char sm[];
  unsigned long long* bar = reinterpret_cast<unsigned long long*>(sm);
  unsigned char* a = sm + 1024;
  unsigned char* b = a + 64 * 64 * 2;
  if (threadIdx.x == 0) {
    ou::mbarrier_init(bar, 1);
    ou::mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ou::mbarrier_arrive_expect_tx(bar, 2 * 64 * 64 * 2);
    ou::tma_load_2d(a, map_a, bar, 0, 0);
    ou::tma_load_2d(b, map_b, bar, 0, 0);
  }
  ou::mbarrier_wait_parity(bar, 0);
  float d[32];
  ou::wgmma_fence();
  for (int s = 0; s < 4; ++s) {
    const unsigned long long da = ou::wgmma_desc(a + 32 * s, 16, 1024, static_cast<ou::Swizzle>(sw));
    const unsigned long long db = ou::wgmma_desc(b + 32 * s, 16, 1024, static_cast<ou::Swizzle>(sw));
    ou::wgmma_mma_ss<64, 0, 0>(d, da, db, s > 0);
  }
  ou::wgmma_commit_group();
  ou::wgmma_wait_group<0>();
  for (int r = 0; r < 32; ++r) out[threadIdx.x * 32 + r] = d[r];
}

// The warp-specialised pipeline Hopper GEMMs and FA3 use, on every primitive at once: C (64x64) = A (64xK)
// * B^T (B given as 64 n x K, K contiguous), K a multiple of 64. Warpgroup 0 produces (setmaxnreg.dec; one
// thread issues TMA boxes of 64x64 with 128B swizzle into a 2-stage ring, each stage guarded by a full and
// an empty mbarrier), warpgroup 1 consumes (setmaxnreg.inc; 4 wgmma m64n64k16 per stage). With
// `release_early` the consumers release a stage before their wgmma.wait_group (BUG: the producer may refill
// it while the wgmma still reads it).
extern "C" __global__ void emu_test_ws_gemm(const __grid_constant__ ou::TensorMap map_a,
                                            const __grid_constant__ ou::TensorMap map_b, int k_tiles, float* c,
                                            int release_early) {
  extern __shared__ __align__(1024) unsigned char sm[];
  unsigned long long* full = reinterpret_cast<unsigned long long*>(sm);
  unsigned long long* empty = full + 2;
  auto a_stage = [&](int s) { return sm + 1024 + s * 16384; };
  auto b_stage = [&](int s) { return sm + 1024 + s * 16384 + 8192; };
  const unsigned wg = threadIdx.x / 128, t = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      ou::mbarrier_init(&full[s], 1);
      ou::mbarrier_init(&empty[s], 128);
    }
    ou::mbarrier_init_fence();
  }
  __syncthreads();
  if (wg == 0) {
    ou::setmaxnreg_dec<40>();
    if (t == 0) {
      for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt % 2;
        const unsigned phase = (unsigned)(kt / 2) & 1u;
        ou::mbarrier_wait_parity(&empty[s], phase ^ 1u);
        ou::mbarrier_arrive_expect_tx(&full[s], 2 * 8192);
        ou::tma_load_2d(a_stage(s), map_a, &full[s], kt * 64, 0);
        ou::tma_load_2d(b_stage(s), map_b, &full[s], kt * 64, 0);
      }
    }
  } else {
    ou::setmaxnreg_inc<232>();
    float d[32];
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % 2;
      ou::mbarrier_wait_parity(&full[s], (unsigned)(kt / 2) & 1u);
      ou::wgmma_fence();
      for (int j = 0; j < 4; ++j) {
        const unsigned long long da = ou::wgmma_desc(a_stage(s) + 32 * j, 16, 1024, ou::Swizzle::b128);
        const unsigned long long db = ou::wgmma_desc(b_stage(s) + 32 * j, 16, 1024, ou::Swizzle::b128);
        ou::wgmma_mma_ss<64, 0, 0>(d, da, db, kt > 0 || j > 0);
      }
      ou::wgmma_commit_group();
      if (release_early) ou::mbarrier_arrive(&empty[s]);
      ou::wgmma_wait_group<0>();
      if (!release_early) ou::mbarrier_arrive(&empty[s]);
    }
    for (int r = 0; r < 32; ++r) c[t * 32 + r] = d[r];
  }
}
