//! The emulated GPU: CUDA kernels compiled for the CPU and run as fibers, behind a CPU implementation of
//! the CUDA driver API (`libcuda.so.1`) and of the cuBLASLt calls cudarc makes (`libcublasLt.so.13`).
//!
//! See crates/emu/README.md. In short:
//! * build.rs compiles every `kernels/*.cu` (and this crate's `tests/kernels/*.cu`) as C++ through
//!   `include/openuni_emu.h`, with one descriptor per `extern "C" __global__` kernel ([`registry`]);
//! * [`fiber`] runs a launch: blocks over a few workers, one fiber per CUDA thread;
//! * [`driver`] and [`cublaslt`] export the C symbols cudarc looks up when this library is loaded as
//!   `libcuda.so.1` / `libcublasLt.so.13` (tools/build_emu.sh installs it as both).

// Without the CUDA headers no kernel is compiled and the scheduler is never reached.
#![cfg_attr(
    openuni_emu_no_kernels,
    allow(dead_code, unused_imports, unused_variables, unused_mut)
)]

pub mod cublaslt;
pub mod driver;
pub mod fiber;
pub mod registry;

pub use fiber::{launch, LaunchConfig, LaunchError, LaunchOptions, Order};
pub use registry::{find, kernels_compiled, registry, Kernel, NO_KERNELS_MSG};
