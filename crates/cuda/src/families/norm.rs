//! Row norms (`kernels/norm.cu`): RMSNorm (optional bias, optional fused residual) and LayerNorm (optional affine, optional
//! fused adaLN modulation), over the last dimension. CPU twins: `openuni_cpu::ops::{rmsnorm,
//! layernorm}`.
//!
//! The launch builders take raw device pointers (0 = absent) so that tests and benchmarks launch
//! exactly what the executor launches.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::{i32_arg, suffix, vec_width, Ctx, Launch};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Items a thread keeps in registers (`NORM_CACHE` in kernels/norm.cu): a row of up to 32 times
/// this many items gets one warp (reductions by shuffles only).
const NORM_CACHE: usize = 5;

/// Most threads in a norm block: a larger block could need more registers than an SM has (1024
/// threads at 71 registers failed to launch on an H200; tests/kernels_compile.rs checks the norm
/// kernels' registers against this). Rows longer than `NORM_CACHE` × 512 items are re-read from
/// L1/L2 instead of held in registers.
pub const NORM_MAX_THREADS: usize = 512;

/// Launch layout of the norm kernels: `(block (tx, ty), grid)`. Each row is handled by `tx`
/// threads so that each thread holds at most [`NORM_CACHE`] items (16-byte vectors when `cols` is
/// a multiple of the vector width, else single elements) in registers: a power of two up to 32 (a
/// sub-warp per row, shuffles only), else a multiple of 32 up to [`NORM_MAX_THREADS`]. `ty` rows
/// share a block of at least 128 threads.
pub fn norm_launch(rows: usize, cols: usize, dtype: DType) -> ((u32, u32, u32), (u32, u32, u32)) {
    let v = vec_width(dtype);
    let items = if cols.is_multiple_of(v) { cols / v } else { cols };
    let want = items.div_ceil(NORM_CACHE).max(1);
    let tx = if want <= 32 {
        want.next_power_of_two()
    } else {
        (want.div_ceil(32) * 32).min(NORM_MAX_THREADS)
    };
    let ty = (128 / tx).max(1);
    let grid = rows.div_ceil(ty).max(1);
    ((tx as u32, ty as u32, 1), (grid as u32, 1, 1))
}

/// `rmsnorm_<dtype>`: `y = x / sqrt(mean(x²) + eps) · w (+ b)` over rows of `cols`; no launch for
/// an empty tensor.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(dtype: DType, x: u64, w: u64, b: u64, y: u64, rows: usize, cols: usize, eps: f32) -> Result<Vec<Launch>> {
    rms_rows(format!("rmsnorm_{}", suffix(dtype)?), dtype, &[x, w, b, y], rows, cols, eps)
}

/// `rmsnorm_residual_<dtype>`: `y = r + x / sqrt(mean(x²) + eps) · w (+ b)` over rows of `cols`
/// (`b` may be 0); no launch for an empty tensor.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_residual(dtype: DType, x: u64, w: u64, b: u64, r: u64, y: u64, rows: usize, cols: usize, eps: f32) -> Result<Vec<Launch>> {
    rms_rows(format!("rmsnorm_residual_{}", suffix(dtype)?), dtype, &[x, w, b, r, y], rows, cols, eps)
}

/// The launch of an RMSNorm kernel whose arguments are `ptrs`, then (rows, cols, eps); no launch
/// for an empty tensor.
fn rms_rows(kernel: String, dtype: DType, ptrs: &[u64], rows: usize, cols: usize, eps: f32) -> Result<Vec<Launch>> {
    if rows == 0 || cols == 0 {
        return Ok(vec![]);
    }
    let (block, grid) = norm_launch(rows, cols, dtype);
    let mut args: Vec<KArg> = ptrs.iter().map(|&p| KArg::Ptr(p)).collect();
    args.extend([KArg::I64(rows as i64), i32_arg("cols", cols)?, KArg::F32(eps)]);
    Ok(vec![Launch { kernel, grid, block, smem: 0, args }])
}

/// Fused adaLN modulation operands of [`layernorm`]: `scale`/`shift` [B, cols], one row per
/// sample of `tokens` rows.
#[derive(Clone, Copy, Debug)]
pub struct Modulation {
    pub scale: u64,
    pub shift: u64,
    pub tokens: usize,
}

