//! The CUDA backend, through cudarc 0.19 with dynamic loading (builds and runs without a CUDA
//! toolkit; without a driver every entry point returns an error, never panics).
//!
//! - [`CudaDevice`]: context, one stream, the kernel registry ([`KernelSet`]), cuBLASLt.
//! - [`nvrtc`]: kernel compilation to CUBIN (with the ptxas register/spill report) or PTX, and
//!   the disk cache; kernels come from `kernels/*.cu`, embedded at build time.
//! - [`families`]: the one dispatch path from a graph node to what computes it (an exhaustive
//!   `match` over `Op`), one module per kernel file with its launch builders; [`gemm`]: cuBLASLt
//!   for `Op::Linear` (a per-device handle, depending on the device, not the reverse).
//! - [`CudaExecutor`]: runs a graph from one arena, with CUDA-graph capture/replay and per-node
//!   event timing.
//!
//! The same code runs on the emulated GPU (crates/emu), which provides `libcuda.so.1` and
//! `libcublasLt.so.13` on the CPU: only standard driver calls are made.

mod device;
mod error;
mod executor;
pub mod families;
pub mod gemm;
pub mod gemm_cache;
mod kernels;
pub mod nvrtc;
pub mod testing;
pub mod tma;
mod weights;

pub use device::{
    default_target, device_available, device_count, driver_present, emu_traffic, is_emulated_name,
    preload_library, reset_emu_traffic, CudaDevice, DeviceBuffer, KArg, EMULATED_DEVICE_NAME,
};
pub use error::{CudaError, Result};
pub use executor::{CudaExecutor, DeviceTensor, NodeTiming};
pub use kernels::{
    file_of_kernel, kernel_headers, kernel_sources, source_fingerprint, KernelSet, PrebuiltKernel,
};
pub use nvrtc::{KernelFormat, KernelResources, KernelTarget};
pub use weights::WeightCache;

/// Re-exported so callers can name event and driver types without their own cudarc dependency.
pub use cudarc;
