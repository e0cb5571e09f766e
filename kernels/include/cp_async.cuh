// cp_async.cuh: asynchronous global -> shared copies (sm_80+ `cp.async`), with a CPU twin for the
// emulated GPU (crates/emu).
//
//   cp_async_16(smem, gmem, valid)  one 16-byte copy, `cp.async.cg.shared.global [smem], [gmem], 16, n`
//                                    with n = 16 (valid) or 0 (the 16 bytes of smem are zero-filled and
//                                    nothing is read; gmem must still be a valid global address).
//                                    Both addresses 16-byte aligned.
//   cp_async_commit()               closes the thread's current group of copies (`cp.async.commit_group`).
//   cp_async_wait<N>()              waits until at most N of the thread's committed groups are still in
//                                    flight (`cp.async.wait_group N`). As on the GPU, the data is then
//                                    visible to this thread only; other threads need a __syncthreads after
//                                    every thread's wait.
//
// The CPU twin models the window in which a copy is in flight: at issue it fills the 16 destination
// bytes with 0xFF (NaN in f32 and bf16), and it copies the data only in the issuing thread's
// cp_async_wait that completes the copy's group. So a kernel that reads the destination before the
// wait (or, for data another thread copied, before the barrier that follows everyone's wait) reads
// NaN instead of silently getting the data early, and a copy issued while other threads still read
// the old contents of its destination clobbers them (in the thread order where the issuing thread
// runs first: test in both orders). A block that ends with copies still pending (seen when the
// worker's next block issues a copy), or more than 64 copies pending in one thread, fails the launch.
#pragma once

#if defined(__CUDA_ARCH__)
#define OU_CPA_SITE
#define OU_CPA_SITE_FIRST
#elif defined(OPENUNI_EMU)
// On the emulated GPU the call site (for error reports) rides along as default arguments.
#define OU_CPA_SITE , OPENUNI_EMU_SITE
#define OU_CPA_SITE_FIRST OPENUNI_EMU_SITE
#define OU_CPA_HERE openuni_emu_file, openuni_emu_line
#else
#error "cp_async.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

#if !defined(__CUDA_ARCH__)
namespace cpa_emu {
constexpr int CAP = 64;       // pending copies per thread
constexpr int THREADS = 1024;  // threads per block at most
struct Pending {
  void* dst;
  const void* src;  // null: zero-fill
  unsigned group;
};
struct ThreadState {
  unsigned block[3];  // the block that issued the pending copies
  unsigned committed;  // groups committed so far
  int count;
  Pending p[CAP];
};
// One table per worker (a worker runs one block at a time), indexed by the thread's linear index.
inline ThreadState* state() {
  static __thread ThreadState* table = nullptr;
  if (!table) table = static_cast<ThreadState*>(calloc(THREADS, sizeof(ThreadState)));
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return table + t;
}
inline bool same_block(const ThreadState* s) {
  return s->block[0] == blockIdx.x && s->block[1] == blockIdx.y && s->block[2] == blockIdx.z;
}
// A new block starts with no copies in flight (its first cp.async or wait resets the state); copies
// left pending by the previous block on this worker are an error.
inline ThreadState* fresh_state(const char* file, int line) {
  ThreadState* s = state();
  if (!same_block(s)) {
    if (s->count > 0)
      openuni_emu_fail(719, "cp.async: a block ended with copies still pending (missing cp_async_wait<0>)", file,
                       line);
    s->block[0] = blockIdx.x;
    s->block[1] = blockIdx.y;
    s->block[2] = blockIdx.z;
    s->committed = 0;
    s->count = 0;
  }
  return s;
}
}  // namespace cpa_emu
#endif

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid OU_CPA_SITE) {
#if defined(__CUDA_ARCH__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
#else
  if ((reinterpret_cast<size_t>(smem) & 15u) != 0 || (valid && (reinterpret_cast<size_t>(gmem) & 15u) != 0))
    openuni_emu_fail(716, "cp.async: address is not 16-byte aligned", OU_CPA_HERE);
  cpa_emu::ThreadState* s = cpa_emu::fresh_state(OU_CPA_HERE);
  if (s->count == cpa_emu::CAP) openuni_emu_fail(719, "cp.async: more than 64 copies pending in one thread", OU_CPA_HERE);
  std::memset(smem, 0xFF, 16);  // undefined until the copy completes: poison (NaN)
  s->p[s->count++] = cpa_emu::Pending{smem, valid ? gmem : nullptr, s->committed};
#endif
}

__device__ __forceinline__ void cp_async_commit(OU_CPA_SITE_FIRST) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  cpa_emu::fresh_state(OU_CPA_HERE)->committed++;
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait(OU_CPA_SITE_FIRST) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  cpa_emu::ThreadState* s = cpa_emu::fresh_state(OU_CPA_HERE);
  // Groups g < committed - N are complete; copies not yet committed belong to no group.
  const unsigned done = s->committed > (unsigned)N ? s->committed - N : 0u;
  int kept = 0;
  for (int i = 0; i < s->count; ++i) {
    cpa_emu::Pending& p = s->p[i];
    if (p.group < done) {
      if (p.src)
        std::memcpy(p.dst, p.src, 16);
      else
        std::memset(p.dst, 0, 16);
    } else {
      s->p[kept++] = p;
    }
  }
  s->count = kept;
#endif
}

}  // namespace ou

#undef OU_CPA_SITE
#undef OU_CPA_SITE_FIRST
#undef OU_CPA_HERE
