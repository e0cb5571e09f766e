//! Layout ops (`kernels/layout.cu`): transposes between NCHW and token layouts.

use openuni_graph::{Node, Op};

use super::{Ctx, Launch};
use crate::device::KArg;
use crate::error::Result;

/// Tile edge of the shared-memory transpose (`TILE` in kernels/layout.cu).
const TILE: u32 = 32;

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    match &node.op {
        Op::Transpose { x, batch, rows, cols } => Ok(vec![Launch {
            kernel: format!("transpose_{}", ctx.suffix()),
            // Tiles flattened into x (limit 2^31 - 1): y is capped at 65535.
            grid: ((*cols as u32).div_ceil(TILE) * (*rows as u32).div_ceil(TILE), 1, *batch as u32),
            block: (TILE, 8, 1),
            smem: 0,
            args: vec![KArg::Ptr(p(*x)), KArg::Ptr(p(node.output)), KArg::I32(*rows as i32), KArg::I32(*cols as i32)],
        }]),
        _ => unreachable!("layout::resolve called for {}", node.op.name()),
    }
}
