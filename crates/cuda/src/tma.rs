//! TMA tensor maps (sm_90 `cp.async.bulk.tensor`, kernels/include/tma.cuh) made on the host with
//! the driver's `cuTensorMapEncodeTiled` (the emulated driver implements it too) and passed to a
//! kernel by value as [`KArg::TensorMap`](crate::KArg::TensorMap), received as
//! `const __grid_constant__ ou::TensorMap`. docs/hopper.md has the rules the driver checks.

use cudarc::driver::sys;
use cudarc::driver::DeviceRepr;

use crate::error::{CudaError, Result};

/// A 128-byte `CUtensorMap`, as the kernel parameter receives it.
#[repr(transparent)]
#[derive(Clone, Copy, Debug)]
pub struct TensorMap(pub sys::CUtensorMap);

// SAFETY: plain bytes of the size and alignment the driver API defines, copied into the kernel's
// parameter space.
unsafe impl DeviceRepr for TensorMap {}

/// A tiled tensor map over a bf16 tensor at `global` (16-byte aligned): `dims` innermost first,
/// `row_strides` the byte strides of dims 1.. (multiples of 16), boxes of `box_dims` elements,
/// the 128-byte swizzle (a box row must then be 128 bytes at most), out-of-bounds elements read
/// as zero. `what` names the tensor in errors.
pub fn tiled_bf16_swizzle128(
    what: &str,
    global: u64,
    dims: &[u64],
    row_strides: &[u64],
    box_dims: &[u32],
) -> Result<TensorMap> {
    let rank = dims.len();
    let bad = |msg: String| CudaError::Invalid {
        what: format!("tensor map of {what}"),
        msg,
    };
    if !(1..=5).contains(&rank) || row_strides.len() + 1 != rank || box_dims.len() != rank {
        return Err(bad(format!(
            "rank {rank} with {} strides and {} box dims",
            row_strides.len(),
            box_dims.len()
        )));
    }
    if !global.is_multiple_of(16) {
        return Err(bad(format!("address {global:#x} is not 16-byte aligned")));
    }
    if let Some(s) = row_strides.iter().find(|s| **s % 16 != 0) {
        return Err(bad(format!("byte stride {s} is not a multiple of 16")));
    }
    let mut map = TensorMap(sys::CUtensorMap { opaque: [0; 16] });
    let element_strides = vec![1u32; rank];
    // SAFETY: every array has `rank` (strides: rank - 1) elements, the output is a CUtensorMap.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            rank as u32,
            global as *mut std::ffi::c_void,
            dims.as_ptr(),
            row_strides.as_ptr(),
            box_dims.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(bad(format!(
            "cuTensorMapEncodeTiled failed ({r:?}): dims {dims:?}, byte strides {row_strides:?}, box {box_dims:?}"
        )));
    }
    Ok(map)
}
