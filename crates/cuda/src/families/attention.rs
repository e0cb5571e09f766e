//! Softmax attention (`kernels/attention.cu`): flash-attention 2 style kernels, one entry point
//! per storage dtype and head-dim capacity (`attention_<dtype>_hd<C>`); a capacity serves every
//! head dim up to it (columns past the head dim are zero in shared memory), so every head dim
//! from 1 to [`MAX_HEAD_DIM`] runs, on the smallest capacity that holds it ([`capacity`]).
//!
//! bf16 storage runs the tensor-core kernel (64 query rows per CTA), f32 storage the SIMT
//! reference kernel (16 query rows per CTA); both take 128 threads and dynamic shared memory
//! ([`smem_bytes`], which the kernel checks against its own layout), grid (query blocks,
//! batch · heads).
//!
//! Packed segments and fused RoPE (`Op::Attention`'s `segments` and `rope`) are two constant
//! tables built here and uploaded once per executor ([`Ctx::constant`], keyed by their contents):
//! the [start, end) of every token's segment ([`segment_table`]) and RoPE's (cos, sin) at every
//! position a segment reaches ([`rope_table`], computed exactly as the CPU twin computes them).

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::{Ctx, Launch};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Head-dim capacities with a compiled kernel: every multiple of 16 up to 128 (InternVL3's LLM and
/// the connector use 64 and 128, SANA's cross-attention 72 and 112), then every multiple of 32 up
/// to 256 (at most 24 padded columns; the kernels skip the mma steps that see only padding).
pub const HEAD_DIM_CAPACITIES: [usize; 12] = [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256];

/// The largest head dim with a kernel.
pub const MAX_HEAD_DIM: usize = 256;

/// The capacity (compiled kernel) that runs head dim `head_dim`: the smallest that holds it.
pub fn capacity(head_dim: usize) -> Option<usize> {
    if head_dim == 0 {
        return None;
    }
    HEAD_DIM_CAPACITIES.into_iter().find(|&c| c >= head_dim)
}

/// Dynamic shared memory of the kernel for `capacity` (`Mma<HD>::BYTES` and `FSmem<HD>::BYTES` in
/// kernels/attention.cu; the kernel traps when it is given less).
pub fn smem_bytes(dtype: DType, capacity: usize) -> usize {
    if dtype == DType::F32 {
        // Q [16][C], K [32][C + 1], V [32][C] in f32.
        (16 * capacity + 32 * (capacity + 1) + 32 * capacity) * 4
    } else {
        // K and V tiles [64][C + 8] in bf16, and a Q tile of the same size above capacity 128.
        let tiles = if capacity <= 128 { 2 } else { 3 };
        tiles * 64 * (capacity + 8) * 2
    }
}

/// Query rows per CTA (`BM` and `FBM` in kernels/attention.cu).
pub fn block_m(dtype: DType) -> usize {
    if dtype == DType::F32 {
        16
    } else {
        64
    }
}

const THREADS: u32 = 128;

/// One attention call on device pointers: q [batch, n, heads·head_dim], k and v [batch, m,
/// kv_heads·head_dim], optional key mask [batch, m] (0 = none), out like q, all in `dtype`;
/// optional packed-segment table (0 = none; [`segment_table`], batch 1, n = m) and RoPE table (0 =
/// none; [`rope_table`] with at least as many positions as the longest sequence, n = m).
#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs {
    pub dtype: DType,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub mask: u64,
    /// [`segment_table`] on the device, or 0.
    pub segments: u64,
    /// [`rope_table`] on the device, or 0.
    pub rope_cs: u64,
    pub out: u64,
    pub batch: usize,
    pub n: usize,
    pub m: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

/// The launch of one attention call (none for empty shapes). Errors name the unsupported head
/// dim (with the supported ones) or the limit that is exceeded.
pub fn launch(a: &AttentionArgs) -> std::result::Result<Vec<Launch>, String> {
    let Some(cap) = capacity(a.head_dim) else {
        return Err(format!(
            "head dim {} has no CUDA attention kernel: supported head dims are 1 to {MAX_HEAD_DIM}",
            a.head_dim
        ));
    };
    if a.rope_cs != 0 && a.head_dim % 2 != 0 {
        return Err(format!(
            "fused RoPE needs an even head dim, found {}",
            a.head_dim
        ));
    }
    if !matches!(a.dtype, DType::F32 | DType::BF16) {
        return Err(format!(
            "storage dtype {} has no attention kernel (f32 or bf16)",
            a.dtype
        ));
    }
    if a.heads == 0 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Err(format!(
            "{} query heads cannot share {} key/value heads",
            a.heads, a.kv_heads
        ));
    }
    let bh = a.batch * a.heads;
    if bh > 65535 {
        return Err(format!(
            "batch · heads = {bh} exceeds the grid's y limit of 65535"
        ));
    }
    if a.n > i32::MAX as usize || a.m > i32::MAX as usize {
        return Err(format!(
            "lengths {} and {} do not fit the kernel's 32-bit indices",
            a.n, a.m
        ));
    }
    if (a.segments != 0 || a.rope_cs != 0) && a.n != a.m {
        return Err(format!(
            "packed segments and fused RoPE need as many keys as queries, found {} and {}",
            a.m, a.n
        ));
    }
    if a.segments != 0 && a.batch != 1 {
        return Err(format!("packed segments need batch 1, found {}", a.batch));
    }
    if a.n == 0 || a.m == 0 || a.batch == 0 {
        return Ok(vec![]);
    }
    let suffix = super::suffix(a.dtype).map_err(|e| e.to_string())?;
    let smem = smem_bytes(a.dtype, cap);
    Ok(vec![Launch {
        kernel: format!("attention_{suffix}_hd{cap}"),
        grid: (a.n.div_ceil(block_m(a.dtype)) as u32, bh as u32, 1),
        block: (THREADS, 1, 1),
        smem: smem as u32,
        args: vec![
            KArg::Ptr(a.q),
            KArg::Ptr(a.k),
            KArg::Ptr(a.v),
            KArg::Ptr(a.mask),
            KArg::Ptr(a.segments),
            KArg::Ptr(a.rope_cs),
            KArg::Ptr(a.out),
            KArg::I32(a.n as i32),
            KArg::I32(a.m as i32),
            KArg::I32(a.heads as i32),
            KArg::I32(a.kv_heads as i32),
            KArg::I32(a.head_dim as i32),
            KArg::I32(a.causal as i32),
            KArg::F32(a.scale),
            KArg::I32(smem as i32),
        ],
    }])
}

