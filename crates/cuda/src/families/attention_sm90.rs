//! The sm_90a (Hopper) attention (`kernels/attention_sm90.cu`: FA3-style, TMA + mbarrier ring +
//! wgmma, producer/consumer warpgroups) and the rule that selects it over attention.cu's mma.sync
//! kernel.
//!
//! Selection ([`selected_for`]: [`qualifies`] without packed segments, applied in
//! `attention::resolve`): the sm_90a conv rule's device
//! ([`super::conv_sm90::selected`]: compute capability 9.0, kernels for sm_90a, no
//! `OPENUNI_KERNELS=mma`), bf16 storage, head dim a multiple of 8 up to 128 (capacities 64, 80,
//! 112 and 128, [`CAPACITIES`]; columns past the head dim are the TMA's zero fill), q/k/v 16-byte
//! aligned. Causal, GQA,
//! the key mask are taken. The kernel also computes packed segments (batch 1, n = m: every row sees
//! its own segment's keys; the block loads the key tiles from its first row's segment start), but
//! the executor leaves them to attention.cu (batch invariance, [`selected_for`]).
//!
//! Fused RoPE (the LLM prefill; n = m; positions restart at each segment): a pre-pass
//! `attention_rope_bf16` rotates q and k into scratch ([`rope_scratch_bytes`], the executor's
//! workspace), then the wgmma kernel maps the rotated copies. Rotating inside the kernel would
//! save that pass (2 · (q + k) bytes), but its tiles arrive by TMA already swizzled and K tiles
//! are shared by both consumers: docs/hopper.md.

use openuni_tensor::DType;

use super::attention::AttentionArgs;
use super::Launch;
use crate::device::KArg;
use crate::error::{CudaError, Result};
use crate::tma;

/// Query rows per block (`A90_BM`: 2 consumer warpgroups × 64).
pub const BLOCK_M: usize = 128;
const THREADS: u32 = 384;

/// The head-dim capacities of the kernels: the width the tensor cores compute. 80 and 112 are
/// SANA's head dims 72 and 112 (SANA-600M, SANA-1.6B) without the zero columns up to 128.
pub const CAPACITIES: [usize; 4] = [64, 80, 112, 128];

/// The head-dim capacity (kernel) that runs `head_dim`, if any: the smallest that holds it.
pub fn capacity(head_dim: usize) -> Option<usize> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) {
        return None;
    }
    CAPACITIES.into_iter().find(|&c| head_dim <= c)
}

/// The kernel for `capacity`.
pub fn kernel_name(capacity: usize) -> String {
    format!("attention_bf16_wgmma_hd{capacity}")
}

/// Dynamic shared memory of the kernel for `capacity` (`a90_smem<HD>`): 1 KiB alignment slack,
/// Q for 2 consumers and 2 stages of K and V, each `ceil(capacity / 64)` boxes of 8 KiB, and
/// barriers.
pub fn smem_bytes(capacity: usize) -> usize {
    1024 + (2 + 2 * 2) * capacity.div_ceil(64) * 8192 + 128
}

/// Whether the sm_90a kernel takes this call (on a selected device).
pub fn qualifies(a: &AttentionArgs) -> bool {
    a.dtype == DType::BF16
        && capacity(a.head_dim).is_some()
        && (a.segments == 0 || (a.n == a.m && a.batch == 1))
        && (a.rope_cs == 0 || a.n == a.m)
        && [a.q, a.k, a.v].iter().all(|p| p % 16 == 0)
        && a.heads > 0
        && a.kv_heads > 0
        && a.heads.is_multiple_of(a.kv_heads)
}

/// Whether the executor runs this call on the sm_90a kernel (on a selected device): it
/// [`qualifies`] and has no packed segments. The kernel computes packed segments (tested), but a
/// block loads key tiles from its first row's segment start, so a row's summation order depends
/// on where its prompt sits in the packed row: a batch of prompts would then not give the images
/// of one prompt at a time (tests/batching.rs, 1e-2 apart in bf16). attention.cu keeps them
/// bit-identical, so packed prefills stay there.
pub fn selected_for(a: &AttentionArgs) -> bool {
    a.segments == 0 && qualifies(a)
}

fn invalid(msg: String) -> CudaError {
    CudaError::Invalid {
        what: "attention (sm_90a)".into(),
        msg,
    }
}

/// Threads per block of the RoPE pre-pass.
const ROPE_THREADS: usize = 256;

/// Bytes of scratch the RoPE pre-pass writes for a call with `rope_cs` set: rotated q, then
/// rotated k (16-byte aligned, as the head dim is a multiple of 8).
pub fn rope_scratch_bytes(a: &AttentionArgs) -> usize {
    2 * a.batch * (a.n * a.heads + a.m * a.kv_heads) * a.head_dim
}

