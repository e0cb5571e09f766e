//! Pointwise ops (`kernels/elementwise.cu`): the activations, the residual add, the adaLN gated
//! residual, and the f32 <-> bf16 casts of the executor's staging. CPU twins:
//! `openuni_cpu::ops::{unary, add, gated_add}`.
//!
//! Grid-stride kernels of 256 threads, the grid sized by [`stride_grid`]; no launch for n == 0.
//! The launch builders take raw device pointers so that tests and benchmarks launch exactly what
//! the executor launches.

use openuni_graph::{Node, Op, UnaryFn};
use openuni_tensor::DType;

use super::{i32_arg, stride_grid, suffix, vec_width, Ctx, Launch, STRIDE_THREADS};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Work items of a vectorised grid-stride loop over `n` elements: full vectors plus the scalar tail.
fn items(n: usize, width: usize) -> usize {
    n / width + n % width
}

fn launch(kernel: String, sm_count: u32, items: usize, args: Vec<KArg>) -> Vec<Launch> {
    vec![Launch {
        kernel,
        grid: stride_grid(sm_count, items),
        block: (STRIDE_THREADS, 1, 1),
        smem: 0,
        args,
    }]
}

/// `silu|gelu_tanh|gelu_erf|relu_<dtype>`: `y = f(x)` over `n` elements (in place allowed).
pub fn unary(
    dtype: DType,
    sm_count: u32,
    f: UnaryFn,
    x: u64,
    y: u64,
    n: usize,
) -> Result<Vec<Launch>> {
    let kernel = format!("{}_{}", f.name(), suffix(dtype)?);
    if n == 0 {
        return Ok(vec![]);
    }
    Ok(launch(
        kernel,
        sm_count,
        items(n, vec_width(dtype)),
        vec![KArg::Ptr(x), KArg::Ptr(y), KArg::I64(n as i64)],
    ))
}

/// `add_<dtype>`: `y = a + b`.
pub fn add(dtype: DType, sm_count: u32, a: u64, b: u64, y: u64, n: usize) -> Result<Vec<Launch>> {
    let kernel = format!("add_{}", suffix(dtype)?);
    if n == 0 {
        return Ok(vec![]);
    }
    Ok(launch(
        kernel,
        sm_count,
        items(n, vec_width(dtype)),
        vec![
            KArg::Ptr(a),
            KArg::Ptr(b),
            KArg::Ptr(y),
            KArg::I64(n as i64),
        ],
    ))
}

/// `gated_add_<dtype>`: `out = x + gate[s, c] · v` over `n` elements of a [rows, cols] view,
/// `s = row / tokens`.
#[allow(clippy::too_many_arguments)]
pub fn gated_add(
    dtype: DType,
    sm_count: u32,
    x: u64,
    gate: u64,
    v: u64,
    out: u64,
    n: usize,
    tokens: usize,
    cols: usize,
) -> Result<Vec<Launch>> {
    let kernel = format!("gated_add_{}", suffix(dtype)?);
    if n == 0 {
        return Ok(vec![]);
    }
    if tokens == 0 || cols == 0 {
        return Err(CudaError::Invalid {
            what: "gated_add".into(),
            msg: format!("tokens {tokens}, cols {cols}"),
        });
    }
    let args = vec![
        KArg::Ptr(x),
        KArg::Ptr(gate),
        KArg::Ptr(v),
        KArg::Ptr(out),
        KArg::I64(n as i64),
        i32_arg("tokens", tokens)?,
        i32_arg("cols", cols)?,
    ];
    Ok(launch(kernel, sm_count, items(n, vec_width(dtype)), args))
}

