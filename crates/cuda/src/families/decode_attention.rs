//! Decode-phase attention over a KV cache and the KV-cache append (`kernels/decode_attention.cu`):
//! flash-decoding, one query row per sequence, keys split into chunks of [`CHUNK`] processed by
//! separate CTAs (all query heads of a GQA group in one CTA), then a log-sum-exp merge pass.
//!
//! Caches are [B, kv_heads, max_len, head_dim] (`Op::DecodeAttention` says why). Positions are read
//! from the f32 copy of a graph input ([`super::Ctx::f32_ptr`]), so they are exact in bf16 storage
//! too. The launches depend only on shapes (the grid covers `max_len`; chunks past a sequence's
//! position exit at once), so one decode step resolves once and is replayed, e.g. as a CUDA graph.

use openuni_graph::{Node, Op, ValueId};
use openuni_tensor::DType;

use super::attention::rope_table;
use super::{stride_grid, Ctx, Launch, STRIDE_THREADS};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Keys per CTA of the first pass (`CHUNK` in kernels/decode_attention.cu).
pub const CHUNK: usize = 256;
const THREADS: u32 = 128;
/// The largest head dim (`MAX_HD`) and query heads per KV head (`MAX_GROUP`) of the kernel.
pub const MAX_HEAD_DIM: usize = 256;
pub const MAX_GROUP: usize = 16;

/// Dynamic shared memory of the first pass: q of the group and its score rows, in f32.
pub fn smem_bytes(group: usize, head_dim: usize) -> usize {
    (group * head_dim + group * CHUNK) * 4
}

/// Bytes of the f32 workspace between the passes: per (sequence, query head, chunk) the partial
/// output and its maximum and sum.
pub fn workspace_bytes(batch: usize, heads: usize, max_len: usize, head_dim: usize) -> usize {
    batch * heads * max_len.div_ceil(CHUNK) * (head_dim + 2) * 4
}

/// One decode-attention call on device pointers (see `Op::DecodeAttention`); `positions` is f32,
/// `rope_cs` an [`rope_table`] of at least `max_len` positions or 0, `partial` a workspace of
/// [`workspace_bytes`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeArgs {
    pub dtype: DType,
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub positions: u64,
    pub rope_cs: u64,
    pub partial: u64,
    pub out: u64,
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_len: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// The limits both kernels share (grid, 32-bit sizes, head dim, RoPE's even head dim).
fn check_sizes(
    batch: usize,
    kv_heads: usize,
    max_len: usize,
    head_dim: usize,
    rope: bool,
) -> std::result::Result<(), String> {
    if rope && !head_dim.is_multiple_of(2) {
        return Err(format!(
            "fused RoPE needs an even head dim, found {head_dim}"
        ));
    }
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(format!(
            "head dim {head_dim} has no decode kernel: supported head dims are 1 to {MAX_HEAD_DIM}"
        ));
    }
    if batch * kv_heads > 65535 {
        return Err(format!(
            "batch · kv_heads = {} exceeds the grid's y limit of 65535",
            batch * kv_heads
        ));
    }
    if max_len == 0
        || max_len
            .checked_mul(head_dim)
            .is_none_or(|n| n > i32::MAX as usize)
    {
        return Err(format!(
            "a cache of {max_len} positions × {head_dim} does not fit the kernel's 32-bit sizes"
        ));
    }
    Ok(())
}

/// The two launches (chunks, then merge) of one decode-attention call.
pub fn launch(a: &DecodeArgs) -> std::result::Result<Vec<Launch>, String> {
    if a.heads == 0 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Err(format!(
            "{} query heads cannot share {} key/value heads",
            a.heads, a.kv_heads
        ));
    }
    let group = a.heads / a.kv_heads;
    if group > MAX_GROUP {
        return Err(format!(
            "{group} query heads per key/value head exceed the kernel's {MAX_GROUP}"
        ));
    }
    check_sizes(a.batch, a.kv_heads, a.max_len, a.head_dim, a.rope_cs != 0)?;
    if a.batch == 0 {
        return Ok(vec![]);
    }
    let s = super::suffix(a.dtype).map_err(|e| e.to_string())?;
    let smem = smem_bytes(group, a.head_dim);
    let i = |v: usize| KArg::I32(v as i32);
    Ok(vec![
        Launch {
            kernel: format!("decode_attention_{s}"),
            grid: (
                a.max_len.div_ceil(CHUNK) as u32,
                (a.batch * a.kv_heads) as u32,
                1,
            ),
            block: (THREADS, 1, 1),
            smem: smem as u32,
            args: vec![
                KArg::Ptr(a.q),
                KArg::Ptr(a.k_cache),
                KArg::Ptr(a.v_cache),
                KArg::Ptr(a.positions),
                KArg::Ptr(a.rope_cs),
                KArg::Ptr(a.partial),
                i(a.batch),
                i(a.heads),
                i(a.kv_heads),
                i(a.max_len),
                i(a.head_dim),
                KArg::F32(a.scale),
                i(smem),
            ],
        },
        Launch {
            kernel: format!("decode_attention_merge_{s}"),
            grid: ((a.batch * a.heads) as u32, 1, 1),
            block: (THREADS, 1, 1),
            smem: 0,
            args: vec![
                KArg::Ptr(a.partial),
                KArg::Ptr(a.positions),
                KArg::Ptr(a.out),
                i(a.batch),
                i(a.heads),
                i(a.max_len),
                i(a.head_dim),
            ],
        },
    ])
}

