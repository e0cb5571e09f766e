// wgmma.cuh: warpgroup matrix multiply-accumulate (sm_90a `wgmma.*`), bf16 x bf16 -> f32, with a CPU twin
// for the emulated GPU (crates/emu). Facts from the PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate Instructions"; docs/hopper.md says them in full.
//
//   wgmma_fence()                    `wgmma.fence`: before the first mma_async that reads accumulator or A
//                                    registers written since (the emulator requires one after every wait).
//   wgmma_mma_ss<N, TA, TB>(d, da, db, scale_d)   `wgmma.mma_async.m64nNk16.f32.bf16.bf16` with A and B in
//                                    shared memory by 64-bit descriptor (wgmma_desc). TA/TB: 0 = K-major,
//                                    1 = M-/N-major (the ISA's imm-trans-a/-b). scale_d false: D = A*B.
//   wgmma_mma_rs<N, TB>(d, a, db, scale_d)        the same with A from registers (4 x bf16x2 per thread).
//   wgmma_commit_group()             `wgmma.commit_group`: closes a group of the issued mma_async ops.
//   wgmma_wait_group<N>()            `wgmma.wait_group N`: until at most N groups are pending; only then may
//                                    the accumulators (and the registers of A) be read or written.
//   wgmma_fence_operand(r)           keeps the compiler from moving accesses of r across the async window.
// All 128 threads of a warpgroup (4 consecutive warps, threads 128w..128w+127) execute every one of these
// together with the same operands (except their own registers). N in {8, 16, 32, 64, 80, 112, 128, 256} (the
// ISA allows every multiple of 8 up to 256; 80 and 112 are the attention's narrow head dims).
//
// Register fragments (warp w = 0..3 of the warpgroup, lane = 4 * g + tq, as mma.m16n8k16 per warp):
//   A (64x16): a[0] = A[16w+g][2tq..2tq+1]   a[1] = A[16w+g+8][2tq..2tq+1]
//              a[2] = A[16w+g][2tq+8..+9]    a[3] = A[16w+g+8][2tq+8..+9]   (low half = lower column)
//   D (64xN f32): d[4j + r] = D[16w + g + 8(r/2)][8j + 2tq + (r%2)], j = 0..N/8-1.
// Descriptor (64 bits): start address >> 4 (bits 0-13), leading-dimension byte offset >> 4 (16-29),
// stride-dimension byte offset >> 4 (32-45), base offset (49-51), swizzle (62-63: 0 none, 1 128B, 2 64B,
// 3 32B). Canonical layouts, byte offset of element (mn, k) of a bf16 operand (A: mn = m; B: mn = n), before
// the address swizzle of sm90.cuh, with W = the swizzle's line bytes (32/64/128):
//   K-major,  none:  (mn%8)*16 + (mn/8)*SBO + (k%8)*2 + (k/8)*LBO
//   K-major,  W:     (mn%8)*W  + (mn/8)*SBO + (k%8)*2 + (k/8)*16          (LBO unused)
//   MN-major, none:  (mn%8)*2  + (mn/8)*SBO + (k%8)*16 + (k/8)*LBO
//   MN-major, W:     (mn%8)*2  + ((mn/8)%(W/16))*16 + (mn/(W/2))*LBO + (k%8)*W + (k/8)*SBO
#pragma once

#include "sm90.cuh"

#if defined(__CUDA_ARCH__)
#define OU_WG_SITE
#define OU_WG_SITE_FIRST
#elif defined(OPENUNI_EMU)
#define OU_WG_SITE , OPENUNI_EMU_SITE
#define OU_WG_SITE_FIRST OPENUNI_EMU_SITE
#define OU_WG_HERE openuni_emu_file, openuni_emu_line
#else
#error "wgmma.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

