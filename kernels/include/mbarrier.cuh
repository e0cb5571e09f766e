// mbarrier.cuh: shared-memory barriers with phases and transaction counts (sm_90 `mbarrier.*`), with a CPU
// twin for the emulated GPU (crates/emu). Facts from the PTX ISA, "Parallel Synchronization and
// Communication Instructions: mbarrier"; docs/hopper.md says them in full.
//
//   mbarrier_init(bar, count)            a fresh barrier: phase 0, `count` arrivals expected (1 .. 2^20-1)
//   mbarrier_arrive(bar)                 one arrival (returns a state token)
//   mbarrier_arrive_expect_tx(bar, tx)   raises the phase's transaction count by tx bytes, then arrives
//   mbarrier_expect_tx(bar, tx)          raises the transaction count only
//   mbarrier_complete_tx(bar, tx)        lowers it (what TMA copies do as their bytes land)
//   mbarrier_try_wait_parity(bar, p)     true once the phase with parity p has completed
//   mbarrier_wait_parity(bar, p)         loops on try_wait (on the emulated GPU a failing try_wait yields to
//                                        the other threads, and one that sees no change for too long fails)
//   mbarrier_inval(bar)                  ends the barrier's life (before its memory is reused)
// A phase completes when its pending arrivals reach 0 and its transaction count is 0; the barrier then
// moves to the next phase (parity flips) with the expected arrivals pending again. The phase in progress
// has parity `phase & 1`; try_wait.parity(p) is true when the current phase's parity differs from p, i.e.
// the first wait of a fresh barrier uses parity 0 (blocks until phase 0 completes), and a wait with parity 1
// on a fresh barrier returns at once (CUTLASS's producer start state).
// `bar` points at a 64-bit object (unsigned long long) in shared memory (static or dynamic), 8-byte aligned.
#pragma once


#if defined(__CUDA_ARCH__)
#define OU_MB_SITE
#elif defined(OPENUNI_EMU)
#define OU_MB_SITE , OPENUNI_EMU_SITE
#define OU_MB_HERE openuni_emu_file, openuni_emu_line
#else
#error "mbarrier.cuh is for device code (NVRTC/nvcc) or the emulated GPU (crates/emu)"
#endif

namespace ou {

#if !defined(__CUDA_ARCH__)
namespace mbarrier_emu {
// The emulated barrier lives in its own 8 bytes: pending arrivals (bits 0-19), expected arrivals (20-39),
// transaction count (40-60, two's complement), phase parity (61), state (62-63: 01 live, 10 invalidated;
// 00 and 11, which fresh or poisoned memory holds, mean never initialized).
constexpr int TX_BITS = 21;
struct State {
  unsigned pending, expected;
  int tx;
  unsigned parity;
};
inline uint64_t pack(const State& s) {
  return (uint64_t)s.pending | (uint64_t)s.expected << 20 | ((uint64_t)(unsigned)s.tx & ((1u << TX_BITS) - 1)) << 40 |
         (uint64_t)s.parity << 61 | 1ull << 62;
}
inline State load(const unsigned long long* bar, const char* op, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(bar) & 7u) openuni_emu_fail(716, "mbarrier: address is not 8-byte aligned", file, line);
  const uint64_t v = *bar;
  if ((v >> 62) != 1u) {
    char msg[200];
    snprintf(msg, sizeof msg, "%s on barrier %p, which is %s", op, (const void*)bar,
             (v >> 62) == 2u ? "invalidated (mbarrier.inval)" : "not initialized (mbarrier.init)");
    openuni_emu_fail(715, msg, file, line);
  }
  State s{(unsigned)(v & 0xFFFFFu), (unsigned)((v >> 20) & 0xFFFFFu), 0, (unsigned)((v >> 61) & 1u)};
  s.tx = (int)((v >> 40) & ((1u << TX_BITS) - 1)) << (32 - TX_BITS) >> (32 - TX_BITS);
  return s;
}
[[noreturn]] inline void fail_state(const unsigned long long* bar, const State& s, const char* what, const char* file, int line,
                                    int code = 715) {
  char msg[300];
  snprintf(msg, sizeof msg, "%s (barrier %p: phase parity %u, %u of %u arrivals pending, tx-count %d)", what,
           (const void*)bar, s.parity, s.pending, s.expected, s.tx);
  openuni_emu_fail(code, msg, file, line);
}
// Per thread: the barrier it last failed to wait on, and how long it has seen no change there.
struct Waiter {
  uint64_t serial;
  const unsigned long long* bar;
  openuni_emu::hang_guard guard{0};
};
inline Waiter& waiter() {
  static __thread Waiter* table = nullptr;
  if (!table) table = new Waiter[1024];
  Waiter& w = table[openuni_emu::linear_tid()];
  if (w.serial != openuni_emu_block_serial) {
    w.serial = openuni_emu_block_serial;
    w.bar = nullptr;
  }
  return w;
}
// Applies tx (+ expected bytes, - completed bytes) and `arrivals`, then completes the phase if it is done.
inline uint64_t update(unsigned long long* bar, int tx, unsigned arrivals, const char* op, const char* file, int line) {
  State s = load(bar, op, file, line);
  const uint64_t token = (uint64_t)s.parity;
  const long long t = (long long)s.tx + tx;
  if (t > (1 << 20) - 1 || t < -((1 << 20) - 1)) fail_state(bar, s, "mbarrier: tx-count leaves [-(2^20-1), 2^20-1]", file, line);
  if (arrivals > s.pending) fail_state(bar, s, "mbarrier.arrive: more arrivals than the phase expects", file, line);
  s.tx = (int)t;
  s.pending -= arrivals;
  if (s.pending == 0 && s.tx == 0) {
    s.parity ^= 1u;
    s.pending = s.expected;
  }
  *bar = pack(s);
  return token;
}
}  // namespace mbarrier_emu
#endif