/// Launches of a call that [`qualifies`]: the RoPE pre-pass when `rope_cs` is set, then the
/// attention (none for empty shapes). What `launch` returns, without encoding tensor maps (for
/// `openuni bench --plan`, which opens no device).
pub fn launch_count(a: &AttentionArgs) -> usize {
    if a.n == 0 || a.m == 0 || a.batch == 0 {
        0
    } else {
        1 + usize::from(a.rope_cs != 0)
    }
}

/// The launches for a call that [`qualifies`] (none for empty shapes): with `rope_cs` set, the
/// pre-pass `attention_rope_bf16` into `rope_scratch` ([`rope_scratch_bytes`], 16-byte aligned)
/// and `attention_bf16_wgmma_hd{64,80,112,128}` ([`kernel_name`]) on the rotated q and k; else
/// that kernel alone.
pub fn launch(a: &AttentionArgs, rope_scratch: u64) -> Result<Vec<Launch>> {
    if !qualifies(a) {
        return Err(invalid(format!(
            "{} head dim {}, segments {}, rope {} with batch {}, {} queries and {} keys: the sm_90a attention is bf16, head dim a multiple of 8 up to 128, packed segments (batch 1) and fused RoPE only with as many keys as queries, 16-byte aligned q/k/v",
            a.dtype,
            a.head_dim,
            a.segments != 0,
            a.rope_cs != 0,
            a.batch,
            a.n,
            a.m
        )));
    }
    if a.n == 0 || a.m == 0 || a.batch == 0 {
        return Ok(vec![]);
    }
    let mut launches = Vec::with_capacity(2);
    let (mut q, mut k) = (a.q, a.k);
    if a.rope_cs != 0 {
        if rope_scratch == 0 || !rope_scratch.is_multiple_of(16) {
            return Err(invalid(format!(
                "fused RoPE needs 16-byte aligned scratch of {} bytes, found {rope_scratch:#x}",
                rope_scratch_bytes(a)
            )));
        }
        let tokens = a.batch * a.n;
        (q, k) = (
            rope_scratch,
            rope_scratch + (2 * tokens * a.heads * a.head_dim) as u64,
        );
        let items = tokens * (a.heads + a.kv_heads) * a.head_dim / 8;
        let blocks = items.div_ceil(ROPE_THREADS);
        if blocks > i32::MAX as usize {
            return Err(invalid(format!(
                "{tokens} tokens of {} heads exceed the RoPE pre-pass's grid",
                a.heads + a.kv_heads
            )));
        }
        launches.push(Launch {
            kernel: "attention_rope_bf16".into(),
            grid: (blocks as u32, 1, 1),
            block: (ROPE_THREADS as u32, 1, 1),
            smem: 0,
            args: vec![
                KArg::Ptr(a.q),
                KArg::Ptr(a.k),
                KArg::Ptr(a.segments),
                KArg::Ptr(a.rope_cs),
                KArg::Ptr(q),
                KArg::Ptr(k),
                KArg::I64(tokens as i64),
                KArg::I32(a.n as i32),
                KArg::I32(a.heads as i32),
                KArg::I32(a.kv_heads as i32),
                KArg::I32(a.head_dim as i32),
            ],
        });
    }
    let cap = capacity(a.head_dim).unwrap_or(128);
    let bh = a.batch * a.heads;
    if bh > 65535 || a.n > i32::MAX as usize || a.m > i32::MAX as usize {
        return Err(invalid(format!(
            "batch · heads {bh} or lengths {} / {} exceed the grid or 32-bit indices",
            a.n, a.m
        )));
    }
    let (hd, b) = (a.head_dim as u64, a.batch as u64);
    let map = |what: &str, p: u64, heads: usize, len: usize| {
        let (h, l) = (heads as u64, len as u64);
        tma::tiled_bf16_swizzle128(
            what,
            p,
            &[hd, h, l, b],
            &[2 * hd, 2 * hd * h, 2 * hd * h * l],
            &[64, 1, 64, 1],
        )
    };
    let mq = map("attention q", q, a.heads, a.n)?;
    let mk = map("attention k", k, a.kv_heads, a.m)?;
    let mv = map("attention v", a.v, a.kv_heads, a.m)?;
    launches.push(Launch {
        kernel: kernel_name(cap),
        grid: (a.n.div_ceil(BLOCK_M) as u32, bh as u32, 1),
        block: (THREADS, 1, 1),
        smem: smem_bytes(cap) as u32,
        args: vec![
            KArg::TensorMap(mq),
            KArg::TensorMap(mk),
            KArg::TensorMap(mv),
            KArg::Ptr(a.mask),
            KArg::Ptr(a.segments),
            KArg::Ptr(a.out),
            KArg::I32(a.n as i32),
            KArg::I32(a.m as i32),
            KArg::I32(a.heads as i32),
            KArg::I32(a.kv_heads as i32),
            KArg::I32(a.head_dim as i32),
            KArg::I32(a.causal as i32),
            KArg::F32(a.scale * std::f32::consts::LOG2_E),
        ],
    });
    Ok(launches)
}