// A shared-memory matrix descriptor for `wgmma.mma_async` (smem: the operand tile's first element).
__device__ __forceinline__ unsigned long long wgmma_desc(const void* smem, unsigned lbo_bytes, unsigned sbo_bytes,
                                                         Swizzle sw OU_WG_SITE) {
#if defined(__CUDA_ARCH__)
  const unsigned a = smem_addr(smem);
#else
  const unsigned a = smem_addr(smem, OU_WG_HERE);
  if (a % 16u || lbo_bytes % 16u || sbo_bytes % 16u || lbo_bytes >= (1u << 18) || sbo_bytes >= (1u << 18)) {
    char msg[200];
    snprintf(msg, sizeof msg, "wgmma_desc: start 0x%x, LBO %u and SBO %u must be multiples of 16 below 2^18 (14-bit "
             "fields of x >> 4)", a, lbo_bytes, sbo_bytes);
    openuni_emu_fail(715, msg, OU_WG_HERE);
  }
#endif
  return (unsigned long long)((a & 0x3FFFFu) >> 4) | (unsigned long long)((lbo_bytes & 0x3FFFFu) >> 4) << 16 |
         (unsigned long long)((sbo_bytes & 0x3FFFFu) >> 4) << 32 | (unsigned long long)sw << 62;
}

