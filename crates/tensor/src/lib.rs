//! Tensors on the host: dtypes, shapes, typed storage, and the safetensors weight loader.
//!
//! Everything numeric in the CPU reference is f32; the other dtypes exist so weights and reference
//! files of any upstream precision can be read, and so the CUDA backend can upload bf16/f16 data.

pub mod derived;
mod dtype;
mod error;
mod pth;
mod safetensors_io;
mod shape;
mod storage;
mod tensor;

pub use dtype::DType;
pub use error::{Error, Result};
pub use pth::{
    mem_available, read_pth, read_pth_bytes, read_pth_with, MemoryBudget, PthCheckpoint, PthError,
    PthOptions, PthResult, ALLOWED_GLOBALS, MAX_OVERLAPPING_VIEW_ELEMENTS,
};
pub use safetensors_io::{write_safetensors, Overlay, Routed, TensorMap, TensorSource, Weights};
pub use shape::Shape;
pub use storage::F32Data;
pub use tensor::{HostData, HostTensor};

pub use half::{bf16, f16};