__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))),
               "r"(count) : "memory");
#else
  if (reinterpret_cast<uintptr_t>(bar) & 7u) openuni_emu_fail(716, "mbarrier.init: address is not 8-byte aligned", OU_MB_HERE);
  if (count < 1 || count > (1u << 20) - 1) openuni_emu_fail(715, "mbarrier.init: count must be in [1, 2^20-1]", OU_MB_HERE);
  *bar = mbarrier_emu::pack(mbarrier_emu::State{count, count, 0, 0});
#endif
}

// Makes the initialisation visible to the async proxy (TMA) and other threads (`fence.mbarrier_init`);
// follow it with __syncthreads.
__device__ __forceinline__ void mbarrier_init_fence() {
#if defined(__CUDA_ARCH__)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ unsigned long long mbarrier_arrive(unsigned long long* bar OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  unsigned long long state;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n"
               : "=l"(state) : "r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))) : "memory");
  return state;
#else
  return mbarrier_emu::update(bar, 0, 1, "mbarrier.arrive", OU_MB_HERE);
#endif
}

__device__ __forceinline__ unsigned long long mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned tx OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  unsigned long long state;
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 %0, [%1], %2;\n"
               : "=l"(state) : "r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))), "r"(tx) : "memory");
  return state;
#else
  mbarrier_emu::update(bar, (int)tx, 0, "mbarrier.arrive.expect_tx", OU_MB_HERE);
  return mbarrier_emu::update(bar, 0, 1, "mbarrier.arrive.expect_tx", OU_MB_HERE);
#endif
}

__device__ __forceinline__ void mbarrier_expect_tx(unsigned long long* bar, unsigned tx OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n"
               ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))), "r"(tx) : "memory");
#else
  mbarrier_emu::update(bar, (int)tx, 0, "mbarrier.expect_tx", OU_MB_HERE);
#endif
}

__device__ __forceinline__ void mbarrier_complete_tx(unsigned long long* bar, unsigned tx OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("mbarrier.complete_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n"
               ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))), "r"(tx) : "memory");
#else
  mbarrier_emu::update(bar, -(int)tx, 0, "mbarrier.complete_tx", OU_MB_HERE);
#endif
}

__device__ __forceinline__ bool mbarrier_try_wait_parity(unsigned long long* bar, unsigned parity OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  unsigned done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(static_cast<unsigned>(__cvta_generic_to_shared(bar))), "r"(parity) : "memory");
  return done != 0;
#else
  openuni_emu::async_flush(bar);  // TMA copies that complete on this barrier land now
  const mbarrier_emu::State st = mbarrier_emu::load(bar, "mbarrier.try_wait.parity", OU_MB_HERE);
  mbarrier_emu::Waiter& w = mbarrier_emu::waiter();
  if (st.parity != (parity & 1u)) {
    w.bar = nullptr;
    return true;
  }
  // Not yet. On a GPU try_wait suspends the thread for a while; here it lets the block's other threads run,
  // so that loops on try_wait alone make progress, and reports a wait that sees no change for too long.
  if (w.bar != bar) {
    w.bar = bar;
    w.guard = openuni_emu::hang_guard(*bar);
  }
  if (w.guard.stuck(*bar))
    mbarrier_emu::fail_state(bar, st,
                             parity & 1u ? "mbarrier.try_wait.parity 1 made no progress (a wrong parity, or a missing "
                                           "arrive or complete_tx): hang"
                                         : "mbarrier.try_wait.parity 0 made no progress (a wrong parity, or a missing "
                                           "arrive or complete_tx): hang",
                             OU_MB_HERE, 719);
  openuni_emu_hooks_table.yield_now(openuni_emu_cur);
  return false;
#endif
}

__device__ __forceinline__ void mbarrier_wait_parity(unsigned long long* bar, unsigned parity OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
#else
  while (!mbarrier_try_wait_parity(bar, parity, OU_MB_HERE)) {
  }
#endif
}

__device__ __forceinline__ void mbarrier_inval(unsigned long long* bar OU_MB_SITE) {
#if defined(__CUDA_ARCH__)
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(bar)))
               : "memory");
#else
  mbarrier_emu::load(bar, "mbarrier.inval", OU_MB_HERE);
  *bar = 2ull << 62;
#endif
}

}  // namespace ou

#undef OU_MB_SITE
#undef OU_MB_HERE
