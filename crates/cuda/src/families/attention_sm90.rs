//! The sm_90a (Hopper) attention (`kernels/attention_sm90.cu`: FA3-style, TMA + mbarrier ring +
//! wgmma, producer/consumer warpgroups) and the rule that selects it over attention.cu's mma.sync
//! kernel.
//!
//! Selection ([`qualifies`], applied in `attention::resolve`): the sm_90a conv rule's device
//! ([`super::conv_sm90::selected`]: compute capability 9.0, kernels for sm_90a, no
//! `OPENUNI_KERNELS=mma`), bf16 storage, head dim a multiple of 8 up to 128 (capacities 64 and
//! 128; columns past the head dim are the TMA's zero fill), q/k/v 16-byte aligned, no packed
//! segments and no fused RoPE (those stay on attention.cu). Causal, GQA and the key mask are taken.

use openuni_tensor::DType;

use super::attention::AttentionArgs;
use super::Launch;
use crate::device::KArg;
use crate::error::{CudaError, Result};
use crate::tma;

/// Query rows per block (`A90_BM`: 2 consumer warpgroups × 64).
pub const BLOCK_M: usize = 128;
const THREADS: u32 = 384;

/// The head-dim capacity (kernel) that runs `head_dim`, if any.
pub fn capacity(head_dim: usize) -> Option<usize> {
    match head_dim {
        d if d == 0 || d % 8 != 0 => None,
        d if d <= 64 => Some(64),
        d if d <= 128 => Some(128),
        _ => None,
    }
}

/// Dynamic shared memory of the kernel for `capacity` (`a90_smem<HD>`): 1 KiB alignment slack,
/// Q for 2 consumers and 2 stages of K and V, each `capacity / 64` boxes of 8 KiB, and barriers.
pub fn smem_bytes(capacity: usize) -> usize {
    1024 + (2 + 2 * 2) * (capacity / 64) * 8192 + 128
}

/// Whether the sm_90a kernel takes this call (on a selected device).
pub fn qualifies(a: &AttentionArgs) -> bool {
    a.dtype == DType::BF16
        && capacity(a.head_dim).is_some()
        && a.segments == 0
        && a.rope_cs == 0
        && [a.q, a.k, a.v].iter().all(|p| p % 16 == 0)
        && a.heads > 0
        && a.kv_heads > 0
        && a.heads.is_multiple_of(a.kv_heads)
}

fn invalid(msg: String) -> CudaError {
    CudaError::Invalid { what: "attention (sm_90a)".into(), msg }
}

/// The launch of `attention_bf16_wgmma_hd{64,128}` for a call that [`qualifies`] (none for
/// empty shapes).
pub fn launch(a: &AttentionArgs) -> Result<Vec<Launch>> {
    if !qualifies(a) {
        return Err(invalid(format!(
            "{} head dim {}, segments {}, rope {}: the sm_90a attention is bf16, head dim a multiple of 8 up to 128, no packed segments or fused RoPE, 16-byte aligned q/k/v",
            a.dtype,
            a.head_dim,
            a.segments != 0,
            a.rope_cs != 0
        )));
    }
    if a.n == 0 || a.m == 0 || a.batch == 0 {
        return Ok(vec![]);
    }
    let cap = capacity(a.head_dim).unwrap_or(128);
    let bh = a.batch * a.heads;
    if bh > 65535 || a.n > i32::MAX as usize || a.m > i32::MAX as usize {
        return Err(invalid(format!("batch · heads {bh} or lengths {} / {} exceed the grid or 32-bit indices", a.n, a.m)));
    }
    let (hd, b) = (a.head_dim as u64, a.batch as u64);
    let map = |what: &str, p: u64, heads: usize, len: usize| {
        let (h, l) = (heads as u64, len as u64);
        tma::tiled_bf16_swizzle128(what, p, &[hd, h, l, b], &[2 * hd, 2 * hd * h, 2 * hd * h * l], &[64, 1, 64, 1])
    };
    let mq = map("attention q", a.q, a.heads, a.n)?;
    let mk = map("attention k", a.k, a.kv_heads, a.m)?;
    let mv = map("attention v", a.v, a.kv_heads, a.m)?;
    Ok(vec![Launch {
        kernel: format!("attention_bf16_wgmma_hd{cap}"),
        grid: (a.n.div_ceil(BLOCK_M) as u32, bh as u32, 1),
        block: (THREADS, 1, 1),
        smem: smem_bytes(cap) as u32,
        args: vec![
            KArg::TensorMap(mq),
            KArg::TensorMap(mk),
            KArg::TensorMap(mv),
            KArg::Ptr(a.mask),
            KArg::Ptr(a.out),
            KArg::I32(a.n as i32),
            KArg::I32(a.m as i32),
            KArg::I32(a.heads as i32),
            KArg::I32(a.kv_heads as i32),
            KArg::I32(a.head_dim as i32),
            KArg::I32(a.causal as i32),
            KArg::F32(a.scale * std::f32::consts::LOG2_E),
        ],
    }])
}