/// One in-place append on device pointers (see `Op::KvCacheAppend`): `x` [batch, kv_heads·head_dim]
/// written (rotated when `rope_cs` is non-zero) into row p_b of `cache`.
#[derive(Clone, Copy, Debug)]
pub struct AppendArgs {
    pub dtype: DType,
    pub x: u64,
    pub positions: u64,
    pub rope_cs: u64,
    pub cache: u64,
    pub batch: usize,
    pub kv_heads: usize,
    pub max_len: usize,
    pub head_dim: usize,
}

/// The launch of one in-place append.
pub fn append_launch(a: &AppendArgs, sm_count: u32) -> std::result::Result<Vec<Launch>, String> {
    check_sizes(a.batch, a.kv_heads, a.max_len, a.head_dim, a.rope_cs != 0)?;
    if a.batch == 0 {
        return Ok(vec![]);
    }
    let s = super::suffix(a.dtype).map_err(|e| e.to_string())?;
    let i = |v: usize| KArg::I32(v as i32);
    Ok(vec![Launch {
        kernel: format!("kv_cache_append_{s}"),
        grid: stride_grid(sm_count, a.batch * a.kv_heads * a.head_dim),
        block: (STRIDE_THREADS, 1, 1),
        smem: 0,
        args: vec![
            KArg::Ptr(a.x),
            KArg::Ptr(a.positions),
            KArg::Ptr(a.rope_cs),
            KArg::Ptr(a.cache),
            i(a.batch),
            i(a.kv_heads),
            i(a.max_len),
            i(a.head_dim),
        ],
    }])
}