/// `ada_gated_add_<dtype>`: `out = x + (gate.t_row[s · t_stride + c] + gate.table_row[c]) · v`
/// over `n` elements of a [rows, cols] view, `s = row / tokens`: the adaLN gated residual with its
/// gate read from adaLN-single's table (see [`super::norm::TableRow`]).
#[allow(clippy::too_many_arguments)]
pub fn ada_gated_add(
    dtype: DType,
    sm_count: u32,
    x: u64,
    gate: super::norm::TableRow,
    t_stride: usize,
    v: u64,
    out: u64,
    n: usize,
    tokens: usize,
    cols: usize,
) -> Result<Vec<Launch>> {
    let kernel = format!("ada_gated_add_{}", suffix(dtype)?);
    if n == 0 {
        return Ok(vec![]);
    }
    if tokens == 0 || cols == 0 {
        return Err(CudaError::Invalid {
            what: "ada_gated_add".into(),
            msg: format!("tokens {tokens}, cols {cols}"),
        });
    }
    let args = vec![
        KArg::Ptr(x),
        KArg::Ptr(gate.t_row),
        KArg::Ptr(gate.table_row),
        KArg::Ptr(v),
        KArg::Ptr(out),
        KArg::I64(n as i64),
        i32_arg("tokens", tokens)?,
        i32_arg("cols", cols)?,
        KArg::I64(t_stride as i64),
    ];
    Ok(launch(kernel, sm_count, items(n, vec_width(dtype)), args))
}

/// `cast_f32_to_bf16` (`to == BF16`) or `cast_bf16_to_f32` (`to == F32`) over `n` elements.
/// The read-back of integer-valued pixel values (`Op::QuantizeU8`) stored as `from` into bytes.
pub fn cast_to_u8(from: DType, sm_count: u32, x: u64, y: u64, n: usize) -> Result<Vec<Launch>> {
    let kernel = match from {
        DType::F32 => "cast_f32_to_u8",
        DType::BF16 => "cast_bf16_to_u8",
        d => return Err(CudaError::DType(d)),
    };
    if n == 0 {
        return Ok(vec![]);
    }
    Ok(launch(
        kernel.into(),
        sm_count,
        items(n, 1),
        vec![KArg::Ptr(x), KArg::Ptr(y), KArg::I64(n as i64)],
    ))
}

pub fn cast(to: DType, sm_count: u32, x: u64, y: u64, n: usize) -> Result<Vec<Launch>> {
    let kernel = match to {
        DType::BF16 => "cast_f32_to_bf16",
        DType::F32 => "cast_bf16_to_f32",
        d => return Err(CudaError::DType(d)),
    };
    if n == 0 {
        return Ok(vec![]);
    }
    Ok(launch(
        kernel.into(),
        sm_count,
        items(n, 8),
        vec![KArg::Ptr(x), KArg::Ptr(y), KArg::I64(n as i64)],
    ))
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let (p, sms, t) = (ctx.ptr, ctx.dev.sm_count(), ctx.dtype);
    let out = ctx.graph.shape(node.output);
    let (n, y) = (out.numel(), p(node.output));
    match &node.op {
        Op::Unary { x, f } => unary(t, sms, *f, p(*x), y, n),
        Op::Add { a, b } => add(t, sms, p(*a), p(*b), y, n),
        Op::GatedAdd { x, gate, y: v } => gated_add(
            t,
            sms,
            p(*x),
            p(*gate),
            p(*v),
            y,
            n,
            out.rows() / ctx.graph.shape(*gate).rows(),
            out.last(),
        ),
        Op::AdaGatedAdd {
            x,
            t: tv,
            table,
            gate,
            y: v,
        } => {
            let g = ctx.graph;
            let (k, cols) = (g.shape(*table).dims()[0], out.last());
            let (row, stride) = super::norm::table_row(
                p(*tv),
                g.shape(*tv).last(),
                p(*table),
                k,
                cols,
                *gate,
                t.size_in_bytes(),
            );
            ada_gated_add(t, sms, p(*x), row, stride, p(*v), y, n, out.dims()[1], cols)
        }
        _ => unreachable!("elementwise::resolve called for {}", node.op.name()),
    }
}