/// `layernorm_<dtype>`: `y = (x - mean) / sqrt(var + eps) (· w) (+ b)`, then
/// `· (1 + scale) + shift` when `modulation` is given. `w`, `b` may be 0; no launch for an empty
/// tensor.
#[allow(clippy::too_many_arguments)]
pub fn layernorm(
    dtype: DType,
    x: u64,
    w: u64,
    b: u64,
    modulation: Option<Modulation>,
    y: u64,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<Vec<Launch>> {
    let kernel = format!("layernorm_{}", suffix(dtype)?);
    if rows == 0 || cols == 0 {
        return Ok(vec![]);
    }
    let (block, grid) = norm_launch(rows, cols, dtype);
    let (sc, sh, tokens) = match modulation {
        Some(m) if m.tokens > 0 => (m.scale, m.shift, m.tokens),
        Some(_) => {
            return Err(CudaError::Invalid {
                what: "layernorm modulation".into(),
                msg: "tokens is 0".into(),
            })
        }
        None => (0, 0, 1),
    };
    let args = vec![
        KArg::Ptr(x),
        KArg::Ptr(w),
        KArg::Ptr(b),
        KArg::Ptr(sc),
        KArg::Ptr(sh),
        KArg::Ptr(y),
        KArg::I64(rows as i64),
        i32_arg("cols", cols)?,
        i32_arg("tokens", tokens)?,
        KArg::F32(eps),
    ];
    Ok(vec![Launch { kernel, grid, block, smem: 0, args }])
}

/// adaLN-single's modulation rows as the fused kernels read them: for sample s, row `row` is
/// `t_row[s · t_stride + c] + table_row[c]` (device addresses of the row's start in `t` and in
/// the [k, C] table; `t_stride` k·C for a [B, k·C] `t`, C for a [B, C] one broadcast over the rows).
#[derive(Clone, Copy, Debug)]
pub struct TableRow {
    pub t_row: u64,
    pub table_row: u64,
}

/// The [`TableRow`] of row `row` of the adaLN table `table` [k, C] with `t` [B, k·C] or [B, C],
/// and the stride of `t` between samples, for `es`-byte elements.
pub fn table_row(t: u64, t_cols: usize, table: u64, k: usize, c: usize, row: usize, es: usize) -> (TableRow, usize) {
    let per_row = t_cols == k * c;
    let t_row = if per_row { t + (row * c * es) as u64 } else { t };
    (TableRow { t_row, table_row: table + (row * c * es) as u64 }, t_cols)
}

/// `ada_layernorm_<dtype>`: LayerNorm without affine of `rows` rows of `cols` (`tokens` rows per
/// sample), then `· (1 + scale) + shift` with both modulation rows read from adaLN-single's table
/// ([`TableRow`]; `t_stride` elements between samples); no launch for an empty tensor.
#[allow(clippy::too_many_arguments)]
pub fn ada_layernorm(dtype: DType, x: u64, scale: TableRow, shift: TableRow, t_stride: usize, y: u64, rows: usize, cols: usize, tokens: usize, eps: f32) -> Result<Vec<Launch>> {
    let kernel = format!("ada_layernorm_{}", suffix(dtype)?);
    if rows == 0 || cols == 0 {
        return Ok(vec![]);
    }
    if tokens == 0 {
        return Err(CudaError::Invalid { what: "ada_layernorm".into(), msg: "tokens is 0".into() });
    }
    let (block, grid) = norm_launch(rows, cols, dtype);
    let args = vec![
        KArg::Ptr(x),
        KArg::Ptr(scale.t_row),
        KArg::Ptr(shift.t_row),
        KArg::Ptr(scale.table_row),
        KArg::Ptr(shift.table_row),
        KArg::Ptr(y),
        KArg::I64(rows as i64),
        i32_arg("cols", cols)?,
        i32_arg("tokens", tokens)?,
        KArg::I64(t_stride as i64),
        KArg::F32(eps),
    ];
    Ok(vec![Launch { kernel, grid, block, smem: 0, args }])
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let out = ctx.graph.shape(node.output);
    let (rows, cols) = (out.rows(), out.last());
    match &node.op {
        Op::RmsNorm { x, weight, bias, eps } => rmsnorm(ctx.dtype, p(*x), p(*weight), bias.map_or(0, p), p(node.output), rows, cols, *eps),
        Op::RmsNormResidual { x, weight, bias, eps, residual } => {
            rmsnorm_residual(ctx.dtype, p(*x), p(*weight), bias.map_or(0, p), p(*residual), p(node.output), rows, cols, *eps)
        }
        Op::LayerNorm { x, weight, bias, eps, modulation } => {
            let m = modulation.map(|m| Modulation { scale: p(m.scale), shift: p(m.shift), tokens: out.dims()[1] });
            layernorm(ctx.dtype, p(*x), weight.map_or(0, p), bias.map_or(0, p), m, p(node.output), rows, cols, *eps)
        }
        Op::AdaLayerNorm { x, t, table, scale, shift, eps } => {
            let (k, es, tc) = (ctx.graph.shape(*table).dims()[0], ctx.dtype.size_in_bytes(), ctx.graph.shape(*t).last());
            let (sc, stride) = table_row(p(*t), tc, p(*table), k, cols, *scale, es);
            let (sh, _) = table_row(p(*t), tc, p(*table), k, cols, *shift, es);
            ada_layernorm(ctx.dtype, p(*x), sc, sh, stride, p(node.output), rows, cols, out.dims()[1], *eps)
        }
        _ => unreachable!("norm::resolve called for {}", node.op.name()),
    }
}