/// One prompt's K or V as cache rows on device pointers (see `Op::KvCacheRows`): `x` [batch,
/// tokens, kv_heads·head_dim] -> `out` [batch, kv_heads, tokens, head_dim], rotated when
/// `rope_cs` (a [`rope_table`] of at least `tokens` positions) is non-zero.
#[derive(Clone, Copy, Debug)]
pub struct RowsArgs {
    pub dtype: DType,
    pub x: u64,
    pub rope_cs: u64,
    pub out: u64,
    pub batch: usize,
    pub tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The launch of one `kv_cache_rows`.
pub fn rows_launch(a: &RowsArgs, sm_count: u32) -> std::result::Result<Vec<Launch>, String> {
    if a.rope_cs != 0 && !a.head_dim.is_multiple_of(2) {
        return Err(format!(
            "fused RoPE needs an even head dim, found {}",
            a.head_dim
        ));
    }
    let n = a.batch * a.tokens * a.kv_heads * a.head_dim;
    if n > i32::MAX as usize {
        return Err(format!(
            "a prompt of {} × {} tokens × {} × {} does not fit the kernel's 32-bit sizes",
            a.batch, a.tokens, a.kv_heads, a.head_dim
        ));
    }
    if n == 0 {
        return Ok(vec![]);
    }
    let s = super::suffix(a.dtype).map_err(|e| e.to_string())?;
    let i = |v: usize| KArg::I32(v as i32);
    Ok(vec![Launch {
        kernel: format!("kv_cache_rows_{s}"),
        grid: stride_grid(sm_count, n),
        block: (STRIDE_THREADS, 1, 1),
        smem: 0,
        args: vec![
            KArg::Ptr(a.x),
            KArg::Ptr(a.rope_cs),
            KArg::Ptr(a.out),
            i(a.batch),
            i(a.tokens),
            i(a.kv_heads),
            i(a.head_dim),
        ],
    }])
}

/// The device address of the f32 positions, or an error: bf16 storage cannot hold positions
/// above 256 exactly, so they must be a graph input (which keeps an f32 copy).
fn positions_ptr(ctx: &Ctx, positions: ValueId) -> Result<u64> {
    (ctx.f32_ptr)(positions).ok_or_else(|| CudaError::Invalid {
        what: "kernels/decode_attention.cu".into(),
        msg: "positions must be a graph input (read from its f32 copy; bf16 cannot hold every position)".into(),
    })
}

/// The RoPE table of `max_len` positions, shared by key with attention's fused RoPE.
fn rope_ptr(ctx: &Ctx, rope: Option<f32>, head_dim: usize, max_len: usize) -> Result<u64> {
    match rope {
        Some(theta) => {
            let key = format!(
                "attention.rope_cs.{:08x}.{head_dim}.{max_len}",
                theta.to_bits()
            );
            ctx.constant(
                &key,
                bytemuck::cast_slice(&rope_table(theta, head_dim, max_len)),
            )
        }
        None => Ok(0),
    }
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let err = |msg| CudaError::Invalid {
        what: "kernels/decode_attention.cu".into(),
        msg,
    };
    match &node.op {
        Op::DecodeAttention {
            q,
            k_cache,
            v_cache,
            positions,
            heads,
            kv_heads,
            head_dim,
            scale,
            rope,
        } => {
            let c = ctx.graph.shape(*k_cache).dims().to_vec();
            let (batch, max_len) = (c[0], c[2]);
            let partial = ctx.workspace(
                "decode_attention.partial",
                workspace_bytes(batch, *heads, max_len, *head_dim).max(4),
            )?;
            let args = DecodeArgs {
                dtype: ctx.dtype,
                q: p(*q),
                k_cache: p(*k_cache),
                v_cache: p(*v_cache),
                positions: positions_ptr(ctx, *positions)?,
                rope_cs: rope_ptr(ctx, *rope, *head_dim, max_len)?,
                partial,
                out: p(node.output),
                batch,
                heads: *heads,
                kv_heads: *kv_heads,
                max_len,
                head_dim: *head_dim,
                scale: *scale,
            };
            launch(&args).map_err(err)
        }
        Op::KvCacheAppend {
            cache,
            x,
            positions,
            kv_heads,
            head_dim,
            rope,
        } => {
            let c = ctx.graph.shape(*cache).dims().to_vec();
            let (batch, max_len) = (c[0], c[2]);
            let s = ctx.suffix()?;
            // The graph op makes a new value: copy the cache (misc.cu's strided copy as one row),
            // then write the new rows in place into the copy. When the output shares the cache's
            // memory (a planner that aliases them), the copy is skipped.
            let n = batch * kv_heads * max_len * head_dim;
            let mut launches = vec![];
            if p(*cache) != p(node.output) {
                launches.push(Launch {
                    kernel: format!("strided_copy_{s}"),
                    grid: stride_grid(ctx.dev.sm_count(), n.div_ceil(super::vec_width(ctx.dtype))),
                    block: (STRIDE_THREADS, 1, 1),
                    smem: 0,
                    args: vec![
                        KArg::Ptr(p(*cache)),
                        KArg::Ptr(p(node.output)),
                        KArg::I64(1),
                        KArg::I64(n as i64),
                        KArg::I64(n as i64),
                        KArg::I64(n as i64),
                    ],
                });
            }
            let args = AppendArgs {
                dtype: ctx.dtype,
                x: p(*x),
                positions: positions_ptr(ctx, *positions)?,
                rope_cs: rope_ptr(ctx, *rope, *head_dim, max_len)?,
                cache: p(node.output),
                batch,
                kv_heads: *kv_heads,
                max_len,
                head_dim: *head_dim,
            };
            launches.extend(append_launch(&args, ctx.dev.sm_count()).map_err(err)?);
            Ok(launches)
        }
        Op::KvCacheRows {
            x,
            kv_heads,
            head_dim,
            rope,
        } => {
            let xd = ctx.graph.shape(*x).dims().to_vec();
            let (batch, tokens) = (xd[0], xd[1]);
            let args = RowsArgs {
                dtype: ctx.dtype,
                x: p(*x),
                rope_cs: rope_ptr(ctx, *rope, *head_dim, tokens)?,
                out: p(node.output),
                batch,
                tokens,
                kv_heads: *kv_heads,
                head_dim: *head_dim,
            };
            rows_launch(&args, ctx.dev.sm_count()).map_err(err)
        }
        op => unreachable!("decode_attention::resolve called for {}", op.name()),
    }
}
