// Thread-local state shared by every kernel translation unit of the emulated GPU (see openuni_emu.h).
// Compiled with -mtls-dialect=gnu2 and the default (global-dynamic) TLS model: the library is dlopen'ed
// as libcuda.so.1 and its thread-local data is too large for the initial-exec model.
#include "openuni_emu_abi.h"

extern "C" {
openuni_emu_hooks openuni_emu_hooks_table;

// The running fiber's state; the scheduler writes it through openuni_emu_cur_slot() before every resume.
__thread openuni_emu_thread* openuni_emu_cur;

// `extern __shared__` arrays of every kernel alias this one per-worker buffer (build.rs gives them this
// assembler name), as dynamic shared memory does on a GPU. 1024-byte aligned so that the sm_90 swizzle
// patterns (kernels/include/wgmma.cuh, tma.cuh), which repeat every 1024 bytes, start at offset 0.
__attribute__((aligned(1024))) __thread unsigned char openuni_emu_dyn_smem[OPENUNI_EMU_MAX_DYN_SMEM];
// The running block's dynamic shared memory size and a serial number that changes with every block the
// worker starts (per-block emulator state such as mbarrier/wgmma bookkeeping keys on it).
__thread uint32_t openuni_emu_dyn_smem_size;
__thread uint64_t openuni_emu_block_serial;

void openuni_emu_install_hooks(const openuni_emu_hooks* h) { openuni_emu_hooks_table = *h; }
openuni_emu_thread** openuni_emu_cur_slot(void) { return &openuni_emu_cur; }
unsigned char* openuni_emu_dyn_smem_ptr(void) { return openuni_emu_dyn_smem; }
void openuni_emu_block_begin(uint32_t dyn_smem_size) {
  openuni_emu_dyn_smem_size = dyn_smem_size;
  openuni_emu_block_serial++;
}
}
