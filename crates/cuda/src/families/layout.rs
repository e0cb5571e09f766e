//! Layout ops (`kernels/layout.cu`): transposes between NCHW and token layouts.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::{i32_arg, suffix, Ctx, Launch};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Tile edge of the shared-memory transpose (`TILE` in kernels/layout.cu).
const TILE: usize = 32;

/// `transpose_<dtype>`: [batch, rows, cols] -> [batch, cols, rows]; no launch for an empty tensor.
pub fn transpose(
    dtype: DType,
    x: u64,
    y: u64,
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<Vec<Launch>> {
    let kernel = format!("transpose_{}", suffix(dtype)?);
    if batch == 0 || rows == 0 || cols == 0 {
        return Ok(vec![]);
    }
    // Tiles flattened into x (limit 2^31 - 1): y is capped at 65535.
    let tiles = cols.div_ceil(TILE) * rows.div_ceil(TILE);
    if tiles > i32::MAX as usize || batch > 65535 {
        return Err(CudaError::Invalid {
            what: "transpose".into(),
            msg: format!("{tiles} tiles x batch {batch} exceed the grid's (2^31 - 1, 65535)"),
        });
    }
    Ok(vec![Launch {
        kernel,
        grid: (tiles as u32, 1, batch as u32),
        block: (TILE as u32, 8, 1),
        smem: 0,
        args: vec![
            KArg::Ptr(x),
            KArg::Ptr(y),
            i32_arg("transpose rows", rows)?,
            i32_arg("transpose cols", cols)?,
        ],
    }])
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    match &node.op {
        Op::Transpose {
            x,
            batch,
            rows,
            cols,
        } => transpose(
            ctx.dtype,
            (ctx.ptr)(*x),
            (ctx.ptr)(node.output),
            *batch,
            *rows,
            *cols,
        ),
        _ => unreachable!("layout::resolve called for {}", node.op.name()),
    }
}
