//! Softmax attention (`kernels/attention.cu`): flash-attention 2 style kernels, one entry point
//! per storage dtype and head dim (`attention_<dtype>_hd<D>`).
//!
//! bf16 storage runs the tensor-core kernel (64 query rows per CTA), f32 storage the SIMT
//! reference kernel (16 query rows per CTA); both take 128 threads and only static shared memory,
//! grid (query blocks, batch · heads).

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::{Ctx, Launch};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Head dims with a compiled specialization: 16 and 32 (tests), 64 and 128 (InternVL3's LLM,
/// the connector), 72 and 112 (SANA's cross-attention).
pub const HEAD_DIMS: [usize; 6] = [16, 32, 64, 72, 112, 128];

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
/// kv_heads·head_dim], optional key mask [batch, m] (0 = none), out like q, all in `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs {
    pub dtype: DType,
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub mask: u64,
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
    if !HEAD_DIMS.contains(&a.head_dim) {
        return Err(format!(
            "head dim {} has no CUDA attention kernel; supported head dims: {}",
            a.head_dim,
            HEAD_DIMS.map(|d| d.to_string()).join(", ")
        ));
    }
    if !matches!(a.dtype, DType::F32 | DType::BF16) {
        return Err(format!("storage dtype {} has no attention kernel (f32 or bf16)", a.dtype));
    }
    if a.heads == 0 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Err(format!("{} query heads cannot share {} key/value heads", a.heads, a.kv_heads));
    }
    let bh = a.batch * a.heads;
    if bh > 65535 {
        return Err(format!("batch · heads = {bh} exceeds the grid's y limit of 65535"));
    }
    if a.n > i32::MAX as usize || a.m > i32::MAX as usize {
        return Err(format!("lengths {} and {} do not fit the kernel's 32-bit indices", a.n, a.m));
    }
    if a.n == 0 || a.m == 0 || a.batch == 0 {
        return Ok(vec![]);
    }
    let suffix = if a.dtype == DType::F32 { "f32" } else { "bf16" };
    Ok(vec![Launch {
        kernel: format!("attention_{suffix}_hd{}", a.head_dim),
        grid: (a.n.div_ceil(block_m(a.dtype)) as u32, bh as u32, 1),
        block: (THREADS, 1, 1),
        smem: 0,
        args: vec![
            KArg::Ptr(a.q),
            KArg::Ptr(a.k),
            KArg::Ptr(a.v),
            KArg::Ptr(a.mask),
            KArg::Ptr(a.out),
            KArg::I32(a.n as i32),
            KArg::I32(a.m as i32),
            KArg::I32(a.heads as i32),
            KArg::I32(a.kv_heads as i32),
            KArg::I32(a.causal as i32),
            KArg::F32(a.scale),
        ],
    }])
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let Op::Attention { q, k, v, key_mask, heads, kv_heads, head_dim, causal, scale } = &node.op else {
        unreachable!("attention::resolve called for {}", node.op.name())
    };
    let qs = ctx.graph.shape(*q);
    let args = AttentionArgs {
        dtype: ctx.dtype,
        q: p(*q),
        k: p(*k),
        v: p(*v),
        mask: key_mask.map_or(0, p),
        out: p(node.output),
        batch: qs.dims()[0],
        n: qs.dims()[1],
        m: ctx.graph.shape(*k).dims()[1],
        heads: *heads,
        kv_heads: *kv_heads,
        head_dim: *head_dim,
        causal: *causal,
        scale: *scale,
    };
    // The executor prefixes the node's name.
    launch(&args).map_err(|msg| CudaError::Invalid { what: "kernels/attention.cu".into(), msg })
}