/// The kernels' segment table: `[start, end)` of the segment of every token, as i32 pairs.
pub fn segment_table(segments: &[usize]) -> Vec<i32> {
    let mut t = Vec::with_capacity(2 * segments.iter().sum::<usize>());
    let mut start = 0;
    for &len in segments {
        for _ in 0..len {
            t.extend([start as i32, (start + len) as i32]);
        }
        start += len;
    }
    t
}

/// The kernels' RoPE table: for positions 0..positions and i < head_dim / 2, the (cos, sin) pair
/// of the f32 angle `pos · inv_freq[i]` (openuni_cpu::ops::rope_cos_sin: cos/sin in f64, rounded).
pub fn rope_table(theta: f32, head_dim: usize, positions: usize) -> Vec<f32> {
    let inv = rope_inv_freq(theta, head_dim);
    let mut t = Vec::with_capacity(positions * head_dim);
    for p in 0..positions {
        for &f in &inv {
            let ang = (p as f32 * f) as f64;
            t.extend([ang.cos() as f32, ang.sin() as f32]);
        }
    }
    t
}

/// transformers' rotary inverse frequencies `1 / theta^(2i/head_dim)` in f32 (the CPU twin's
/// `rope_inv_freq`).
pub fn rope_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

fn bytes_of<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let Op::Attention {
        q,
        k,
        v,
        key_mask,
        heads,
        kv_heads,
        head_dim,
        causal,
        scale,
        segments,
        rope,
    } = &node.op
    else {
        unreachable!("attention::resolve called for {}", node.op.name())
    };
    let qs = ctx.graph.shape(*q);
    let n = qs.dims()[1];
    // Tables keyed by their contents, so the layers of a model share one upload.
    let seg_ptr = match segments {
        Some(s) => {
            let key = format!(
                "attention.segments.{}",
                s.iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            ctx.constant(&key, &bytes_of(&segment_table(s)))?
        }
        None => 0,
    };
    let rope_ptr = match rope {
        Some(theta) => {
            let positions = segments
                .as_ref()
                .map_or(n, |s| s.iter().copied().max().unwrap_or(0))
                .max(1);
            let key = format!(
                "attention.rope_cs.{:08x}.{head_dim}.{positions}",
                theta.to_bits()
            );
            ctx.constant(&key, &bytes_of(&rope_table(*theta, *head_dim, positions)))?
        }
        None => 0,
    };
    let args = AttentionArgs {
        dtype: ctx.dtype,
        q: p(*q),
        k: p(*k),
        v: p(*v),
        mask: key_mask.map_or(0, p),
        segments: seg_ptr,
        rope_cs: rope_ptr,
        out: p(node.output),
        batch: qs.dims()[0],
        n,
        m: ctx.graph.shape(*k).dims()[1],
        heads: *heads,
        kv_heads: *kv_heads,
        head_dim: *head_dim,
        causal: *causal,
        scale: *scale,
    };
    // On sm_90 the wgmma/TMA kernel where the call qualifies (attention_sm90.rs), else mma.sync.
    // Fused RoPE there rotates q and k into scratch first (nodes run in turn: one shared buffer).
    if super::conv_sm90::selected(ctx.dev) && super::attention_sm90::selected_for(&args) {
        let scratch = match args.rope_cs {
            0 => 0,
            _ => ctx.workspace(
                "attention_sm90.rope_qk",
                super::attention_sm90::rope_scratch_bytes(&args),
            )?,
        };
        return super::attention_sm90::launch(&args, scratch);
    }
    // The executor prefixes the node's name.
    launch(&args).map_err(|msg| CudaError::Invalid {
        what: "kernels/attention.cu".into(),
        msg,
    })
}