#if defined(__CUDA_ARCH__)
template <int N> struct wgmma_ptx;
template <> struct wgmma_ptx<8> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, %4, %5, p, %7, %8, %9, %10;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, %10, %11, %12;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
template <> struct wgmma_ptx<16> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, %11, %12, %13, %14;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, %14, %15, %16;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
template <> struct wgmma_ptx<32> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, %19, %20, %21, %22;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, %22, %23, %24;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
template <> struct wgmma_ptx<64> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, %35, %36, %37, %38;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, %38, %39, %40;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
template <> struct wgmma_ptx<80> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39}, %40, %41, p, %43, %44, %45, %46;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39}, {%40,%41,%42,%43}, %44, p, %46, %47, %48;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
template <> struct wgmma_ptx<112> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %58, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n112k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55}, %56, %57, p, %59, %60, %61, %62;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %61, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n112k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55}, {%56,%57,%58,%59}, %60, p, %62, %63, %64;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
template <> struct wgmma_ptx<128> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, %67, %68, %69, %70;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, %70, %71, %72;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
template <> struct wgmma_ptx<256> {
  template <int TA, int TB, int SA, int SB>
  __device__ __forceinline__ static void ss(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, %131, %132, %133, %134;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB) : "memory");
  }
  template <int TB, int SA, int SB>
  __device__ __forceinline__ static void rs(float* d, const unsigned* a, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, {%128,%129,%130,%131}, %132, p, %134, %135, %136;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB) : "memory");
  }
};
#else
namespace wgmma_emu {
// The CPU twin defers every mma_async to the wait_group that completes its group: the accumulators keep
// their old values until then (a missing wait leaves them unwritten), and the shared-memory operands are
// read at the wait, as late as the hardware may read them (so overwriting them early is seen).
constexpr int CAP = 64;  // pending mma_async ops per thread
struct Op {
  float* d;
  unsigned long long da, db;
  unsigned a[4];
  unsigned group;
  short n;
  bool a_regs, scale_d;
  signed char ta, tb, sa, sb;
};
struct Thread {
  uint64_t serial;  // openuni_emu_block_serial of the block this state belongs to
  unsigned committed;
  int count;
  bool fenced;
  Op ops[CAP];
};
inline Thread* table() {
  static __thread Thread* t = nullptr;
  if (!t) t = static_cast<Thread*>(calloc(1024, sizeof(Thread)));
  return t;
}
inline Thread* state() {
  Thread* s = table() + openuni_emu::linear_tid();
  if (s->serial != openuni_emu_block_serial) {
    s->serial = openuni_emu_block_serial;
    s->committed = 0;
    s->count = 0;
    s->fenced = false;
  }
  return s;
}
[[noreturn]] inline void fail(const char* file, int line, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
inline void fail(const char* file, int line, const char* fmt, ...) {
  char msg[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  openuni_emu_fail(715, msg, file, line);
}
struct Desc {
  unsigned start, lbo, sbo, base;
  Swizzle sw;
};
inline const char* swizzle_name(Swizzle s) {
  return s == Swizzle::b128 ? "128B" : s == Swizzle::b64 ? "64B" : s == Swizzle::b32 ? "32B" : "none";
}
// Byte offset of bf16 element (mn, k) from the start address, before the swizzle (the canonical layouts).
inline unsigned offset(const Desc& d, bool mn_major, int mn, int k) {
  const unsigned w = swizzle_bytes(d.sw);
  if (!mn_major) {
    if (d.sw == Swizzle::none) return (mn % 8) * 16u + (mn / 8) * d.sbo + (k % 8) * 2u + (k / 8) * d.lbo;
    return (mn % 8) * w + (mn / 8) * d.sbo + (k % 8) * 2u + (k / 8) * 16u;
  }
  if (d.sw == Swizzle::none) return (mn % 8) * 2u + (mn / 8) * d.sbo + (k % 8) * 16u + (k / 8) * d.lbo;
  const unsigned chunks = w / 16u;
  return (mn % 8) * 2u + ((mn / 8) % chunks) * 16u + (mn / (8 * chunks)) * d.lbo + (k % 8) * w + (k / 8) * d.sbo;
}
// Decodes a descriptor bit by bit and checks it against the ISA and the block's shared memory; `rows` is the
// operand's M or N extent.
inline Desc decode(unsigned long long v, const char* which, bool mn_major, int rows, const char* file, int line) {
  Desc d{(unsigned)(v & 0x3FFFu) << 4, (unsigned)((v >> 16) & 0x3FFFu) << 4, (unsigned)((v >> 32) & 0x3FFFu) << 4,
         (unsigned)((v >> 49) & 7u), static_cast<Swizzle>((unsigned)(v >> 62) & 3u)};
  if (v & (0x3ull << 14 | 0x3ull << 30 | 0x7ull << 46 | 0x3FFull << 52))
    fail(file, line, "wgmma.mma_async: descriptor %s = 0x%016llx has bits set outside its fields (14-15, 30-31, 46-48, 52-61)",
         which, v);
  if (d.base != 0)
    fail(file, line, "wgmma.mma_async: descriptor %s = 0x%016llx has base offset %u: not emulated (start tiles on the "
         "swizzle pattern's boundary and use base offset 0)", which, v, d.base);
  if (d.sw != Swizzle::none) {
    const unsigned mask = swizzle_mask(d.sw), w = swizzle_bytes(d.sw);
    if (((d.start >> 7) & mask) != 0)
      fail(file, line, "wgmma.mma_async: descriptor %s = 0x%016llx: start address 0x%x is in line %u of a %s swizzle "
           "pattern, but base offset 0 says the pattern starts at a %u-byte boundary",
           which, v, d.start, (d.start >> 7) & mask, swizzle_name(d.sw), 128u * (mask + 1));
    if (!mn_major && d.start % w + 32u > w)
      fail(file, line, "wgmma.mma_async: descriptor %s = 0x%016llx: K-major start address 0x%x puts the 16-element k "
           "slice across a %u-byte swizzle line (start %% %u must be <= %u)", which, v, d.start, w, w, w - 32);
  }
  const unsigned last = d.start + offset(d, mn_major, rows - 1, 15);
  const unsigned end = (last | 127u) + 1u;  // the swizzle moves bytes within their 128-byte line
  if (d.start >= openuni_emu_dyn_smem_size || end > openuni_emu_dyn_smem_size)
    fail(file, line, "wgmma.mma_async: descriptor %s = 0x%016llx (start 0x%x, LBO %u, SBO %u, swizzle %s) reaches "
         "shared address 0x%x, outside the block's %u bytes of dynamic shared memory",
         which, v, d.start, d.lbo, d.sbo, swizzle_name(d.sw), end, openuni_emu_dyn_smem_size);
  return d;
}
inline float bf16_at(unsigned addr) {
  unsigned short h;
  std::memcpy(&h, openuni_emu_dyn_smem_ptr() + addr, 2);
  return __uint_as_float((unsigned)h << 16);
}
inline float smem_elem(const Desc& d, bool mn_major, int mn, int k) {
  return bf16_at(swizzle_addr(d.start + offset(d, mn_major, mn, k), d.sw));
}
template <int N>
inline void issue(float* d, unsigned long long da, const unsigned* a, unsigned long long db, bool scale_d, int ta,
                  int tb, int sa, int sb, const char* file, int line) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma: N a multiple of 8 up to 256 (PTX ISA, bf16 dense)");
  Thread* s = state();
  if (!s->fenced)
    fail(file, line, "wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group (the accumulator and A "
         "registers must be fenced before the first mma_async that uses them)");
  if (s->count == CAP) fail(file, line, "wgmma.mma_async: more than %d ops pending in one thread", CAP);
  if (!a) decode(da, "A", ta != 0, 64, file, line);
  decode(db, "B", tb != 0, N, file, line);
  Op& op = s->ops[s->count++];
  op = Op{d, a ? 0ull : da, db, {0, 0, 0, 0}, s->committed, (short)N, a != nullptr, scale_d,
          (signed char)ta, (signed char)tb, (signed char)sa, (signed char)sb};
  if (a) std::memcpy(op.a, a, sizeof op.a);
}
inline bool same_op(const Op& x, const Op& y) {
  return x.da == y.da && x.db == y.db && x.group == y.group && x.n == y.n && x.a_regs == y.a_regs &&
         x.scale_d == y.scale_d && x.ta == y.ta && x.tb == y.tb && x.sa == y.sa && x.sb == y.sb;
}
// Computes this thread's accumulators for op i (every thread of the warpgroup has issued it). The thread's
// 2 rows of A and N/4 columns of B are decoded once (not once per accumulator); the sums are the same
// f32 operations in the same k order.
inline void compute(Thread* wg, int i, unsigned me, const char* file, int line) {
  const Op& op = wg[me].ops[i];
  Desc da{}, db = decode(op.db, "B", op.tb != 0, op.n, file, line);
  if (!op.a_regs) da = decode(op.da, "A", op.ta != 0, 64, file, line);
  const int w = (int)me / 32, lane = (int)me % 32, g = lane / 4, tq = lane % 4;
  float av[2][16], bv[64][16];  // av[h]: row 16w + g + 8h; bv[2j + e]: column 8j + 2tq + e
  for (int h = 0; h < 2; ++h) {
    const int row = 16 * w + g + 8 * h;
    for (int k = 0; k < 16; ++k) {
      if (op.a_regs) {
        // A[row][k] is in warp row/16, lane (row%8)*4 + (k%8)/2, register (row%16)/8 + 2*(k/8), half k%2.
        const unsigned owner = (unsigned)(32 * (row / 16) + (row % 8) * 4 + (k % 8) / 2);
        const unsigned reg = wg[owner].ops[i].a[(row % 16) / 8 + 2 * (k / 8)];
        av[h][k] = __uint_as_float(k & 1 ? (reg & 0xffff0000u) : (reg << 16));
      } else {
        av[h][k] = smem_elem(da, op.ta != 0, row, k);
      }
    }
  }
  for (int c = 0; c < op.n / 4; ++c)
    for (int k = 0; k < 16; ++k) bv[c][k] = smem_elem(db, op.tb != 0, 8 * (c / 2) + 2 * tq + (c % 2), k);
  for (int r = 0; r < op.n / 2; ++r) {
    const float* a = av[(r % 4) / 2];
    const float* b = bv[2 * (r / 4) + (r % 2)];
    float acc = op.scale_d ? op.d[r] : 0.f;
    for (int k = 0; k < 16; ++k) acc += ((float)op.sa * a[k]) * ((float)op.sb * b[k]);
    op.d[r] = acc;
  }
}
}  // namespace wgmma_emu
#endif

__device__ __forceinline__ void wgmma_fence(OU_WG_SITE_FIRST) {
#if defined(__CUDA_ARCH__)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  wgmma_emu::state()->fenced = true;
#endif
}

__device__ __forceinline__ void wgmma_commit_group(OU_WG_SITE_FIRST) {
#if defined(__CUDA_ARCH__)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  wgmma_emu::state()->committed++;
#endif
}

template <int N>
__device__ __forceinline__ void wgmma_wait_group(OU_WG_SITE_FIRST) {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group: N in 0..7");
#if defined(__CUDA_ARCH__)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  static const char* const what[8] = {"wgmma.wait_group 0", "wgmma.wait_group 1", "wgmma.wait_group 2",
                                      "wgmma.wait_group 3", "wgmma.wait_group 4", "wgmma.wait_group 5",
                                      "wgmma.wait_group 6", "wgmma.wait_group 7"};
  wgmma_emu::Thread* s = wgmma_emu::state();  // fresh for this block before anyone reads it
  openuni_emu::warpgroup_sync(what[N], OU_WG_HERE);
  const unsigned me = openuni_emu::linear_tid() % 128u;
  wgmma_emu::Thread* wg = s - me;  // the warpgroup's 128 thread states
  const wgmma_emu::Thread& lead = wg[0];
  if (s->count != lead.count || s->committed != lead.committed)
    wgmma_emu::fail(OU_WG_HERE, "wgmma.wait_group: threads %u and %u of the warpgroup issued different wgmma ops "
                    "(%d vs %d pending, %u vs %u groups committed)", me, 0u, s->count, lead.count, s->committed,
                    lead.committed);
  for (int i = 0; i < s->count; ++i)
    if (!wgmma_emu::same_op(s->ops[i], lead.ops[i]))
      wgmma_emu::fail(OU_WG_HERE, "wgmma.wait_group: threads %u and 0 of the warpgroup issued different "
                      "wgmma.mma_async operands (op %d: descriptors 0x%llx/0x%llx vs 0x%llx/0x%llx)", me, i,
                      s->ops[i].da, s->ops[i].db, lead.ops[i].da, lead.ops[i].db);
  // Groups g < committed - N are complete; ops not yet committed belong to no group.
  const unsigned done = s->committed > (unsigned)N ? s->committed - N : 0u;
  int n_done = 0;
  while (n_done < s->count && s->ops[n_done].group < done) wgmma_emu::compute(wg, n_done++, me, OU_WG_HERE);
  // Everyone has read the others' A registers before any thread forgets its completed ops.
  openuni_emu::warpgroup_sync("wgmma.wait_group (completion)", OU_WG_HERE);
  for (int i = n_done; i < s->count; ++i) s->ops[i - n_done] = s->ops[i];
  s->count -= n_done;
  s->fenced = false;
#endif
}

// D (64xN) = A * B + (scale_d ? D : 0), A and B in shared memory. SA, SB: the ISA's imm-scale-a/-b (1 or -1).
template <int N, int TA, int TB, int SA = 1, int SB = 1>
__device__ __forceinline__ void wgmma_mma_ss(float (&d)[N / 2], unsigned long long desc_a, unsigned long long desc_b,
                                             bool scale_d OU_WG_SITE) {
  static_assert((TA == 0 || TA == 1) && (TB == 0 || TB == 1) && (SA == 1 || SA == -1) && (SB == 1 || SB == -1),
                "wgmma: transpose 0/1, scale 1/-1");
#if defined(__CUDA_ARCH__)
  wgmma_ptx<N>::template ss<TA, TB, SA, SB>(d, desc_a, desc_b, scale_d ? 1 : 0);
#else
  wgmma_emu::issue<N>(d, desc_a, nullptr, desc_b, scale_d, TA, TB, SA, SB, OU_WG_HERE);
#endif
}

// D (64xN) = A * B + (scale_d ? D : 0), A from registers (fragment layout above), B in shared memory.
template <int N, int TB, int SA = 1, int SB = 1>
__device__ __forceinline__ void wgmma_mma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc_b,
                                             bool scale_d OU_WG_SITE) {
  static_assert((TB == 0 || TB == 1) && (SA == 1 || SA == -1) && (SB == 1 || SB == -1), "wgmma: transpose 0/1, scale 1/-1");
#if defined(__CUDA_ARCH__)
  wgmma_ptx<N>::template rs<TB, SA, SB>(d, a, desc_b, scale_d ? 1 : 0);
#else
  wgmma_emu::issue<N>(d, 0, a, desc_b, scale_d, 0, TB, SA, SB, OU_WG_HERE);
#endif
}

// Tells the compiler that r may change here (CUTLASS's warpgroup_fence_operand): put around mma_async/wait so
// that reads and writes of accumulators are not moved into the asynchronous window.
template <int K>
__device__ __forceinline__ void wgmma_fence_operand(float (&r)[K]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(r[i])::"memory");
#else
  (void)r;
#endif
}

}  // namespace ou

#undef OU_WG_SITE
#undef OU_WG_SITE_FIRST
#undef OU_WG_HERE
